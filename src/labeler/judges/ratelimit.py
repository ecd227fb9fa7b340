"""Fleet-wide rate limits for LLM provider calls: requests per minute and tokens per minute.

How it works
------------
Each limited dimension (requests, tokens) is a bucket that fills continuously at its
rate (``rpm / 60`` or ``tpm / 60`` per second) up to a capacity of ``burst_s`` seconds
of that rate, but never less than 1. A new bucket starts full. A call may start when the
request bucket holds at least one request and the token bucket holds at least
``min(tokens, token capacity)``; starting takes 1 from the request bucket and the whole
estimate from the token bucket. The token level may therefore go below zero: one call
larger than the capacity still gets through once the bucket is full (no deadlock), and
the debt it leaves delays the calls after it, so the long-run average stays at the rate.
In any window of ``W`` seconds at most ``capacity + rate * W`` calls (or tokens, plus the
size of one call) are let through.

When the call returns and its real usage is known, :meth:`RateLimiter.settle` debits the
difference from the estimate; a negative difference hands tokens back (capped at the
capacity, like a refill).

Two implementations share this arithmetic:

* :class:`LocalRateLimiter` keeps the buckets in memory on :func:`time.monotonic`, for one
  process and one event loop. Waiters queue behind a lock, so they start in arrival order.
* :class:`RedisRateLimiter` keeps them in one Redis hash per provider and model (see
  :func:`limiter_key`), shared by every worker process, run and machine. A Lua script
  refills, checks and debits in one atomic step and reads the clock with Redis's own
  ``TIME``, so machines whose clocks disagree still agree on the buckets. When the call
  may not start yet the script debits nothing and answers how long until it could;
  the caller sleeps that long plus up to 10% random jitter (so a crowd of waiters does
  not wake in lockstep) and asks again. Each write sets the key to expire when both
  buckets would be full again (or deletes it if they already are): a missing key and
  full buckets mean the same thing, so idle limits leave nothing behind.

Redis errors (connection refused, timeouts) are not caught here; callers retry.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import TYPE_CHECKING, Protocol

import pydantic

if TYPE_CHECKING:
    import redis.asyncio

__all__ = [
    "LocalRateLimiter",
    "RateLimiter",
    "RateLimits",
    "RedisRateLimiter",
    "limiter_key",
]

KEY_PREFIX = "labeler:limit:"
JITTER = 0.1  # waits are stretched by a random factor in [1, 1 + JITTER)


class RateLimits(pydantic.BaseModel):
    """Limits for one provider and model; a limit left unset is not enforced."""

    model_config = pydantic.ConfigDict(extra="forbid", allow_inf_nan=False)

    rpm: float | None = pydantic.Field(default=None, gt=0)
    """Requests per minute."""
    tpm: float | None = pydantic.Field(default=None, gt=0)
    """Tokens per minute, input and output together."""
    burst_s: float = pydantic.Field(default=1.0, gt=0)
    """Bucket capacity, in seconds of the rate."""

    @property
    def active(self) -> bool:
        return self.rpm is not None or self.tpm is not None

    @property
    def request_rate(self) -> float:
        """Requests per second; 0 when requests are not limited."""
        return 0.0 if self.rpm is None else self.rpm / 60.0

    @property
    def token_rate(self) -> float:
        """Tokens per second; 0 when tokens are not limited."""
        return 0.0 if self.tpm is None else self.tpm / 60.0

    @property
    def request_capacity(self) -> float:
        return max(1.0, self.request_rate * self.burst_s)

    @property
    def token_capacity(self) -> float:
        return max(1.0, self.token_rate * self.burst_s)


def limiter_key(judge_name: str) -> str:
    """The Redis key for a judge's limits, e.g. ``labeler:limit:openai:gpt-5-mini``."""
    return KEY_PREFIX + judge_name


class RateLimiter(Protocol):
    async def acquire(self, tokens: int) -> None:
        """Wait until one request estimated at ``tokens`` tokens may start, then debit it."""
        ...

    async def settle(self, estimated: int, actual: int) -> None:
        """Debit ``actual - estimated`` tokens once the real usage is known (< 0 gives back)."""
        ...


def _check_count(name: str, value: int) -> None:
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")


def jittered(wait: float) -> float:
    return wait * (1.0 + JITTER * random.random())


class LocalRateLimiter:
    """The two buckets in this process's memory; safe for many tasks on one event loop."""

    def __init__(self, limits: RateLimits) -> None:
        self.limits = limits
        self._requests = limits.request_capacity
        self._tokens = limits.token_capacity
        self._stamp = time.monotonic()
        self._queue = asyncio.Lock()

    def _refill(self) -> None:
        now = time.monotonic()
        elapsed = max(0.0, now - self._stamp)
        self._stamp = now
        limits = self.limits
        if limits.rpm is not None:
            self._requests = min(
                limits.request_capacity, self._requests + elapsed * limits.request_rate
            )
        if limits.tpm is not None:
            self._tokens = min(limits.token_capacity, self._tokens + elapsed * limits.token_rate)

    def try_acquire(self, tokens: int) -> float:
        """Debit one request of ``tokens`` and return 0 if it may start now; otherwise
        debit nothing and return the seconds until it could."""
        _check_count("tokens", tokens)
        self._refill()
        limits = self.limits
        wait = 0.0
        if limits.rpm is not None and self._requests < 1.0:
            wait = max(wait, (1.0 - self._requests) / limits.request_rate)
        if limits.tpm is not None:
            need = min(float(tokens), limits.token_capacity)
            if self._tokens < need:
                wait = max(wait, (need - self._tokens) / limits.token_rate)
        if wait > 0.0:
            return wait
        if limits.rpm is not None:
            self._requests -= 1.0
        if limits.tpm is not None:
            self._tokens -= tokens
        return 0.0

    async def acquire(self, tokens: int) -> None:
        _check_count("tokens", tokens)
        if not self.limits.active:
            return
        async with self._queue:  # first come, first served: only the head of the line waits
            while (wait := self.try_acquire(tokens)) > 0.0:
                await asyncio.sleep(wait)

    async def settle(self, estimated: int, actual: int) -> None:
        _check_count("estimated", estimated)
        _check_count("actual", actual)
        if self.limits.tpm is None or actual == estimated:
            return
        self._refill()
        self._tokens = min(self.limits.token_capacity, self._tokens - (actual - estimated))


# KEYS[1]: the hash. ARGV: mode ("acquire" or "settle"), request rate per second (0: not
# limited), request capacity, token rate per second (0: not limited), token capacity, and
# n: the tokens to acquire, or for settle the tokens to debit (negative gives back).
# Fields: r (request level), t (token level), ts (Redis time of the last write, seconds),
# written with %.17g: Lua's tostring keeps 14 digits, too few for a timestamp in seconds.
# Returns "0" when granted (or settled), else the seconds to wait, as a string: Redis turns
# a Lua number into an integer reply, which would truncate 0.35 s to 0.
_SCRIPT = """
local key = KEYS[1]
local mode = ARGV[1]
local rr = tonumber(ARGV[2])
local rc = tonumber(ARGV[3])
local tr = tonumber(ARGV[4])
local tc = tonumber(ARGV[5])
local n = tonumber(ARGV[6])

local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000

local state = redis.call('HMGET', key, 'r', 't', 'ts')
local r = tonumber(state[1]) or rc
local t = tonumber(state[2]) or tc
local ts = tonumber(state[3]) or now
local elapsed = math.max(0, now - ts)
if rr > 0 then r = math.min(rc, r + elapsed * rr) end
if tr > 0 then t = math.min(tc, t + elapsed * tr) end

if mode == 'acquire' then
  local wait = 0
  if rr > 0 and r < 1 then wait = math.max(wait, (1 - r) / rr) end
  if tr > 0 then
    local need = math.min(n, tc)
    if t < need then wait = math.max(wait, (need - t) / tr) end
  end
  if wait > 0 then return string.format('%.17g', wait) end
  if rr > 0 then r = r - 1 end
  if tr > 0 then t = t - n end
elseif mode == 'settle' then
  if tr > 0 then t = math.min(tc, t - n) end
else
  return redis.error_reply('ratelimit: unknown mode ' .. tostring(mode))
end

local full = 0
if rr > 0 then full = math.max(full, (rc - r) / rr) end
if tr > 0 then full = math.max(full, (tc - t) / tr) end
if full > 0 then
  redis.call('HSET', key, 'r', string.format('%.17g', r), 't', string.format('%.17g', t),
    'ts', string.format('%.17g', now))
  redis.call('PEXPIRE', key, math.ceil(full * 1000))
else
  redis.call('DEL', key)  -- full buckets and no key are the same state
end
return '0'
"""


class RedisRateLimiter:
    """The two buckets in one Redis hash, shared by every process that uses the same key."""

    def __init__(self, client: redis.asyncio.Redis, key: str, limits: RateLimits) -> None:
        self.client = client
        self.key = key
        self.limits = limits
        self._script = client.register_script(_SCRIPT)

    async def _run(self, mode: str, n: int) -> float:
        limits = self.limits
        reply = await self._script(
            keys=[self.key],
            args=[
                mode,
                repr(limits.request_rate),
                repr(limits.request_capacity),
                repr(limits.token_rate),
                repr(limits.token_capacity),
                str(n),
            ],
        )
        # bytes, or str when the client was made with decode_responses=True
        return float(reply.decode() if isinstance(reply, bytes) else reply)

    async def try_acquire(self, tokens: int) -> float:
        """Debit one request of ``tokens`` and return 0 if it may start now; otherwise
        debit nothing and return the seconds until it could."""
        _check_count("tokens", tokens)
        if not self.limits.active:
            return 0.0
        return await self._run("acquire", tokens)

    async def acquire(self, tokens: int) -> None:
        while (wait := await self.try_acquire(tokens)) > 0.0:
            await asyncio.sleep(jittered(wait))

    async def settle(self, estimated: int, actual: int) -> None:
        _check_count("estimated", estimated)
        _check_count("actual", actual)
        if self.limits.tpm is None or actual == estimated:
            return
        await self._run("settle", actual - estimated)
