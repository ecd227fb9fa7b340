"""The providers' batch APIs, through their official SDKs: OpenAI Batch (a JSONL file
uploaded, then a batch on one endpoint) and Anthropic Message Batches.

Both take the same request bodies as the synchronous calls, each under a ``custom_id``,
and give results back in any order, joined by ``custom_id``. What differs is hidden
behind :class:`BatchApi`: submitting, a batch's state, its results as
:class:`LineResult` s, cancelling, and finding a batch whose creation was cut off before
its id was recorded (OpenAI: by the submission id in the batch's metadata; Anthropic,
whose batches carry no metadata: by the ``custom_id`` s in the results of the batches
created since).
"""

from __future__ import annotations

import datetime as dt
import importlib
import json
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from labeler.judges.anthropic_backend import AnthropicBackend
from labeler.judges.api_errors import mapped_errors
from labeler.judges.backend import (
    BackendError,
    NotFound,
    RequestRejected,
    TransientError,
    Unauthorized,
)
from labeler.judges.openai_backend import OpenAIBackend

Outcome = Literal["ok", "error", "expired", "cancelled"]
SUBMISSION_KEY = "labeler_submission"
FIND_SLACK_S = 300.0  # clocks differ: look at batches made this long before the record
OPENAI_ENDED = frozenset({"completed", "failed", "expired", "cancelled"})
ANTHROPIC_ERROR_STATUS = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "overloaded_error": 529,
}


@dataclass(frozen=True)
class BatchState:
    status: str
    """The provider's word for it (OpenAI: in_progress, completed, ...; Anthropic:
    in_progress, canceling, ended)."""
    ended: bool
    counts: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class LineResult:
    """One request's result: a reply (``ok``), an error with its HTTP status, or a
    request the batch never ran (``expired``, ``cancelled``)."""

    custom_id: str
    outcome: Outcome
    reply: dict[str, Any] | None = None
    status: int | None = None
    message: str = ""


class BatchApi(Protocol):
    provider: str
    max_requests: int
    max_bytes: int

    def line_size(self, custom_id: str, endpoint: str, body: dict[str, Any]) -> int:
        """Bytes the request takes in a submission."""
        ...

    async def submit(
        self, local_id: str, endpoint: str, lines: Sequence[tuple[str, dict[str, Any]]],
        on_file: Callable[[str], None],
    ) -> str:  # fmt: skip
        """Submit ``(custom_id, body)`` lines as one batch; its id. ``on_file`` hears of
        an uploaded input file before the batch is made."""
        ...

    async def state(self, batch_id: str) -> BatchState: ...

    async def results(self, batch_id: str) -> list[LineResult]: ...

    async def cancel(self, batch_id: str) -> None: ...

    async def find(
        self, local_id: str, made_at: float, custom_ids: set[str], known: set[str]
    ) -> str | Literal["wait"] | None:
        """The batch a cut-off submission made, None if it made none, or ``"wait"`` when
        that cannot be told yet."""
        ...


def error_for(status: int | None, message: str) -> BackendError:
    """A result line's error as the backend error a synchronous call would have raised
    (so the same failure rules apply)."""
    reason = f"HTTP {status}: {message}" if status is not None else message
    if status == 429:
        return TransientError(reason, kind="rate_limited")
    if status is None or status >= 500 or status in (408, 409):
        return TransientError(reason, kind="server_error")
    if status in (401, 403):
        return Unauthorized(reason)
    if status == 404:
        return NotFound(reason)
    return RequestRejected(reason)


class _OnTheSdk:
    """Calls through a backend's pooled SDK clients, its errors mapped as a call's are."""

    sdk = ""

    def __init__(self, backend: OpenAIBackend | AnthropicBackend) -> None:
        self.backend = backend

    @asynccontextmanager
    async def client(self) -> AsyncIterator[Any]:
        with mapped_errors(importlib.import_module(self.sdk), self.backend.timeout):
            async with self.backend.pool.client() as client:
                yield client

    async def _sdk(self, call: Callable[[Any], Any]) -> Any:
        async with self.client() as client:
            return await call(client)


class OpenAIBatches(_OnTheSdk):
    provider = "openai"
    sdk = "openai"
    max_requests = 50_000
    max_bytes = 200_000_000  # 200 MB

    def _line(self, custom_id: str, endpoint: str, body: dict[str, Any]) -> bytes:
        line = {"custom_id": custom_id, "method": "POST", "url": endpoint, "body": body}
        return json.dumps(line, ensure_ascii=False).encode("utf-8") + b"\n"

    def line_size(self, custom_id: str, endpoint: str, body: dict[str, Any]) -> int:
        return len(self._line(custom_id, endpoint, body))

    async def submit(
        self, local_id: str, endpoint: str, lines: Sequence[tuple[str, dict[str, Any]]],
        on_file: Callable[[str], None],
    ) -> str:  # fmt: skip
        data = b"".join(self._line(cid, endpoint, body) for cid, body in lines)
        uploaded = await self._sdk(
            lambda c: c.files.create(file=(f"{local_id}.jsonl", data), purpose="batch")
        )
        on_file(str(uploaded.id))
        batch = await self._sdk(
            lambda c: c.batches.create(
                input_file_id=uploaded.id, endpoint=endpoint, completion_window="24h",
                metadata={SUBMISSION_KEY: local_id},
            )
        )  # fmt: skip
        return str(batch.id)

    async def state(self, batch_id: str) -> BatchState:
        batch = await self._sdk(lambda c: c.batches.retrieve(batch_id))
        counts = batch.request_counts
        return BatchState(
            status=str(batch.status), ended=batch.status in OPENAI_ENDED,
            counts={} if counts is None else {
                "total": counts.total, "completed": counts.completed, "failed": counts.failed,
            },
        )  # fmt: skip

    async def results(self, batch_id: str) -> list[LineResult]:
        batch = await self._sdk(lambda c: c.batches.retrieve(batch_id))
        out: list[LineResult] = []
        for file_id in (batch.output_file_id, batch.error_file_id):
            if file_id:
                content = await self._content(file_id)
                out += [r for t in content.text.splitlines() if (r := _openai_line(t))]
        if batch.status == "failed":
            # refused as a whole before it ran (a validation error, or the organisation's
            # queue of batch tokens full): its requests go out again, at most three times
            errors = getattr(getattr(batch, "errors", None), "data", None) or []
            message = "; ".join(
                f"{getattr(e, 'code', '')}: {getattr(e, 'message', e)}" for e in errors
            )[:300]
            reason = f"batch failed: {message or 'no reason given'}"
            out.append(LineResult("*", "expired", message=reason))
        return out

    async def _content(self, file_id: str) -> Any:
        return await self._sdk(lambda c: c.files.content(file_id))

    async def cancel(self, batch_id: str) -> None:
        await self._sdk(lambda c: c.batches.cancel(batch_id))

    async def find(
        self, local_id: str, made_at: float, custom_ids: set[str], known: set[str]
    ) -> str | Literal["wait"] | None:
        async with self.client() as client:
            async for batch in client.batches.list(limit=100):
                if (batch.metadata or {}).get(SUBMISSION_KEY) == local_id:
                    return str(batch.id)
                if batch.created_at < made_at - FIND_SLACK_S:
                    break  # newest first: the rest are older than the submission
        return None


def _openai_line(text: str) -> LineResult | None:
    """A result file's line; None for a blank or unreadable one (its request then counts
    as having no result, and goes out again)."""
    try:
        line = json.loads(text)
    except ValueError:
        return None
    if not isinstance(line, dict) or not isinstance(line.get("custom_id"), str):
        return None
    custom_id = str(line["custom_id"])
    response = line.get("response")
    error = line.get("error")
    if isinstance(response, dict) and response.get("status_code") == 200:
        body = response.get("body")
        return LineResult(custom_id, "ok", reply=body if isinstance(body, dict) else {})
    if isinstance(response, dict):
        body = response.get("body") or {}
        detail = body.get("error", body) if isinstance(body, dict) else body
        message = detail.get("message") if isinstance(detail, dict) else str(detail)
        return LineResult(custom_id, "error", status=int(response.get("status_code") or 500),
                          message=str(message)[:300])  # fmt: skip
    code = error.get("code") if isinstance(error, dict) else None
    message = str(error.get("message", "")) if isinstance(error, dict) else ""
    if code == "batch_expired":
        return LineResult(custom_id, "expired", message=message)
    if code == "batch_cancelled":
        return LineResult(custom_id, "cancelled", message=message)
    return LineResult(custom_id, "error", status=None, message=f"{code}: {message}"[:300])


class AnthropicBatches(_OnTheSdk):
    provider = "anthropic"
    sdk = "anthropic"
    max_requests = 100_000
    max_bytes = 256_000_000  # 256 MB

    def line_size(self, custom_id: str, endpoint: str, body: dict[str, Any]) -> int:
        return len(json.dumps({"custom_id": custom_id, "params": body}).encode("utf-8")) + 1

    async def submit(
        self, local_id: str, endpoint: str, lines: Sequence[tuple[str, dict[str, Any]]],
        on_file: Callable[[str], None],
    ) -> str:  # fmt: skip
        requests = [{"custom_id": cid, "params": body} for cid, body in lines]
        batch = await self._sdk(lambda c: c.messages.batches.create(requests=requests))
        return str(batch.id)

    async def state(self, batch_id: str) -> BatchState:
        batch = await self._sdk(lambda c: c.messages.batches.retrieve(batch_id))
        counts = batch.request_counts
        return BatchState(
            status=str(batch.processing_status), ended=batch.processing_status == "ended",
            counts={
                "processing": counts.processing, "succeeded": counts.succeeded,
                "errored": counts.errored, "canceled": counts.canceled,
                "expired": counts.expired,
            },
        )  # fmt: skip

    async def results(self, batch_id: str) -> list[LineResult]:
        out: list[LineResult] = []
        async with self.client() as client:
            async for entry in await client.messages.batches.results(batch_id):
                out.append(_anthropic_line(entry))
        return out

    async def cancel(self, batch_id: str) -> None:
        await self._sdk(lambda c: c.messages.batches.cancel(batch_id))

    async def find(
        self, local_id: str, made_at: float, custom_ids: set[str], known: set[str]
    ) -> str | Literal["wait"] | None:
        candidates: list[tuple[str, bool]] = []
        async with self.client() as client:
            async for batch in client.messages.batches.list(limit=100):
                if _timestamp(batch.created_at) < made_at - FIND_SLACK_S:
                    break
                counts = batch.request_counts
                total = (counts.processing + counts.succeeded + counts.errored
                         + counts.canceled + counts.expired)  # fmt: skip
                if batch.id not in known and total == len(custom_ids):
                    candidates.append((str(batch.id), batch.processing_status == "ended"))
        if any(not ended for _, ended in candidates):
            return "wait"  # its results, the only way to tell it is ours, are not out yet
        for batch_id, _ in candidates:
            # only a batch unknown to this store that holds exactly our requests is ours
            if {r.custom_id for r in await self.results(batch_id)} == custom_ids:
                return batch_id
        return None


def _timestamp(value: Any) -> float:
    if isinstance(value, dt.datetime):
        return value.timestamp()
    return dt.datetime.fromisoformat(str(value)).timestamp()


def _anthropic_line(entry: Any) -> LineResult:
    custom_id = str(entry.custom_id)
    result = entry.result
    kind = getattr(result, "type", None)
    if kind == "succeeded":
        return LineResult(custom_id, "ok", reply=result.message.to_dict())
    if kind == "errored":
        error = getattr(getattr(result, "error", None), "error", None)
        error_type = str(getattr(error, "type", "api_error"))
        message = str(getattr(error, "message", ""))[:300]
        status = ANTHROPIC_ERROR_STATUS.get(error_type, 500)
        return LineResult(custom_id, "error", status=status, message=f"{error_type}: {message}")
    if kind == "canceled":
        return LineResult(custom_id, "cancelled", message="the batch was cancelled")
    return LineResult(custom_id, "expired", message="the batch expired before it ran")


def batch_api(backend: object) -> BatchApi | None:
    """The batch API of a judge's backend, or None for a backend with none."""
    if isinstance(backend, OpenAIBackend):
        return OpenAIBatches(backend)
    if isinstance(backend, AnthropicBackend):
        return AnthropicBatches(backend)
    return None
