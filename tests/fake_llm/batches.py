"""The providers' batch APIs on the fake LLM server: OpenAI Files + Batches and Anthropic
Message Batches, well enough for the official SDKs (``client.files`` / ``client.batches``,
``client.messages.batches``).

Every server has one ``FakeBatches`` as ``server.batches``. Each request line of a batch is
answered by the server's own machinery (``FakeLLMServer.answer_line``: the responder,
usage with prompt caching, logprobs, and the scripted behaviours of ``server.script``,
consumed in input order as lines are answered), so a line's body is exactly what the
synchronous endpoint would have answered for it.

Time. A batch runs for ``BatchSettings.in_progress_s`` seconds on ``FakeBatches.clock``
(``time.monotonic`` unless a test swaps in a manual clock). Nothing happens in the
background: a batch moves on when a call to the batch API looks at it (retrieve, list,
cancel, results, file reads), so with the default ``in_progress_s=0`` the create reply
says ``in_progress`` and the first retrieve after it says the batch ended. With
``partial`` the lines are answered one by one, evenly over ``in_progress_s``, so a
retrieve in the middle shows part of the counts done; results become readable only once
the batch ended, as with the real APIs.

OpenAI validation. An upload takes any bytes; ``batches.create`` checks the input file
(JSON lines with a unique string ``custom_id``, ``method`` POST and a ``url`` equal to the
batch's ``endpoint``, a JSON object ``body``). A file that fails is no HTTP error: the
create reply says ``validating`` and the batch is ``failed`` from the next look on, its
``errors.data`` listing ``{code, line, message, param}`` per bad line (codes:
``invalid_json_line``, ``missing_custom_id``, ``duplicate_custom_id``, ``invalid_method``,
``invalid_url``, ``mismatched_endpoint``, ``invalid_body``, ``empty_file``, and
``batch_failed`` for ``BatchSettings.fail``). HTTP errors are kept for what the real API
refuses up front: an unknown ``input_file_id`` (404), a file not uploaded for ``batch``,
an endpoint other than ``/v1/chat/completions`` / ``/v1/responses`` or a completion window
other than ``24h`` (400). Anthropic checks its requests at create time: a ``custom_id``
not matching ``^[a-zA-Z0-9_-]{1,64}$``, a repeated one, missing ``params`` or no requests
at all answer 400 ``invalid_request_error`` and create nothing.

Request counts. OpenAI: ``completed`` counts the lines of the output file, ``failed``
those of the error file (non-200 answers, and once the batch ended its expired and
cancelled lines too), so they add up to ``total`` at the end. Anthropic: lines move out of
``processing`` as they are answered (the real API documents them moving only at the end;
``partial`` shows them move earlier on purpose).

Cancel. The lines answered by then stay answered, the reply says ``cancelling`` /
``canceling``, and the next look finds the batch ended (OpenAI ``cancelled``: the rest are
``batch_cancelled`` lines of the error file; Anthropic: ``canceled`` results). Cancelling
an ended OpenAI batch answers 409 (which the openai SDK retries unless ``max_retries=0``);
an ended Anthropic batch comes back as it is.

Results. OpenAI: the output file holds the 200 answers as
``{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error": null}``,
the error file the others (and ``{"response": null, "error": {"code": "batch_expired" |
"batch_cancelled", "message"}}``); a file id is null when the file would be empty; content
is served as ``application/octet-stream``. Anthropic: ``results_url`` is an absolute URL on
this server, null until the batch ended; the SDK's ``results()`` first retrieves the batch
(an extra GET, and a client-side ``AnthropicError`` while ``results_url`` is null), then
GETs that URL as it is with ``Accept: application/binary`` and decodes JSON lines from the
bytes whatever the content type (served as ``application/binary``).
"""

from __future__ import annotations

import itertools
import json
import math
import random
import re
import threading
import time
import traceback
from collections import Counter, deque
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from tests.fake_llm.server import (
    BadRequest,
    Behaviour,
    Hang,
    HttpRequest,
    RateLimited,
    Route,
    ServerError,
    Wire,
    _Reply,
    error_body,
    parse_multipart,
)

if TYPE_CHECKING:
    from tests.fake_llm.server import FakeLLMServer

Provider = Literal["openai", "anthropic"]
OPENAI_ENDPOINTS: dict[str, Wire] = {"/v1/chat/completions": "chat", "/v1/responses": "responses"}
COMPLETION_WINDOW = "24h"
WINDOW_S = 24 * 3600
CUSTOM_ID = re.compile(r"[a-zA-Z0-9_-]{1,64}")
OPENAI_CONTENT_TYPE = "application/octet-stream"
ANTHROPIC_CONTENT_TYPE = "application/binary"
_ERROR_WIRE: dict[Provider, Wire] = {"openai": "chat", "anthropic": "anthropic"}
_EXPIRED_MESSAGE = "This request could not be executed before the completion window expired."
_CANCELLED_MESSAGE = "This request was not executed because the batch was cancelled."
_T = TypeVar("_T")
Action = Callable[[HttpRequest], _Reply]


# --- settings and records --------------------------------------------------------------------


@dataclass(frozen=True)
class BatchSettings:
    """How batches behave; a batch keeps the settings it was created under.

    ``in_progress_s``: seconds from creation until the batch ends (0: it has ended by the
    first look after the create reply). ``partial``: answer the lines one by one, evenly
    over ``in_progress_s``, so counts grow in the middle (else all are answered at the
    end). ``expire``: custom_ids that end expired; ``expire_count`` / ``expire_fraction``:
    also this many (or this share, rounded up) of the last lines in input order. A batch
    with an expired line ends ``expired`` on OpenAI. ``shuffle``: result lines in a random
    order seeded by ``seed`` and the batch id, never the input order when there are two
    lines or more (else input order). ``create_delay_s``: the batch is created and
    recorded at once, but the create reply waits this long (a client that times out or
    is killed meanwhile never learns the id). ``fail``: OpenAI only, the batch fails
    validation with this message (the create reply says ``validating``, later looks
    ``failed``)."""

    in_progress_s: float = 0.0
    partial: bool = False
    expire: Collection[str] = ()
    expire_count: int = 0
    expire_fraction: float = 0.0
    shuffle: bool = True
    seed: int = 0
    create_delay_s: float = 0.0
    fail: str | None = None


@dataclass(frozen=True)
class BatchRecord:
    """A batch as created (also one that failed validation). ``time``: on
    ``FakeBatches.clock``; ``endpoint``: the OpenAI endpoint, ``/v1/messages`` for
    Anthropic; ``input_file_id`` and ``metadata``: OpenAI only; ``status``: the one the
    create reply gave."""

    time: float
    provider: Provider
    batch_id: str
    endpoint: str
    n_requests: int
    custom_ids: tuple[str, ...]
    metadata: dict[str, Any] | None
    input_file_id: str | None
    status: str


@dataclass(frozen=True)
class UploadRecord:
    """An OpenAI file upload; ``n_lines`` counts its non-blank lines, ``custom_ids`` those
    of the lines that parse (in file order)."""

    time: float
    file_id: str
    filename: str
    purpose: str
    bytes: int
    n_lines: int
    custom_ids: tuple[str, ...]


@dataclass(frozen=True)
class LineRecord:
    """One batch line as it was answered (expired and cancelled lines never are);
    ``status``: the HTTP status the synchronous endpoint would have answered."""

    time: float
    provider: Provider
    batch_id: str
    custom_id: str
    wire: Wire
    body: dict[str, Any]
    status: int


DownloadKind = Literal["input", "output", "error", "results"]


@dataclass(frozen=True)
class DownloadRecord:
    """A read of batch results (OpenAI ``files.content``: ``kind`` input/output/error;
    Anthropic ``messages.batches.results``: ``kind`` results, ``file_id`` None)."""

    time: float
    provider: Provider
    batch_id: str | None
    file_id: str | None
    kind: DownloadKind


@dataclass(frozen=True)
class BatchCall:
    """One HTTP call to a batch API: its JSON body ({} when it had none, or for uploads);
    ``status``: the status answered."""

    time: float
    provider: Provider
    method: str
    path: str
    query: dict[str, str]
    body: dict[str, Any]
    status: int


# --- state -------------------------------------------------------------------------------------

LineState = Literal["pending", "done", "expired", "cancelled"]
Phase = Literal["validating", "running", "cancelling", "ended"]
Outcome = Literal["completed", "expired", "cancelled", "failed"]


@dataclass
class _Line:
    custom_id: str
    wire: Wire
    body: dict[str, Any]
    expires: bool = False
    state: LineState = "pending"
    status: int = 0
    reply: dict[str, Any] = field(default_factory=dict)
    number: int = 0


@dataclass
class _Batch:
    provider: Provider
    id: str
    seq: int
    settings: BatchSettings
    lines: list[_Line]
    headers: dict[str, str]
    created: float  # on the clock
    created_wall: float
    endpoint: str
    input_file_id: str | None = None
    metadata: dict[str, Any] | None = None
    phase: Phase = "running"
    outcome: Outcome | None = None
    errors: list[dict[str, Any]] = field(default_factory=list)
    cancel_wall: float | None = None
    ended_wall: float | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    results: bytes = b""

    def work(self) -> list[_Line]:
        """The lines to answer, in the order they are answered."""
        return [line for line in self.lines if not line.expires]

    def count(self, state: LineState, ok: bool | None = None) -> int:
        return sum(
            1
            for line in self.lines
            if line.state == state and (ok is None or (line.status == 200) == ok)
        )


@dataclass
class _File:
    id: str
    filename: str
    purpose: str
    data: bytes
    created_at: int
    kind: DownloadKind
    batch_id: str | None = None

    def json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "file",
            "bytes": len(self.data),
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "status_details": None,
            "expires_at": None,
        }


class _HttpError(Exception):
    """Answer the call with ``status`` and the provider's error body."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _rfc3339(wall: float | None) -> str | None:
    if wall is None:
        return None
    return datetime.fromtimestamp(wall, UTC).isoformat().replace("+00:00", "Z")


def _int_time(wall: float | None) -> int | None:
    return None if wall is None else int(wall)


def _json_object(request: HttpRequest) -> dict[str, Any]:
    try:
        body = json.loads(request.body)
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise _HttpError(400, "the body is not a JSON object")
    return body


def _peek_json(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw) if raw else {}
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _limit(query: dict[str, str], default: int, most: int) -> int:
    text = query.get("limit", str(default))
    try:
        limit = int(text)
    except ValueError:
        raise _HttpError(400, f"limit: not an integer: {text!r}") from None
    if not 1 <= limit <= most:
        raise _HttpError(400, f"limit: must be between 1 and {most}, got {limit}")
    return limit


def _jsonl(entries: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(entry).encode("utf-8") + b"\n" for entry in entries)


def _shuffled(entries: list[dict[str, Any]], settings: BatchSettings, salt: str) -> None:
    """Shuffle ``entries`` in place (seeded); never left in the given order when there
    are two or more."""
    if not settings.shuffle or len(entries) < 2:
        return
    before = [id(entry) for entry in entries]
    random.Random(f"{settings.seed}:{salt}").shuffle(entries)
    if [id(entry) for entry in entries] == before:
        entries.append(entries.pop(0))


def _openai_lines(data: bytes, endpoint: str) -> tuple[list[_Line], list[dict[str, Any]]]:
    """The lines of an OpenAI batch input file, and the validation errors found."""
    lines: list[_Line] = []
    errors: list[dict[str, Any]] = []
    seen: set[str] = set()

    def error(code: str, number: int, message: str, param: str | None = None) -> None:
        errors.append({"code": code, "line": number, "message": message, "param": param})

    for number, text in enumerate(data.decode("utf-8", "replace").splitlines(), start=1):
        if not text.strip():
            continue
        try:
            entry = json.loads(text)
        except ValueError:
            entry = None
        if not isinstance(entry, dict):
            error("invalid_json_line", number, "This line is not a JSON object.")
            continue
        custom_id = entry.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id:
            error("missing_custom_id", number, "custom_id must be a non-empty string.", "custom_id")
            continue
        if custom_id in seen:
            error("duplicate_custom_id", number, f"The custom_id {custom_id!r} is repeated.",
                  "custom_id")  # fmt: skip
            continue
        seen.add(custom_id)
        url, body = entry.get("url"), entry.get("body")
        if entry.get("method") != "POST":
            error("invalid_method", number, "method must be POST.", "method")
        elif not isinstance(url, str) or url not in OPENAI_ENDPOINTS:
            error("invalid_url", number, f"url {url!r} is not a supported endpoint.", "url")
        elif url != endpoint:
            message = f"url {url!r} does not match the batch's endpoint {endpoint!r}."
            error("mismatched_endpoint", number, message, "url")
        elif not isinstance(body, dict):
            error("invalid_body", number, "body must be a JSON object.", "body")
        else:
            lines.append(_Line(custom_id, OPENAI_ENDPOINTS[url], body))
    if not lines and not errors:
        errors.append({"code": "empty_file", "line": None, "message": "The file has no lines.",
                       "param": None})  # fmt: skip
    return lines, errors


def _custom_ids_of(data: bytes) -> tuple[int, tuple[str, ...]]:
    """The number of non-blank lines of a file, and the custom_ids of those that parse."""
    n_lines = 0
    ids: list[str] = []
    for text in data.decode("utf-8", "replace").splitlines():
        if not text.strip():
            continue
        n_lines += 1
        try:
            entry = json.loads(text)
        except ValueError:
            continue
        if isinstance(entry, dict) and isinstance(entry.get("custom_id"), str):
            ids.append(entry["custom_id"])
    return n_lines, tuple(ids)


# --- the batch APIs --------------------------------------------------------------------------


class FakeBatches:
    """The batch state of one ``FakeLLMServer``: batches, files, settings, records.

    Set ``settings`` (or ``per_provider[provider]``, which wins for that provider) before
    creating a batch; ``clock`` may be replaced by a manual clock (a callable returning
    seconds) to drive progress without sleeping. ``script`` queues misbehaviours for the
    batch API calls themselves (not their lines). All records are copies taken under a
    lock, safe to read from any thread."""

    def __init__(self, server: FakeLLMServer, settings: BatchSettings | None = None) -> None:
        self._server = server
        self._defaults = settings or BatchSettings()
        self.settings: BatchSettings = self._defaults
        self.per_provider: dict[Provider, BatchSettings] = {}
        self.clock: Callable[[], float] = time.monotonic
        self._lock = threading.RLock()
        self._numbers = itertools.count(1)
        self._seq = itertools.count(1)
        self._batches: dict[str, _Batch] = {}
        self._files: dict[str, _File] = {}
        self._call_script: deque[Behaviour] = deque()
        self._created: list[BatchRecord] = []
        self._uploads: list[UploadRecord] = []
        self._lines: list[LineRecord] = []
        self._downloads: list[DownloadRecord] = []
        self._calls: list[BatchCall] = []

    # --- controls and records

    def settings_for(self, provider: Provider) -> BatchSettings:
        """The settings a batch created now for ``provider`` gets."""
        return self.per_provider.get(provider, self.settings)

    def script(self, *behaviours: Behaviour) -> None:
        """Queue behaviours for the next batch API calls (uploads, creates, retrieves,
        lists, cancels, downloads), one per call: ``RateLimited``, ``ServerError`` and
        ``BadRequest`` answer that error and do nothing else; ``Hang`` does the call,
        then delays its reply; the others are refused (they only make sense for lines,
        which ``server.script`` drives)."""
        for behaviour in behaviours:
            if not isinstance(behaviour, RateLimited | ServerError | BadRequest | Hang):
                raise TypeError(f"{behaviour!r} cannot answer a batch API call")
        with self._lock:
            self._call_script.extend(behaviours)

    def reset(self) -> None:
        """Forget all batches, files and records, empty the call script, and restore the
        settings the server was built with (``per_provider`` emptied, ``clock`` back to
        ``time.monotonic``)."""
        with self._lock:
            self._batches.clear()
            self._files.clear()
            self._call_script.clear()
            self._created.clear()
            self._uploads.clear()
            self._lines.clear()
            self._downloads.clear()
            self._calls.clear()
            self.settings = self._defaults
            self.per_provider = {}
            self.clock = time.monotonic

    @property
    def created(self) -> list[BatchRecord]:
        """The batches created, in creation order."""
        with self._lock:
            return list(self._created)

    @property
    def uploads(self) -> list[UploadRecord]:
        """The OpenAI files uploaded, in upload order."""
        with self._lock:
            return list(self._uploads)

    @property
    def lines(self) -> list[LineRecord]:
        """The batch lines answered, in the order they were answered."""
        with self._lock:
            return list(self._lines)

    @property
    def downloads(self) -> list[DownloadRecord]:
        with self._lock:
            return list(self._downloads)

    @property
    def result_downloads(self) -> int:
        """Reads of results: OpenAI output/error file contents and Anthropic results."""
        with self._lock:
            return sum(1 for d in self._downloads if d.kind != "input")

    @property
    def calls(self) -> list[BatchCall]:
        """Every HTTP call to a batch API, in arrival order (not in ``server.requests``)."""
        with self._lock:
            return list(self._calls)

    @property
    def pending(self) -> int:
        """Behaviours of ``script`` not consumed yet."""
        with self._lock:
            return len(self._call_script)

    def submitted(self) -> Counter[str]:
        """How many batches each custom_id was submitted in (over both providers)."""
        with self._lock:
            return Counter(cid for record in self._created for cid in record.custom_ids)

    def answered(self) -> Counter[str]:
        """How many times a batch line with each custom_id was answered."""
        with self._lock:
            return Counter(record.custom_id for record in self._lines)

    def status(self, batch_id: str) -> str:
        """A batch's status as its provider would report it now (advancing it)."""
        with self._lock:
            batch = self._batches[batch_id]
            self._advance(batch)
            if batch.provider == "openai":
                return self._openai_status(batch)
            return self._anthropic_status(batch)

    # --- routing

    def routes(self) -> list[Route]:
        """The HTTP routes of both batch APIs, for the server's router."""
        openai: list[tuple[str, str, Action]] = [
            ("POST", r"/files", self._upload),
            ("GET", r"/files", self._list_files),
            ("GET", r"/files/(?P<file_id>[^/]+)", self._file_info),
            ("DELETE", r"/files/(?P<file_id>[^/]+)", self._delete_file),
            ("GET", r"/files/(?P<file_id>[^/]+)/content", self._file_content),
            ("POST", r"/batches", self._create_openai),
            ("GET", r"/batches", self._list_openai),
            ("GET", r"/batches/(?P<batch_id>[^/]+)", self._retrieve_openai),
            ("POST", r"/batches/(?P<batch_id>[^/]+)/cancel", self._cancel_openai),
        ]
        anthropic: list[tuple[str, str, Action]] = [
            ("POST", r"/messages/batches", self._create_anthropic),
            ("GET", r"/messages/batches", self._list_anthropic),
            ("GET", r"/messages/batches/(?P<batch_id>[^/]+)", self._retrieve_anthropic),
            ("DELETE", r"/messages/batches/(?P<batch_id>[^/]+)", self._delete_anthropic),
            ("POST", r"/messages/batches/(?P<batch_id>[^/]+)/cancel", self._cancel_anthropic),
            ("GET", r"/messages/batches/(?P<batch_id>[^/]+)/results", self._results_anthropic),
        ]
        tables: list[tuple[Provider, list[tuple[str, str, Action]]]] = [
            ("openai", openai),
            ("anthropic", anthropic),
        ]
        return [
            Route(
                method,
                re.compile(r"(?:/v1)?" + path),
                self._handler(provider, action),
                _ERROR_WIRE[provider],
            )
            for provider, table in tables
            for method, path, action in table
        ]

    def _handler(self, provider: Provider, action: Action) -> Action:
        """``action`` behind the call script, error replies and the call records."""
        wire = _ERROR_WIRE[provider]

        def handle(request: HttpRequest) -> _Reply:
            with self._lock:
                behaviour = self._call_script.popleft() if self._call_script else None
                if isinstance(behaviour, RateLimited):
                    reply = _Reply(
                        429,
                        error_body(wire, 429, "Rate limit reached; please try again later."),
                        [("retry-after", str(behaviour.retry_after))],
                    )
                elif isinstance(behaviour, ServerError):
                    reply = _Reply(behaviour.status, error_body(wire, behaviour.status, "error"))
                elif isinstance(behaviour, BadRequest):
                    body = error_body(wire, behaviour.status, behaviour.message)
                    reply = _Reply(behaviour.status, body)
                else:
                    try:
                        reply = action(request)
                    except _HttpError as exc:
                        reply = _Reply(exc.status, error_body(wire, exc.status, exc.message))
                    except Exception as exc:  # a bug here: tell the client, not the void
                        message = "fake batch API failed: " + "".join(
                            traceback.format_exception_only(exc)
                        )
                        reply = _Reply(500, error_body(wire, 500, message.strip()))
                    if isinstance(behaviour, Hang):
                        reply.delay += behaviour.seconds
                is_json = "json" in request.headers.get("content-type", "")
                self._calls.append(
                    BatchCall(
                        self.clock(), provider, request.method, request.path, request.query,
                        _peek_json(request.body) if is_json else {}, reply.status,
                    )
                )  # fmt: skip
            return reply

        return handle

    # --- shared machinery

    def _number(self) -> int:
        return next(self._numbers)

    def _batch(self, provider: Provider, batch_id: str) -> _Batch:
        batch = self._batches.get(batch_id)
        if batch is None or batch.provider != provider:
            kind = "Batch" if provider == "openai" else "Message Batch"
            raise _HttpError(404, f"No such {kind} object: {batch_id}")
        self._advance(batch)
        return batch

    def _expiring(self, lines: list[_Line], settings: BatchSettings) -> None:
        tail = max(settings.expire_count, math.ceil(settings.expire_fraction * len(lines)))
        named = settings.expire
        expire = {named} if isinstance(named, str) else set(named)  # one id given bare
        for index, line in enumerate(lines):
            line.expires = line.custom_id in expire or index >= len(lines) - tail

    def _new_batch(
        self, provider: Provider, batch_id: str, lines: list[_Line], request: HttpRequest,
        endpoint: str, settings: BatchSettings,
    ) -> _Batch:  # fmt: skip
        self._expiring(lines, settings)
        batch = _Batch(
            provider=provider,
            id=batch_id,
            seq=next(self._seq),
            settings=settings,
            lines=lines,
            headers=dict(request.headers),
            created=self.clock(),
            created_wall=time.time(),
            endpoint=endpoint,
        )
        self._batches[batch_id] = batch
        return batch

    def _record_created(self, batch: _Batch, status: str) -> None:
        self._created.append(
            BatchRecord(
                time=batch.created,
                provider=batch.provider,
                batch_id=batch.id,
                endpoint=batch.endpoint,
                n_requests=len(batch.lines),
                custom_ids=tuple(line.custom_id for line in batch.lines),
                metadata=batch.metadata,
                input_file_id=batch.input_file_id,
                status=status,
            )
        )

    def _answer(self, batch: _Batch, line: _Line) -> None:
        line.status, line.reply = self._server.answer_line(line.wire, line.body, batch.headers)
        line.state = "done"
        line.number = self._number()
        self._lines.append(
            LineRecord(
                self.clock(), batch.provider, batch.id, line.custom_id, line.wire, line.body,
                line.status,
            )
        )  # fmt: skip

    def _advance(self, batch: _Batch) -> None:
        """Bring ``batch`` up to the clock: answer the lines due, end it when due."""
        now = self.clock()
        settings = batch.settings
        if batch.phase == "validating":
            self._end(batch, "failed")
            return
        if batch.phase == "running":
            work = batch.work()
            elapsed = now - batch.created
            if elapsed >= settings.in_progress_s:
                due = len(work)
            elif settings.partial and settings.in_progress_s > 0:
                due = math.floor(len(work) * elapsed / settings.in_progress_s)
            else:
                due = 0
            for line in work[:due]:
                if line.state == "pending":
                    self._answer(batch, line)
            if elapsed >= settings.in_progress_s:
                expired = False
                for line in batch.lines:
                    if line.expires:
                        line.state, expired = "expired", True
                self._end(batch, "expired" if expired else "completed")
        if batch.phase == "cancelling":
            for line in batch.lines:
                if line.state == "pending":
                    line.state = "cancelled"
            self._end(batch, "cancelled")

    def _end(self, batch: _Batch, outcome: Outcome) -> None:
        batch.phase, batch.outcome, batch.ended_wall = "ended", outcome, time.time()
        if outcome == "failed":
            return
        if batch.provider == "openai":
            self._openai_files(batch)
        else:
            self._anthropic_results(batch)

    # --- OpenAI

    def _openai_files(self, batch: _Batch) -> None:
        output: list[dict[str, Any]] = []
        errors: list[dict[str, Any]] = []
        for line in batch.lines:
            entry: dict[str, Any] = {"id": f"batch_req_fake{self._number():08d}",
                                     "custom_id": line.custom_id}  # fmt: skip
            if line.state == "done":
                entry["response"] = {
                    "status_code": line.status,
                    "request_id": f"req_fake{line.number:08d}",
                    "body": line.reply,
                }
                entry["error"] = None
                (output if line.status == 200 else errors).append(entry)
            elif line.state in ("expired", "cancelled"):
                expired = line.state == "expired"
                entry["response"] = None
                entry["error"] = {
                    "code": "batch_expired" if expired else "batch_cancelled",
                    "message": _EXPIRED_MESSAGE if expired else _CANCELLED_MESSAGE,
                }
                errors.append(entry)
        for kind, entries in (("output", output), ("error", errors)):
            if not entries:
                continue
            _shuffled(entries, batch.settings, f"{batch.id}:{kind}")
            file = _File(
                id=f"file-fake{self._number():08d}",
                filename=f"{batch.id}_{kind}.jsonl",
                purpose="batch_output",
                data=_jsonl(entries),
                created_at=int(time.time()),
                kind="output" if kind == "output" else "error",
                batch_id=batch.id,
            )
            self._files[file.id] = file
            if kind == "output":
                batch.output_file_id = file.id
            else:
                batch.error_file_id = file.id

    @staticmethod
    def _openai_status(batch: _Batch) -> str:
        if batch.phase == "ended":
            assert batch.outcome is not None
            return batch.outcome
        return {"validating": "validating", "running": "in_progress", "cancelling": "cancelling"}[
            batch.phase
        ]

    def _openai_json(self, batch: _Batch) -> dict[str, Any]:
        status = self._openai_status(batch)
        ended = _int_time(batch.ended_wall)
        failed = status == "failed"
        validated = not batch.errors
        completed = batch.count("done", ok=True)
        unfinished = batch.count("expired") + batch.count("cancelled")
        model = next((line.body.get("model") for line in batch.lines), None)
        return {
            "id": batch.id,
            "object": "batch",
            "endpoint": batch.endpoint,
            "model": model if isinstance(model, str) else None,
            "errors": {"object": "list", "data": batch.errors} if batch.errors else None,
            "input_file_id": batch.input_file_id,
            "completion_window": COMPLETION_WINDOW,
            "status": status,
            "output_file_id": batch.output_file_id,
            "error_file_id": batch.error_file_id,
            "created_at": int(batch.created_wall),
            "in_progress_at": int(batch.created_wall) if validated else None,
            "expires_at": int(batch.created_wall) + WINDOW_S,
            "finalizing_at": ended if status in ("completed", "expired") else None,
            "completed_at": ended if status == "completed" else None,
            "failed_at": ended if failed else None,
            "expired_at": ended if status == "expired" else None,
            "cancelling_at": _int_time(batch.cancel_wall),
            "cancelled_at": ended if status == "cancelled" else None,
            "request_counts": {
                "total": len(batch.lines) if validated else 0,
                "completed": completed,
                "failed": batch.count("done", ok=False) + unfinished,
            },
            "metadata": batch.metadata,
        }

    def _upload(self, request: HttpRequest) -> _Reply:
        try:
            fields = parse_multipart(request.headers.get("content-type", ""), request.body)
        except ValueError as exc:
            raise _HttpError(400, f"expected a multipart/form-data body: {exc}") from None
        if "purpose" not in fields or "file" not in fields:
            raise _HttpError(400, "the upload needs the fields 'purpose' and 'file'")
        purpose = fields["purpose"].data.decode("utf-8", "replace")
        upload = fields["file"]
        file = _File(
            id=f"file-fake{self._number():08d}",
            filename=upload.filename or "upload",
            purpose=purpose,
            data=upload.data,
            created_at=int(time.time()),
            kind="input",
        )
        self._files[file.id] = file
        n_lines, custom_ids = _custom_ids_of(upload.data)
        self._uploads.append(
            UploadRecord(
                self.clock(), file.id, file.filename, purpose, len(upload.data), n_lines,
                custom_ids,
            )
        )  # fmt: skip
        return _Reply(200, file.json())

    def _file(self, request: HttpRequest) -> _File:
        file_id = request.params["file_id"]
        file = self._files.get(file_id)
        if file is None:
            raise _HttpError(404, f"No such File object: {file_id}")
        if file.batch_id is not None:
            self._advance(self._batches[file.batch_id])
        return file

    def _file_info(self, request: HttpRequest) -> _Reply:
        return _Reply(200, self._file(request).json())

    def _file_content(self, request: HttpRequest) -> _Reply:
        file = self._file(request)
        record = DownloadRecord(self.clock(), "openai", file.batch_id, file.id, file.kind)
        self._downloads.append(record)
        return _Reply(200, {}, raw=file.data, content_type=OPENAI_CONTENT_TYPE)

    def _delete_file(self, request: HttpRequest) -> _Reply:
        file = self._file(request)
        del self._files[file.id]
        return _Reply(200, {"id": file.id, "object": "file", "deleted": True})

    def _list_files(self, request: HttpRequest) -> _Reply:
        files = sorted(self._files.values(), key=lambda f: f.id, reverse=True)
        if request.query.get("order") == "asc":
            files.reverse()
        purpose = request.query.get("purpose")
        if purpose:
            files = [f for f in files if f.purpose == purpose]
        page = self._page(files, request.query, 10000, 10000, lambda f: f.id, _File.json)
        return _Reply(200, page)

    @staticmethod
    def _page(
        items: list[_T], query: dict[str, str], default: int, most: int,
        key: Callable[[_T], str], render: Callable[[_T], dict[str, Any]],
    ) -> dict[str, Any]:  # fmt: skip
        """An OpenAI cursor page of ``items`` (already in list order) after ``after``
        (an unknown ``after``: an empty page)."""
        limit = _limit(query, default, most)
        after = query.get("after")
        if after is not None:
            ids = [key(item) for item in items]
            items = items[ids.index(after) + 1 :] if after in ids else []
        page = items[:limit]
        return {
            "object": "list",
            "data": [render(item) for item in page],
            "first_id": key(page[0]) if page else None,
            "last_id": key(page[-1]) if page else None,
            "has_more": len(items) > limit,
        }

    def _create_openai(self, request: HttpRequest) -> _Reply:
        body = _json_object(request)
        file_id, endpoint = body.get("input_file_id"), body.get("endpoint")
        if not isinstance(file_id, str) or not isinstance(endpoint, str):
            raise _HttpError(400, "input_file_id and endpoint are required strings")
        if endpoint not in OPENAI_ENDPOINTS:
            supported = ", ".join(OPENAI_ENDPOINTS)
            raise _HttpError(400, f"endpoint {endpoint!r}: this server batches {supported}")
        window = body.get("completion_window")
        if window != COMPLETION_WINDOW:
            raise _HttpError(400, f"completion_window must be '24h', got {window!r}")
        metadata = body.get("metadata")
        if metadata is not None and not isinstance(metadata, dict):
            raise _HttpError(400, "metadata must be an object")
        file = self._files.get(file_id)
        if file is None:
            raise _HttpError(404, f"No such File object: {file_id}")
        if file.purpose != "batch":
            raise _HttpError(400, f"the file {file_id} was not uploaded with purpose 'batch'")
        settings = self.settings_for("openai")
        lines, errors = _openai_lines(file.data, endpoint)
        if settings.fail is not None:
            errors.append({"code": "batch_failed", "line": None, "message": settings.fail,
                           "param": None})  # fmt: skip
        batch_id = f"batch_fake{self._number():08d}"
        batch = self._new_batch("openai", batch_id, lines, request, endpoint, settings)
        batch.input_file_id, batch.metadata = file_id, metadata
        if errors:
            batch.phase, batch.errors = "validating", errors
        reply = self._openai_json(batch)
        self._record_created(batch, reply["status"])
        return _Reply(200, reply, delay=settings.create_delay_s)

    def _retrieve_openai(self, request: HttpRequest) -> _Reply:
        return _Reply(200, self._openai_json(self._batch("openai", request.params["batch_id"])))

    def _list_openai(self, request: HttpRequest) -> _Reply:
        batches = sorted(
            (b for b in self._batches.values() if b.provider == "openai"),
            key=lambda b: b.seq,
            reverse=True,
        )
        for batch in batches:
            self._advance(batch)
        page = self._page(batches, request.query, 20, 100, lambda b: b.id, self._openai_json)
        return _Reply(200, page)

    def _cancel_openai(self, request: HttpRequest) -> _Reply:
        batch = self._batch("openai", request.params["batch_id"])
        if batch.phase == "ended":
            status = self._openai_status(batch)
            raise _HttpError(409, f"Cannot cancel a batch with status '{status}'.")
        if batch.phase == "running":
            batch.phase, batch.cancel_wall = "cancelling", time.time()
        return _Reply(200, self._openai_json(batch))

    # --- Anthropic

    def _anthropic_results(self, batch: _Batch) -> None:
        entries: list[dict[str, Any]] = []
        for line in batch.lines:
            result: dict[str, Any]
            if line.state == "done" and line.status == 200:
                result = {"type": "succeeded", "message": line.reply}
            elif line.state == "done":
                result = {"type": "errored", "error": line.reply}
            elif line.state == "expired":
                result = {"type": "expired"}
            else:
                result = {"type": "canceled"}
            entries.append({"custom_id": line.custom_id, "result": result})
        _shuffled(entries, batch.settings, batch.id)
        batch.results = _jsonl(entries)

    @staticmethod
    def _anthropic_status(batch: _Batch) -> str:
        return {"running": "in_progress", "cancelling": "canceling"}.get(batch.phase, "ended")

    def _anthropic_json(self, batch: _Batch) -> dict[str, Any]:
        ended = batch.phase == "ended"
        base = self._server.base_url
        return {
            "id": batch.id,
            "type": "message_batch",
            "processing_status": self._anthropic_status(batch),
            "request_counts": {
                "processing": batch.count("pending"),
                "succeeded": batch.count("done", ok=True),
                "errored": batch.count("done", ok=False),
                "canceled": batch.count("cancelled"),
                "expired": batch.count("expired"),
            },
            "created_at": _rfc3339(batch.created_wall),
            "ended_at": _rfc3339(batch.ended_wall),
            "expires_at": _rfc3339(batch.created_wall + WINDOW_S),
            "cancel_initiated_at": _rfc3339(batch.cancel_wall),
            "archived_at": None,
            "results_url": f"{base}/v1/messages/batches/{batch.id}/results" if ended else None,
        }

    def _create_anthropic(self, request: HttpRequest) -> _Reply:
        body = _json_object(request)
        requests = body.get("requests")
        if not isinstance(requests, list) or not requests:
            raise _HttpError(400, "requests: a non-empty list is required")
        lines: list[_Line] = []
        seen: set[str] = set()
        for index, item in enumerate(requests):
            custom_id = item.get("custom_id") if isinstance(item, dict) else None
            params = item.get("params") if isinstance(item, dict) else None
            if not isinstance(custom_id, str) or not CUSTOM_ID.fullmatch(custom_id):
                raise _HttpError(
                    400,
                    f"requests.{index}.custom_id: String should match pattern "
                    f"'^[a-zA-Z0-9_-]{{1,64}}$', got {custom_id!r}",
                )
            if custom_id in seen:
                raise _HttpError(400, f"requests.{index}.custom_id: duplicate {custom_id!r}")
            if not isinstance(params, dict):
                raise _HttpError(400, f"requests.{index}.params: an object is required")
            seen.add(custom_id)
            lines.append(_Line(custom_id, "anthropic", params))
        settings = self.settings_for("anthropic")
        batch_id = f"msgbatch_fake{self._number():08d}"
        batch = self._new_batch("anthropic", batch_id, lines, request, "/v1/messages", settings)
        reply = self._anthropic_json(batch)
        self._record_created(batch, reply["processing_status"])
        return _Reply(200, reply, delay=settings.create_delay_s)

    def _retrieve_anthropic(self, request: HttpRequest) -> _Reply:
        batch = self._batch("anthropic", request.params["batch_id"])
        return _Reply(200, self._anthropic_json(batch))

    def _list_anthropic(self, request: HttpRequest) -> _Reply:
        batches = sorted(
            (b for b in self._batches.values() if b.provider == "anthropic"),
            key=lambda b: b.seq,
            reverse=True,
        )
        for batch in batches:
            self._advance(batch)
        limit = _limit(request.query, 20, 1000)
        ids = [b.id for b in batches]
        after, before = request.query.get("after_id"), request.query.get("before_id")
        if before is not None:
            end = ids.index(before) if before in ids else 0
            page = batches[max(0, end - limit) : end]
            has_more = end - limit > 0
        else:
            start = ids.index(after) + 1 if after in ids else (len(ids) if after else 0)
            page = batches[start : start + limit]
            has_more = start + limit < len(batches)
        return _Reply(
            200,
            {
                "data": [self._anthropic_json(b) for b in page],
                "has_more": has_more,
                "first_id": page[0].id if page else None,
                "last_id": page[-1].id if page else None,
            },
        )

    def _cancel_anthropic(self, request: HttpRequest) -> _Reply:
        batch = self._batch("anthropic", request.params["batch_id"])
        if batch.phase == "running":
            batch.phase, batch.cancel_wall = "cancelling", time.time()
        return _Reply(200, self._anthropic_json(batch))

    def _delete_anthropic(self, request: HttpRequest) -> _Reply:
        batch = self._batch("anthropic", request.params["batch_id"])
        if batch.phase != "ended":
            raise _HttpError(400, f"Message Batch {batch.id} is still processing; cancel it first")
        del self._batches[batch.id]
        return _Reply(200, {"id": batch.id, "type": "message_batch_deleted"})

    def _results_anthropic(self, request: HttpRequest) -> _Reply:
        batch = self._batch("anthropic", request.params["batch_id"])
        if batch.phase != "ended":
            raise _HttpError(400, f"Message Batch {batch.id} has not ended yet")
        self._downloads.append(DownloadRecord(self.clock(), "anthropic", batch.id, None, "results"))
        return _Reply(200, {}, raw=batch.results, content_type=ANTHROPIC_CONTENT_TYPE)


__all__ = [
    "ANTHROPIC_CONTENT_TYPE",
    "OPENAI_CONTENT_TYPE",
    "BatchCall",
    "BatchRecord",
    "BatchSettings",
    "DownloadKind",
    "DownloadRecord",
    "FakeBatches",
    "LineRecord",
    "Provider",
    "UploadRecord",
]
