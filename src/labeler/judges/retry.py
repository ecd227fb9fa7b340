"""The one retry policy for every backend: exponential backoff with full jitter on
transient errors (429, 5xx, timeouts, broken connections), the server's Retry-After
honoured when it sends one, and no retry on anything else."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import TypeVar

from labeler.judges.backend import TransientError

log = logging.getLogger(__name__)

R = TypeVar("R")

MAX_RETRY_AFTER = 600.0


@dataclass(frozen=True)
class RetryPolicy:
    """``max_attempts`` calls in all; between them ``base_delay * 2**n`` seconds at most
    (full jitter), capped at ``max_delay``, or the server's Retry-After plus a little
    jitter."""

    max_attempts: int = 6
    base_delay: float = 1.0
    max_delay: float = 60.0
    reschedule_rate_limits: bool = False
    """Raise a rate limit (429) at once, for an executor that reschedules the work rather
    than waiting in a worker slot (the Celery fleet)."""

    def delay(self, failed_attempts: int, error: TransientError, rng: random.Random) -> float:
        if error.retry_after is not None:
            return min(error.retry_after, MAX_RETRY_AFTER) + rng.uniform(0, 0.1)
        return rng.uniform(0, min(self.max_delay, self.base_delay * 2 ** (failed_attempts - 1)))


def should_retry(error: BaseException) -> bool:
    return isinstance(error, TransientError)


def parse_retry_after(headers: object) -> float | None:
    """Seconds from ``retry-after-ms`` or ``retry-after`` (seconds or an HTTP date)."""
    get = getattr(headers, "get", None)
    if get is None:
        return None
    millis = get("retry-after-ms")
    if millis is not None:
        try:
            return max(0.0, float(millis) / 1000)
        except ValueError:
            pass
    value = get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        import datetime as dt

        when = parsedate_to_datetime(str(value))
        return max(0.0, (when - dt.datetime.now(when.tzinfo)).total_seconds())
    except (TypeError, ValueError):
        return None


async def with_retries(
    call: Callable[[], Awaitable[R]],
    policy: RetryPolicy,
    what: str,
    rng: random.Random | None = None,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> R:
    """Run ``call`` until it succeeds, a non-transient error escapes, or
    ``policy.max_attempts`` calls have failed (the last ``TransientError`` is raised,
    its reason saying how many attempts were made)."""
    rng = rng or random.Random()
    attempt = 0
    while True:
        attempt += 1
        try:
            return await call()
        except TransientError as exc:
            if policy.reschedule_rate_limits and exc.kind == "rate_limited":
                raise
            if attempt >= policy.max_attempts:
                exc.reason = f"{exc.reason} (gave up after {attempt} attempts)"
                exc.args = (exc.reason,)
                raise
            pause = policy.delay(attempt, exc, rng)
            log.info("%s: %s; retry %d in %.1f s", what, exc.reason, attempt, pause)
            await sleep(pause)
