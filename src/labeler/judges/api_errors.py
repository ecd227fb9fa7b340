"""Mapping the OpenAI and Anthropic SDKs' exceptions (they share a shape) onto the
backend errors the retry policy understands."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType

from labeler.judges.backend import (
    BackendError,
    NotFound,
    RequestRejected,
    TransientError,
    Unauthorized,
)
from labeler.judges.retry import parse_retry_after

RETRYABLE_STATUS = {408, 409, 429}
FLEX_UNAVAILABLE = "resource_unavailable"  # OpenAI's 429 code when flex has no capacity


def backend_error(exc: Exception, sdk: ModuleType, timeout: float) -> BackendError | None:
    """The backend error for an SDK exception, or None if ``exc`` is not the SDK's.

    429, 408, 409 and 5xx are transient (429 carries Retry-After); timeouts and broken
    connections too; every other HTTP error is a rejected request (401 and 403:
    unauthorized; 404: not found; both stop a labeling)."""
    if isinstance(exc, sdk.APITimeoutError):
        return TransientError(f"no reply within {timeout:g} s", kind="timeout")
    if isinstance(exc, sdk.APIConnectionError):
        return TransientError(str(exc), kind="connection")
    if isinstance(exc, sdk.APIStatusError):
        status = int(exc.status_code)
        detail = _message(exc)
        if status == 429:
            if _code(exc) == FLEX_UNAVAILABLE:  # flex processing out of capacity: not charged
                detail = f"flex capacity unavailable: {detail}"
            return TransientError(
                f"HTTP 429: {detail}", parse_retry_after(exc.response.headers), "rate_limited"
            )
        if status >= 500 or status in RETRYABLE_STATUS:
            return TransientError(
                f"HTTP {status}: {detail}", parse_retry_after(exc.response.headers), "server_error"
            )
        if status in (401, 403):
            return Unauthorized(f"HTTP {status}: {detail}")
        if status == 404:
            return NotFound(f"HTTP {status}: {detail}")
        return RequestRejected(f"HTTP {status}: {detail}")
    return None


def _code(exc: Exception) -> str | None:
    body = getattr(exc, "body", None)
    error = body.get("error", body) if isinstance(body, dict) else None
    code = error.get("code") if isinstance(error, dict) else None
    return code if isinstance(code, str) else None


def _message(exc: Exception) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return str(error["message"])[:300]
    return str(getattr(exc, "message", exc))[:300]


@contextmanager
def mapped_errors(sdk: ModuleType, timeout: float) -> Iterator[None]:
    """Re-raise the SDK's exceptions as backend errors; anything else passes unchanged."""
    try:
        yield
    except Exception as exc:
        mapped = backend_error(exc, sdk, timeout)
        if mapped is None:
            raise
        raise mapped from exc
