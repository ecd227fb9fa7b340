"""Redis calls that wait out a Redis restart instead of failing the work."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import redis
from kombu.exceptions import OperationalError

log = logging.getLogger(__name__)
T = TypeVar("T")

RETRY_FOR_S = 600.0
MAX_DELAY_S = 5.0
UNREACHABLE = (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError, OperationalError)


def retrying(op: Callable[[], T], what: str, retry_for: float = RETRY_FOR_S) -> T:
    """``op()``, tried again with backoff while Redis is unreachable, for up to
    ``retry_for`` seconds."""
    deadline = time.monotonic() + retry_for
    delay = 0.2
    while True:
        try:
            return op()
        except UNREACHABLE as exc:
            _give_up_or_warn(exc, what, deadline, delay)
            time.sleep(delay)
            delay = min(delay * 2, MAX_DELAY_S)


async def retrying_async(
    op: Callable[[], Awaitable[T]], what: str, retry_for: float = RETRY_FOR_S
) -> T:
    """``await op()``, like :func:`retrying`, sleeping without blocking the loop."""
    deadline = time.monotonic() + retry_for
    delay = 0.2
    while True:
        try:
            return await op()
        except UNREACHABLE as exc:
            _give_up_or_warn(exc, what, deadline, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, MAX_DELAY_S)


def _give_up_or_warn(exc: Exception, what: str, deadline: float, delay: float) -> None:
    """``exc`` raised again once past the deadline; else the coming pause logged."""
    if time.monotonic() > deadline:
        raise exc
    log.warning("Redis unreachable while %s (%s); retrying in %.1f s", what, exc, delay)
