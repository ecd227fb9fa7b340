"""The fleet-wide rate limiter against a real private redis-server, and its in-process twin.

The central check is the limiter's safety property, which holds however loaded the
machine is: over every window of W seconds starting at a grant, no more than
``capacity + rate * W`` got through, give or take the grants each acquirer had in hand
but not yet stamped (see :func:`check_bounds`). Progress is counted, not timed: every
acquirer gets the grants it asked for. Waits are read from the limiter's answer at rates
slow enough that a stalled test process (seconds) cannot change the outcome.
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
from subprocess import PIPE
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


def finish(work: Coroutine[None, None, T], timeout: float = 300.0) -> T:
    """Run ``work`` on a new event loop, failing rather than hanging if a limiter deadlocks
    (the timeout is only that guard: a loaded machine may take many times the work's
    few seconds)."""

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
    times: Sequence[float], weights: Sequence[float], *, rate: float, capacity: float,
    in_hand: float,
) -> None:  # fmt: skip
    """No more than ``capacity + rate * W`` within any window of W seconds (1, 2, 4 and the
    whole run, the tightest), plus ``in_hand``: an acquirer stamps its grant after the
    limiter made it, so a window of stamps may also hold one earlier grant per acquirer
    (it asks again only after stamping), whatever the delay. That is the acquirers'
    number times a grant's weight, and no timing assumption."""
    assert times, "nothing was granted"
    for window in (1.0, 2.0, 4.0):
        worst = most_in_window(times, weights, window)
        bound = capacity + rate * window + in_hand
        assert worst <= bound, f"{worst} granted within {window}s, bound {bound}"
    span = max(times) - min(times)
    bound = capacity + rate * span + in_hand
    assert sum(weights) <= bound, f"{sum(weights)} granted within {span:.2f}s, bound {bound}"


async def hammer(
    acquire: Callable[[], Awaitable[None]], tasks: int, count: int, clock: Callable[[], float]
) -> list[float]:
    """``tasks`` acquirers taking ``count`` grants between them; the grant times."""
    grants: list[float] = []
    left = count

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await acquire()
            grants.append(clock())

    await asyncio.gather(*(worker() for _ in range(tasks)))
    assert len(grants) == count  # every acquirer got what it asked for
    return grants


# One worker process: its own client and several tasks taking `count` grants between them,
# once every process is ready (its `ready` file written) and the test said go.
WORKER = """
import asyncio, json, sys, time
from pathlib import Path
import redis.asyncio
from labeler.judges.ratelimit import RateLimits, RedisRateLimiter

url, key, rpm, folder, name, count, tasks = sys.argv[1:8]

async def main() -> None:
    client = redis.asyncio.Redis.from_url(url)
    limiter = RedisRateLimiter(client, key, RateLimits(rpm=float(rpm), burst_s=1.0))
    await client.ping()
    Path(folder, name + ".ready").touch()
    while not Path(folder, "go").exists():
        await asyncio.sleep(0.01)
    grants = []
    left = int(count)

    async def worker():
        nonlocal left
        while left > 0:
            left -= 1
            await limiter.acquire(1)
            grants.append(time.time())

    await asyncio.gather(*(worker() for _ in range(int(tasks))))
    await client.aclose()
    sys.stdout.write(json.dumps(grants))

asyncio.run(main())
"""
GUARD_S = 300.0  # turns a hang into a failure; the work takes seconds even when loaded


def test_requests_across_processes(server: RedisServer, tmp_path: Path) -> None:
    limits = RateLimits(rpm=600, burst_s=1.0)
    processes, tasks, count = 3, 4, 15
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC), env.get("PYTHONPATH")]))
    args = [server.url, fresh_key(), "600", str(tmp_path)]
    command = [sys.executable, "-c", WORKER, *args]
    workers = [
        subprocess.Popen([*command, f"p{i}", str(count), str(tasks)], env=env, stdout=PIPE)
        for i in range(processes)
    ]
    deadline = time.monotonic() + GUARD_S
    while len(list(tmp_path.glob("*.ready"))) < processes:  # all started and imported
        assert all(w.poll() is None for w in workers) and time.monotonic() < deadline
        time.sleep(0.05)
    (tmp_path / "go").touch()
    grants: list[float] = []
    for worker in workers:
        out, _ = worker.communicate(timeout=GUARD_S)
        assert worker.returncode == 0
        mine = json.loads(out)
        assert len(mine) == count  # every process got all it asked for
        grants.extend(mine)
    # 45 grants: a limit kept per process instead of in Redis lets them through three
    # times as fast, about 45 within half a second, against a bound of 27 there
    check_bounds(grants, [1.0] * len(grants), rate=limits.request_rate,
                 capacity=limits.request_capacity, in_hand=processes * tasks)  # fmt: skip


@pytest.mark.parametrize("kind", ["redis", "local"])
def test_tokens_per_minute(server: RedisServer, kind: str) -> None:
    limits = RateLimits(tpm=6000, burst_s=1.0)  # 100 tokens/s, capacity 100

    async def run() -> list[float]:
        limiter: RateLimiter = (
            redis_limiter(server, limits) if kind == "redis" else LocalRateLimiter(limits)
        )
        return await hammer(lambda: limiter.acquire(50), 4, 10, time.monotonic)

    grants = finish(run())
    check_bounds(grants, [50.0] * len(grants), rate=limits.token_rate,
                 capacity=limits.token_capacity, in_hand=4 * 50.0)  # fmt: skip


def test_local_requests_per_minute() -> None:
    limits = RateLimits(rpm=600, burst_s=1.0)

    async def run() -> list[float]:
        limiter = LocalRateLimiter(limits)
        return await hammer(lambda: limiter.acquire(1), 8, 30, time.monotonic)

    grants = finish(run())
    check_bounds(grants, [1.0] * len(grants), rate=limits.request_rate,
                 capacity=limits.request_capacity, in_hand=8)  # fmt: skip


def test_both_limits_together(server: RedisServer) -> None:
    """Requests of 10 tokens at 10 requests/s but only 60 tokens/s: tokens are the bind."""
    limits = RateLimits(rpm=600, tpm=3600, burst_s=1.0)

    async def run() -> list[float]:
        limiter = redis_limiter(server, limits)
        return await hammer(lambda: limiter.acquire(10), 4, 18, time.monotonic)

    grants = finish(run())
    check_bounds(grants, [1.0] * len(grants), rate=limits.request_rate,
                 capacity=limits.request_capacity, in_hand=4)  # fmt: skip
    # the tokens bind: 180 tokens take at least (180 - 60 - 40) / 60 = 1.3 s, where the
    # request limit alone would let the 18 through in 0.4 s
    check_bounds(grants, [10.0] * len(grants), rate=limits.token_rate,
                 capacity=limits.token_capacity, in_hand=4 * 10.0)  # fmt: skip


async def token_level(limiter: RedisRateLimiter) -> float:
    raw = await limiter.client.hget(limiter.key, "t")
    return limiter.limits.token_capacity if raw is None else float(raw)  # no key: full


# 10 tokens a second with a capacity of 1000: a wait the limiter answers is tens of seconds,
# so a test process stalled for a few seconds between two steps still reads the same
# answer within the margins below, and nothing here waits for real
SLOW = RateLimits(tpm=600, burst_s=100)
STALL_S = 10.0  # the stall each check below tolerates


def test_settle_redis(server: RedisServer) -> None:
    async def run() -> None:
        # Control: no correction, 800 more tokens wait about 80 s.
        control = redis_limiter(server, SLOW)
        assert await control.try_acquire(1000) == 0
        assert 80 - STALL_S < await control.try_acquire(800) <= 80

        # Used 500 more than estimated: the bucket is 500 in debt, 100 tokens wait ~60 s.
        over = redis_limiter(server, SLOW)
        assert await over.try_acquire(1000) == 0
        await over.settle(1000, 1500)
        assert await over.client.exists(over.key) == 1
        assert -500 <= await token_level(over) < -500 + 10 * STALL_S
        assert 60 - STALL_S < await over.try_acquire(100) <= 60

        # Used 800 less than estimated: they come back at once, and no more.
        under = redis_limiter(server, SLOW)
        assert await under.try_acquire(1000) == 0
        await under.settle(1000, 200)
        assert 800 <= await token_level(under) <= 1000
        assert await under.try_acquire(800) == 0
        assert 80 - STALL_S < await under.try_acquire(800) <= 80

        # Giving back never fills the bucket past its capacity.
        full = redis_limiter(server, SLOW)
        await full.settle(500, 0)
        assert await full.client.exists(full.key) == 0  # full buckets are stored as no key
        assert await full.try_acquire(1000) == 0
        assert 50 - STALL_S < await full.try_acquire(500) <= 50

        # Without a token limit, settle is a no-op and touches nothing.
        requests_only = redis_limiter(server, RateLimits(rpm=60))
        await requests_only.settle(10, 10_000)
        assert await requests_only.client.exists(requests_only.key) == 0

    finish(run())


def test_settle_local() -> None:
    async def run() -> None:
        over = LocalRateLimiter(SLOW)
        assert over.try_acquire(1000) == 0
        await over.settle(1000, 1500)
        assert 60 - STALL_S < over.try_acquire(100) <= 60

        under = LocalRateLimiter(SLOW)
        assert under.try_acquire(1000) == 0
        await under.settle(1000, 200)
        assert under.try_acquire(800) == 0
        assert 80 - STALL_S < under.try_acquire(800) <= 80

        full = LocalRateLimiter(SLOW)
        await full.settle(500, 0)
        assert full.try_acquire(1000) == 0
        assert 50 - STALL_S < full.try_acquire(500) <= 50

    finish(run())


@pytest.mark.parametrize("kind", ["redis", "local"])
def test_request_bigger_than_capacity(server: RedisServer, kind: str) -> None:
    async def run() -> None:
        def make() -> RedisRateLimiter | LocalRateLimiter:
            return redis_limiter(server, SLOW) if kind == "redis" else LocalRateLimiter(SLOW)

        async def try_acquire(limiter: RedisRateLimiter | LocalRateLimiter, n: int) -> float:
            if isinstance(limiter, RedisRateLimiter):
                return await limiter.try_acquire(n)
            return limiter.try_acquire(n)

        # A full bucket lets 5000 through at once and is left 4000 in debt (~400 s to repay).
        big = make()
        assert await try_acquire(big, 5000) == 0
        assert 400 - STALL_S < await try_acquire(big, 1) <= 400.1

        # A half-full bucket makes it wait until full (~50 s), not forever (450 s).
        half = make()
        assert await try_acquire(half, 500) == 0
        assert 50 - STALL_S < await try_acquire(half, 5000) <= 50

    finish(run())


def test_a_call_bigger_than_capacity_is_let_through_once_the_bucket_fills() -> None:
    async def run() -> None:
        limiter = LocalRateLimiter(RateLimits(tpm=60_000))  # capacity 1000, full in 1 s
        await limiter.acquire(500)
        await limiter.acquire(5000)  # waits for a full bucket, not for 5000 tokens
        assert limiter.try_acquire(1) > 0  # and leaves the debt behind

    finish(run())


def test_keys_do_not_interfere(server: RedisServer) -> None:
    assert limiter_key("openai:gpt-5-mini") == "labeler:limit:openai:gpt-5-mini"
    limits = RateLimits(rpm=0.6)  # one request per 100 s, capacity 1

    async def run() -> None:
        client = redis.asyncio.Redis.from_url(server.url)
        first = RedisRateLimiter(client, limiter_key("test:a:" + uuid.uuid4().hex), limits)
        second = RedisRateLimiter(client, limiter_key("test:b:" + uuid.uuid4().hex), limits)
        assert await first.try_acquire(1) == 0
        assert await first.try_acquire(1) > 100 - STALL_S
        assert await second.try_acquire(1) == 0  # untouched by the first key's exhaustion
        assert await second.try_acquire(1) > 100 - STALL_S
        await client.aclose()

    finish(run())


def test_keys_expire_once_full(server: RedisServer) -> None:
    async def run() -> None:
        # 10 requests/s, capacity 10: one request is refilled in 0.1 s, and the key goes
        fast = redis_limiter(server, RateLimits(rpm=600))
        await fast.acquire(1)
        assert await fast.client.pttl(fast.key) <= 100  # -2 once gone already
        await asyncio.sleep(0.25)
        assert await fast.client.exists(fast.key) == 0

        # one request per 100 s: the key lives until the bucket is full again
        requests = redis_limiter(server, RateLimits(rpm=0.6))
        await requests.acquire(1)
        assert (100 - STALL_S) * 1000 < await requests.client.pttl(requests.key) <= 100_000

        # 4000 tokens of debt at 10/s, capacity 1000: full again in about 500 s.
        tokens = redis_limiter(server, SLOW)
        await tokens.acquire(5000)
        assert (500 - STALL_S) * 1000 < await tokens.client.pttl(tokens.key) <= 500_000

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
        await asyncio.gather(*(local.acquire(10**9) for _ in range(100)))
        assert all(local.try_acquire(10**9) == 0 for _ in range(100))

    finish(run())


def test_decoded_client_and_flushed_scripts(server: RedisServer) -> None:
    """Works with decode_responses=True, and after Redis forgot the script (a restart)."""

    async def run() -> None:
        client = redis.asyncio.Redis.from_url(server.url, decode_responses=True)
        limiter = RedisRateLimiter(client, fresh_key(), RateLimits(rpm=0.6))
        assert await limiter.try_acquire(1) == 0
        await client.script_flush()
        wait = await limiter.try_acquire(1)
        assert isinstance(wait, float) and 100 - STALL_S < wait <= 100
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
