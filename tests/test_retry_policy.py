"""The one retry policy: what is retried, how long it waits, when it gives up."""

from __future__ import annotations

import asyncio
import email.utils
import random
import time

import pytest

from labeler.judges.backend import InvalidReply, RequestRejected, TransientError
from labeler.judges.retry import RetryPolicy, parse_retry_after, with_retries


def test_retry_after_headers_in_seconds_milliseconds_and_dates() -> None:
    assert parse_retry_after({"retry-after": "7"}) == 7.0
    assert parse_retry_after({"retry-after-ms": "1500", "retry-after": "9"}) == 1.5
    date = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 <= (parse_retry_after({"retry-after": date}) or 0) <= 31
    assert parse_retry_after({"retry-after": "soon"}) is None
    assert parse_retry_after({}) is None


def test_backoff_has_full_jitter_under_a_cap_and_honours_retry_after() -> None:
    policy = RetryPolicy(base_delay=1.0, max_delay=8.0)
    rng = random.Random(0)
    plain = TransientError("HTTP 500", kind="server_error")
    delays = [policy.delay(n, plain, rng) for n in (1, 2, 3, 4, 5, 6) for _ in range(50)]
    assert min(delays) >= 0 and max(delays) <= 8.0
    assert len({round(d, 3) for d in delays}) > 100  # jittered, not fixed steps
    told = TransientError("HTTP 429", retry_after=12.0, kind="rate_limited")
    assert 12.0 <= policy.delay(1, told, rng) <= 12.1


def _run(calls: list[BaseException | str], policy: RetryPolicy) -> tuple[object, list[float]]:
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    async def call() -> str:
        outcome = calls.pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    try:
        result: object = asyncio.run(with_retries(call, policy, "test", random.Random(0), sleep))
    except Exception as exc:
        result = exc
    return result, slept


def test_transient_errors_are_retried_until_success() -> None:
    calls: list[BaseException | str] = [
        TransientError("HTTP 429", retry_after=2.0, kind="rate_limited"),
        TransientError("timeout", kind="timeout"),
        "ok",
    ]
    result, slept = _run(calls, RetryPolicy())
    assert result == "ok" and len(slept) == 2 and slept[0] >= 2.0


def test_gives_up_after_max_attempts_saying_so() -> None:
    calls: list[BaseException | str] = [TransientError("HTTP 503", kind="server_error")] * 3
    result, slept = _run(list(calls), RetryPolicy(max_attempts=3))
    assert isinstance(result, TransientError) and len(slept) == 2
    assert "gave up after 3 attempts" in result.reason


@pytest.mark.parametrize("error", [RequestRejected("HTTP 401"), InvalidReply("bad JSON")])
def test_request_errors_and_invalid_replies_are_not_retried_here(error: Exception) -> None:
    result, slept = _run([error, "never"], RetryPolicy())
    assert result is error and slept == []
