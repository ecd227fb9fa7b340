"""The fleet-wide rate limiter against a real private redis-server, and its in-process twin.

The central check: over every window of W seconds starting at a grant, no more than
``capacity + rate * W`` (plus one request of slack for timestamps taken after the grant)
got through, and the limiter still let through most of what the rate allows.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

import pydantic
import pytest
import redis
import redis.asyncio
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from labeler.judges.ratelimit import (
    LocalRateLimiter,
    RateLimiter,
    RateLimits,
    RedisRateLimiter,
    limiter_key,
)
from tests.redis_server import RedisServer, free_port

T = TypeVar("T")
SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("redis")) as running:
        yield running


_clients: list[redis.asyncio.Redis] = []  # opened by redis_limiter, closed by finish


def redis_limiter(server: RedisServer, limits: RateLimits) -> RedisRateLimiter:
    """A limiter on a fresh key with its own client; call from inside ``finish``."""
    client = redis.asyncio.Redis.from_url(server.url)
    _clients.append(client)
    return RedisRateLimiter(client, fresh_key(), limits)


def finish(work: Coroutine[None, None, T], timeout: float = 20.0) -> T:
    """Run ``work`` on a new event loop, failing rather than hanging if a limiter deadlocks."""

    async def main() -> T:
        try:
            return await asyncio.wait_for(work, timeout)
        finally:
            while _clients:
                await _clients.pop().aclose()

    return asyncio.run(main())


def fresh_key() -> str:
    return limiter_key(f"test:{uuid.uuid4().hex[:12]}")


def most_in_window(times: Sequence[float], weights: Sequence[float], window: float) -> float:
    """The largest total weight in [t, t + window) over windows starting at each time."""
    pairs = sorted(zip(times, weights, strict=True))
    best = 0.0
    end = 0
    total = 0.0
    for start, (t0, _) in enumerate(pairs):
        while end < len(pairs) and pairs[end][0] < t0 + window:
            total += pairs[end][1]
            end += 1
        best = max(best, total)
        total -= pairs[start][1]
    return best


def check_bounds(
    times: Sequence[float],
    weights: Sequence[float],
    *,
    rate: float,
    capacity: float,
    slack: float,
    duration: float,
) -> None:
    assert times, "nothing was granted"
    for window in (1.0, 2.0, 4.0):
        worst = most_in_window(times, weights, window)
        bound = capacity + rate * window + slack
        assert worst <= bound, f"{worst} granted within {window}s, bound {bound}"
    span = max(times) - min(times)  # the whole run is a window too (the tightest for W)
    bound = capacity + rate * span + slack
    assert sum(weights) <= bound, f"{sum(weights)} granted within {span:.2f}s, bound {bound}"
    allowed = capacity + rate * duration
    assert sum(weights) >= 0.8 * allowed, f"only {sum(weights)} of {allowed} granted"


async def hammer(
    acquire: Callable[[], Awaitable[None]], tasks: int, duration: float, clock: Callable[[], float]
) -> list[float]:
    """Tasks acquiring in a loop for ``duration`` seconds; the grant times."""
    grants: list[float] = []

    async def worker() -> None:
        while True:
            await acquire()
            grants.append(clock())

    running = [asyncio.create_task(worker()) for _ in range(tasks)]
    await asyncio.wait(running, timeout=duration)
    for task in running:
        task.cancel()
    await asyncio.gather(*running, return_exceptions=True)
    for task in running:
        assert task.cancelled()  # none of them failed
    return grants


# One worker process: its own client and several tasks, from `start_at` for `duration` s.
WORKER = """
import asyncio, json, sys, time
import redis.asyncio
from labeler.judges.ratelimit import RateLimits, RedisRateLimiter

url, key, rpm, start_at, duration, tasks = sys.argv[1:7]

async def main() -> None:
    client = redis.asyncio.Redis.from_url(url)
    limiter = RedisRateLimiter(client, key, RateLimits(rpm=float(rpm), burst_s=1.0))
    await client.ping()
    grants = []

    async def worker():
        while True:
            await limiter.acquire(1)
            grants.append(time.time())

    await asyncio.sleep(max(0.0, float(start_at) - time.time()))
    running = [asyncio.create_task(worker()) for _ in range(int(tasks))]
    await asyncio.wait(running, timeout=float(start_at) + float(duration) - time.time())
    for task in running:
        task.cancel()
    await asyncio.gather(*running, return_exceptions=True)
    assert all(task.cancelled() for task in running)
    await client.aclose()
    sys.stdout.write(json.dumps(grants))

asyncio.run(main())
"""


def test_requests_across_processes(server: RedisServer) -> None:
    key = fresh_key()
    limits = RateLimits(rpm=600, burst_s=1.0)
    duration = 4.0
    start_at = time.time() + 1.0  # time for the interpreters to start and import
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC), env.get("PYTHONPATH")]))
    args = [server.url, key, "600", repr(start_at), repr(duration), "4"]
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, *args], env=env, stdout=subprocess.PIPE, text=True
        )
        for _ in range(3)
    ]
    grants: list[float] = []
    per_process = []
    for worker in workers:
        out, _ = worker.communicate(timeout=120)  # a 4 s job; slack for a loaded machine
        assert worker.returncode == 0
        mine = json.loads(out)
        per_process.append(len(mine))
        grants.extend(mine)
    assert all(n > 0 for n in per_process), per_process  # every process really competed
    check_bounds(
        grants,
        [1.0] * len(grants),
        rate=limits.request_rate,
        capacity=limits.request_capacity,
        slack=1.0,
        duration=duration,
    )


@pytest.mark.parametrize("kind", ["redis", "local"])
def test_tokens_per_minute(server: RedisServer, kind: str) -> None:
    limits = RateLimits(tpm=6000, burst_s=1.0)  # 100 tokens/s, capacity 100
    duration = 2.5

    async def run() -> list[float]:
        limiter: RateLimiter = (
            redis_limiter(server, limits) if kind == "redis" else LocalRateLimiter(limits)
        )
        return await hammer(lambda: limiter.acquire(50), 4, duration, time.monotonic)

    grants = finish(run())
    check_bounds(
        grants,
        [50.0] * len(grants),
        rate=limits.token_rate,
        capacity=limits.token_capacity,
        slack=50.0,
        duration=duration,
    )


def test_local_requests_per_minute() -> None:
    limits = RateLimits(rpm=600, burst_s=1.0)
    duration = 2.5

    async def run() -> list[float]:
        limiter = LocalRateLimiter(limits)
        return await hammer(lambda: limiter.acquire(1), 8, duration, time.monotonic)

    grants = finish(run())
    check_bounds(
        grants,
        [1.0] * len(grants),
        rate=limits.request_rate,
        capacity=limits.request_capacity,
        slack=1.0,
        duration=duration,
    )


def test_both_limits_together(server: RedisServer) -> None:
    """Requests of 10 tokens at 10 requests/s but only 60 tokens/s: tokens are the bind."""
    limits = RateLimits(rpm=600, tpm=3600, burst_s=1.0)

    async def run() -> list[float]:
        limiter = redis_limiter(server, limits)
        return await hammer(lambda: limiter.acquire(10), 4, 2.0, time.monotonic)

    grants = finish(run())
    # 60 tokens of capacity + 60/s * 2 s = 180 tokens = 18 requests, +1 for slack
    assert 0.8 * 18 <= len(grants) <= 19


async def elapsed(action: Awaitable[object]) -> float:
    start = time.monotonic()
    await action
    return time.monotonic() - start


async def token_level(limiter: RedisRateLimiter) -> float:
    raw = await limiter.client.hget(limiter.key, "t")
    return limiter.limits.token_capacity if raw is None else float(raw)  # no key: full


def test_settle_redis(server: RedisServer) -> None:
    limits = RateLimits(tpm=60_000)  # 1000 tokens/s, capacity 1000

    async def run() -> None:
        # Control: no correction, the next 100 tokens wait about 0.1 s.
        control = redis_limiter(server, limits)
        await control.acquire(1000)
        assert await elapsed(control.acquire(100)) < 0.4

        # Used 500 more than estimated: the bucket is 500 in debt, 100 tokens wait ~0.6 s.
        over = redis_limiter(server, limits)
        await over.acquire(1000)
        await over.settle(1000, 1500)
        assert await over.client.exists(over.key) == 1
        assert -500 <= await token_level(over) < -400
        assert 0.5 <= await elapsed(over.acquire(100)) < 1.2

        # Used 800 less than estimated: they come back at once.
        under = redis_limiter(server, limits)
        await under.acquire(1000)
        await under.settle(1000, 200)
        assert 790 <= await token_level(under) <= 1000
        assert await elapsed(under.acquire(500)) < 0.1
        assert await under.try_acquire(1000) > 0.5  # ~300 left: no more than was given back

        # Giving back never fills the bucket past its capacity.
        full = redis_limiter(server, limits)
        await full.settle(500, 0)
        assert await full.client.exists(full.key) == 0  # full buckets are stored as no key
        assert await full.try_acquire(1000) == 0
        assert await full.try_acquire(500) > 0.4

        # Without a token limit, settle is a no-op and touches nothing.
        requests_only = redis_limiter(server, RateLimits(rpm=60))
        await requests_only.settle(10, 10_000)
        assert await requests_only.client.exists(requests_only.key) == 0

    finish(run())


def test_settle_local() -> None:
    limits = RateLimits(tpm=60_000)

    async def run() -> None:
        over = LocalRateLimiter(limits)
        await over.acquire(1000)
        await over.settle(1000, 1500)
        assert 0.5 <= await elapsed(over.acquire(100)) < 1.2

        under = LocalRateLimiter(limits)
        await under.acquire(1000)
        await under.settle(1000, 200)
        assert await elapsed(under.acquire(500)) < 0.1
        assert under.try_acquire(1000) > 0.5

        full = LocalRateLimiter(limits)
        await full.settle(500, 0)
        assert full.try_acquire(1000) == 0
        assert full.try_acquire(500) > 0.4

    finish(run())


@pytest.mark.parametrize("kind", ["redis", "local"])
def test_request_bigger_than_capacity(server: RedisServer, kind: str) -> None:
    limits = RateLimits(tpm=60_000)  # capacity 1000 tokens

    async def run() -> None:
        def make() -> RedisRateLimiter | LocalRateLimiter:
            return redis_limiter(server, limits) if kind == "redis" else LocalRateLimiter(limits)

        async def try_acquire(limiter: RedisRateLimiter | LocalRateLimiter, n: int) -> float:
            if isinstance(limiter, RedisRateLimiter):
                return await limiter.try_acquire(n)
            return limiter.try_acquire(n)

        # A full bucket lets 5000 through at once and is left 4000 in debt (~4 s to repay).
        big = make()
        assert await elapsed(big.acquire(5000)) < 0.2
        assert 3.8 <= await try_acquire(big, 1) <= 4.01

        # A half-full bucket makes it wait until full (~0.5 s), not forever.
        half = make()
        await half.acquire(500)
        assert 0.4 <= await elapsed(asyncio.wait_for(half.acquire(5000), 3.0)) < 1.2

    finish(run())


def test_keys_do_not_interfere(server: RedisServer) -> None:
    assert limiter_key("openai:gpt-5-mini") == "labeler:limit:openai:gpt-5-mini"
    limits = RateLimits(rpm=60)  # 1 request/s, capacity 1

    async def run() -> None:
        client = redis.asyncio.Redis.from_url(server.url)
        first = RedisRateLimiter(client, limiter_key("test:a:" + uuid.uuid4().hex), limits)
        second = RedisRateLimiter(client, limiter_key("test:b:" + uuid.uuid4().hex), limits)
        assert await first.try_acquire(1) == 0
        assert await first.try_acquire(1) > 0.9
        assert await second.try_acquire(1) == 0  # untouched by the first key's exhaustion
        assert await second.try_acquire(1) > 0.9
        await client.aclose()

    finish(run())


def test_keys_expire_once_full(server: RedisServer) -> None:
    async def run() -> None:
        # 10 requests/s, capacity 10: one request is refilled in 0.1 s.
        requests = redis_limiter(server, RateLimits(rpm=600))
        await requests.acquire(1)
        assert 0 < await requests.client.pttl(requests.key) <= 102
        await asyncio.sleep(0.25)
        assert await requests.client.exists(requests.key) == 0

        # 4000 tokens of debt at 1000/s, capacity 1000: full again in about 5 s.
        tokens = redis_limiter(server, RateLimits(tpm=60_000))
        await tokens.acquire(5000)
        assert 4500 < await tokens.client.pttl(tokens.key) <= 5001

    finish(run())


def test_inactive_limits_do_nothing(server: RedisServer) -> None:
    assert not RateLimits().active
    assert RateLimits(rpm=1).active and RateLimits(tpm=1).active

    async def run() -> None:
        limiter = redis_limiter(server, RateLimits())
        for _ in range(100):
            await limiter.acquire(10**9)
        await limiter.settle(0, 10**9)
        assert await limiter.client.exists(limiter.key) == 0
        local = LocalRateLimiter(RateLimits())
        assert await elapsed(asyncio.gather(*(local.acquire(10**9) for _ in range(100)))) < 0.1

    finish(run())


def test_decoded_client_and_flushed_scripts(server: RedisServer) -> None:
    """Works with decode_responses=True, and after Redis forgot the script (a restart)."""

    async def run() -> None:
        client = redis.asyncio.Redis.from_url(server.url, decode_responses=True)
        limiter = RedisRateLimiter(client, fresh_key(), RateLimits(rpm=60))
        assert await limiter.try_acquire(1) == 0
        await client.script_flush()
        wait = await limiter.try_acquire(1)
        assert isinstance(wait, float) and 0.9 < wait <= 1.0
        await client.aclose()

    finish(run())


def test_connection_errors_propagate() -> None:
    async def run() -> None:
        # redis-py retries connection errors 3 times with backoff by default; not here
        client = redis.asyncio.Redis(port=free_port(), retry=Retry(NoBackoff(), 0))
        limiter = RedisRateLimiter(client, fresh_key(), RateLimits(rpm=60, tpm=600))
        with pytest.raises(redis.ConnectionError):
            await limiter.acquire(1)
        with pytest.raises(redis.ConnectionError):
            await limiter.settle(1, 2)
        await client.aclose()

    finish(run())


def test_negative_counts_rejected(server: RedisServer) -> None:
    async def run() -> None:
        limiter = redis_limiter(server, RateLimits(tpm=600))
        with pytest.raises(ValueError):
            await limiter.acquire(-1)
        with pytest.raises(ValueError):
            await limiter.settle(-1, 5)
        with pytest.raises(ValueError):
            await LocalRateLimiter(RateLimits(tpm=600)).settle(5, -1)

    finish(run())


@pytest.mark.parametrize(
    "fields",
    [
        {"rpm": 0},
        {"rpm": -1},
        {"tpm": 0},
        {"tpm": -5.5},
        {"burst_s": 0},
        {"burst_s": -1},
        {"rpm": float("inf")},
        {"tpm": float("nan")},
        {"rpm": 60, "typo": 1},
    ],
)
def test_limits_validation(fields: dict[str, float]) -> None:
    with pytest.raises(pydantic.ValidationError):
        RateLimits.model_validate(fields)


def test_limits_capacities() -> None:
    limits = RateLimits(rpm=600, tpm=6000, burst_s=2.0)
    assert limits.request_rate == 10 and limits.request_capacity == 20
    assert limits.token_rate == 100 and limits.token_capacity == 200
    tiny = RateLimits(rpm=6, tpm=6)  # under one per second: capacity is still one
    assert tiny.request_capacity == 1 and tiny.token_capacity == 1
