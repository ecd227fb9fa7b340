"""A loopback HTTP/1.1 server that answers like OpenAI (Chat Completions, Responses) and
Anthropic (Messages) well enough for the official SDKs to parse its replies.

Requests are parsed by hand on ``asyncio`` streams (request line, headers, a
``Content-Length`` or chunked body, keep-alive), so per-request work stays small. The
server runs its event loop in a daemon thread; tests drive it from the outside:

    with FakeLLMServer(responder) as server:
        server.script(RateLimited(1.0), Hang(5.0))   # the next two requests misbehave
        client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="test-key")

Replies simulate usage (tokens ~ ceil(chars / 4)) with prompt caching of the system
text, and token log probabilities for the ``true``/``false`` literals of the reply.

The providers' batch APIs (OpenAI Files + Batches, Anthropic Message Batches) are served
by ``tests.fake_llm.batches`` through ``server.batches``; this module only routes their
requests (GET routes, path parameters, multipart bodies, non-JSON replies) to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import itertools
import json
import math
import re
import threading
import time
import urllib.parse
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from tests.fake_llm.batches import BatchSettings, FakeBatches

Wire = Literal["chat", "responses", "anthropic"]
ROUTES: dict[str, Wire] = {
    "/v1/chat/completions": "chat",
    "/chat/completions": "chat",
    "/v1/responses": "responses",
    "/responses": "responses",
    "/v1/messages": "anthropic",
    "/messages": "anthropic",
}
HEALTH_PATHS = ("/health", "/v1/health")
LOGPROBS_INCLUDE = "message.output_text.logprobs"
MIN_PROB = 1e-4
HEADER_LIMIT = 1 << 20
BACKLOG = 2048
DEFAULT_MODEL = "fake-model"


# --- what a responder sees and answers -------------------------------------------------


@dataclass
class FakeRequest:
    """One parsed request, whatever its wire format."""

    wire: Wire
    model: str
    system: str
    user: str
    schema_name: str | None
    wants_logprobs: bool
    body: dict[str, Any]
    headers: dict[str, str]


@dataclass
class FakeAnswer:
    """The JSON object to answer with; ``true_probs``: for each boolean of ``content``
    (in order of appearance in the serialized JSON) the probability of ``true``."""

    content: dict[str, Any]
    true_probs: list[float] | None = None


Responder = Callable[[FakeRequest], FakeAnswer]


# --- scripted behaviours -----------------------------------------------------------------


@dataclass(frozen=True)
class RateLimited:
    """429 with a ``retry-after`` header (seconds) and the provider's error body; an
    OpenAI ``code`` other than the default (``resource_unavailable``: flex processing out
    of capacity)."""

    retry_after: float
    code: str = "rate_limit_exceeded"


@dataclass(frozen=True)
class ServerError:
    status: int = 500


@dataclass(frozen=True)
class BadRequest:
    """A 4xx other than 429 (400, 401, 403, 404, ...) with the provider's error body."""

    status: int = 400
    message: str = "bad request"


@dataclass(frozen=True)
class Hang:
    """Wait this long, then answer normally (the client has usually given up by then)."""

    seconds: float


@dataclass(frozen=True)
class Raw:
    """A normal 200 reply whose message text is exactly ``text`` (for Anthropic: a text
    block, stop reason ``end_turn``, no tool call)."""

    text: str


@dataclass(frozen=True)
class Answer:
    """A normal 200 reply with this JSON object instead of the responder's."""

    content: dict[str, Any]
    true_probs: list[float] | None = None


@dataclass(frozen=True)
class Refusal:
    text: str = "I can't help with that."


Behaviour = RateLimited | ServerError | BadRequest | Hang | Raw | Answer | Refusal


@dataclass(frozen=True)
class RecordedRequest:
    time: float  # time.monotonic() at arrival
    wire: str  # a Wire, or "unknown" for a path no route serves
    path: str
    body: dict[str, Any]
    headers: dict[str, str]
    status: int


# --- request parsing -----------------------------------------------------------------------


def _text_of(content: Any) -> str:
    """A message's content as text: a string, or the text of a list of blocks/parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            str(part.get("text", "")) if isinstance(part, dict) else str(part) for part in content
        )
    return "" if content is None else str(content)


def _roles_text(messages: Any, roles: tuple[str, ...]) -> str:
    if not isinstance(messages, list):
        return ""
    return "\n\n".join(
        _text_of(m.get("content"))
        for m in messages
        if isinstance(m, dict) and m.get("role") in roles
    )


def parse_request(wire: Wire, body: dict[str, Any], headers: dict[str, str]) -> FakeRequest:
    model = str(body.get("model") or DEFAULT_MODEL)
    schema_name: str | None = None
    if wire == "chat":
        messages = body.get("messages")
        system = _roles_text(messages, ("system", "developer"))
        user = _roles_text(messages, ("user",))
        fmt = body.get("response_format")
        if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
            schema_name = (fmt.get("json_schema") or {}).get("name")
        wants = bool(body.get("logprobs"))
    elif wire == "responses":
        items = body.get("input")
        if isinstance(items, str):
            system, user = "", items
        else:
            system = _roles_text(items, ("system", "developer"))
            user = _roles_text(items, ("user",))
        instructions = body.get("instructions")
        if isinstance(instructions, str) and instructions:
            system = f"{instructions}\n\n{system}" if system else instructions
        fmt = (body.get("text") or {}).get("format")
        if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
            schema_name = fmt.get("name")
        wants = LOGPROBS_INCLUDE in (body.get("include") or [])
    else:
        system = _text_of(body.get("system"))
        user = _roles_text(body.get("messages"), ("user",))
        choice = body.get("tool_choice")
        tools = [t for t in body.get("tools") or [] if isinstance(t, dict)]
        if isinstance(choice, dict) and choice.get("type") == "tool":
            schema_name = choice.get("name")
        elif tools and isinstance(choice, dict) and choice.get("type") == "any":
            schema_name = tools[0].get("name")
        wants = False
    return FakeRequest(
        wire=wire,
        model=model,
        system=system,
        user=user,
        schema_name=str(schema_name) if schema_name is not None else None,
        wants_logprobs=wants,
        body=body,
        headers=headers,
    )


def _anthropic_cache_control(body: dict[str, Any]) -> bool:
    system = body.get("system")
    return isinstance(system, list) and any(
        isinstance(b, dict) and b.get("cache_control") for b in system
    )


# --- logprobs -------------------------------------------------------------------------------

# JSON strings are matched whole, so a "true" inside a string is no literal.
_JSON_PIECES = re.compile(r'"(?:[^"\\]|\\.)*"|\btrue\b|\bfalse\b')
_CHUNK = 16


def _alpha(text: str) -> str:
    return "".join(c for c in text if c.isalpha()).lower()


def _chunks(text: str) -> list[str]:
    """Fixed-size pieces; a piece that reads as a bare true/false joins its predecessor,
    so that only the JSON literals look like boolean tokens."""
    pieces: list[str] = []
    for i in range(0, len(text), _CHUNK):
        piece = text[i : i + _CHUNK]
        if pieces and _alpha(piece) in ("true", "false"):
            pieces[-1] += piece
        else:
            pieces.append(piece)
    return pieces


def _entry(token: str, logprob: float) -> dict[str, Any]:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}


def _plain_token(piece: str, top_n: int | None) -> dict[str, Any]:
    entry = _entry(piece, 0.0)
    entry["top_logprobs"] = [_entry(piece, 0.0)][: 1 if top_n is None else max(0, top_n)]
    return entry


def _boolean_token(p: float, top_n: int | None) -> dict[str, Any]:
    p = min(max(p, MIN_PROB), 1.0 - MIN_PROB)
    lp_true, lp_false = math.log(p), math.log(1.0 - p)
    chosen = _entry("true", lp_true) if p >= 0.5 else _entry("false", lp_false)
    alternatives = [_entry("true", lp_true), _entry("false", lp_false)]
    if top_n is not None and top_n < len(alternatives):
        alternatives = [_entry(chosen["token"], chosen["logprob"])][: max(0, top_n)]
    chosen["top_logprobs"] = alternatives
    return chosen


def split_logprobs(
    text: str, true_probs: list[float] | None, top_n: int | None = None
) -> list[dict[str, Any]]:
    """The reply text as tokens with log probabilities: each JSON ``true``/``false``
    literal its own token, carrying the probability of ``true`` given for it (or, with
    none given, a confident one matching the literal), with ``top_logprobs`` [true,
    false]; everything else in chunks with logprob 0. ``top_n`` (the request's
    ``top_logprobs``) below 2 keeps only the chosen token's alternative."""
    segments: list[tuple[str, bool]] = []
    pos = 0
    for match in _JSON_PIECES.finditer(text):
        literal = match.group()
        if literal.startswith('"'):
            continue
        if match.start() > pos:
            segments.append((text[pos : match.start()], False))
        segments.append((literal, True))
        pos = match.end()
    if pos < len(text):
        segments.append((text[pos:], False))
    tokens: list[dict[str, Any]] = []
    n_bool = 0
    for segment, is_literal in segments:
        if not is_literal:
            tokens += [_plain_token(piece, top_n) for piece in _chunks(segment)]
            continue
        if true_probs is not None and n_bool < len(true_probs):
            p = true_probs[n_bool]
        else:
            p = 0.99 if segment == "true" else 0.01
        n_bool += 1
        tokens.append(_boolean_token(p, top_n))
    return tokens


# --- replies --------------------------------------------------------------------------------


def n_tokens(text: str) -> int:
    return -(-len(text) // 4)


@dataclass
class _Outcome:
    """What to answer, before it is put in a wire format."""

    content: dict[str, Any] | None = None
    true_probs: list[float] | None = None
    raw: str | None = None
    refusal: str | None = None


_ERROR_TYPES_OPENAI = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    429: "rate_limit_error",
}
_ERROR_TYPES_ANTHROPIC = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}


def _tier(body: dict[str, Any]) -> str:
    """The tier that served a request: flex when asked for, else the default one."""
    return "flex" if body.get("service_tier") == "flex" else "default"


def error_body(wire: str, status: int, message: str) -> dict[str, Any]:
    if wire == "anthropic":
        kind = _ERROR_TYPES_ANTHROPIC.get(status, "api_error" if status >= 500 else "error")
        return {"type": "error", "error": {"type": kind, "message": message}}
    kind = _ERROR_TYPES_OPENAI.get(status, "server_error" if status >= 500 else "error")
    code = "rate_limit_exceeded" if status == 429 else None
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


@dataclass
class _Reply:
    """An HTTP reply: ``body`` serialized as JSON, or ``raw`` bytes sent as they are with
    ``content_type``; ``delay``: seconds to wait before sending it."""

    status: int
    body: dict[str, Any]
    headers: list[tuple[str, str]] = field(default_factory=list)
    delay: float = 0.0
    raw: bytes | None = None
    content_type: str = "application/json"


# --- routes beyond the three model endpoints ------------------------------------------------


@dataclass(frozen=True)
class HttpRequest:
    """One request as a ``Route`` handler sees it: ``query`` keeps the last value of each
    parameter, ``params`` the path parameters (the route pattern's named groups),
    ``body`` the raw bytes; ``arrival`` is ``time.monotonic()`` once the body was in."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes
    arrival: float
    params: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Route:
    """``method`` on the paths ``pattern`` matches whole, answered by ``handler``;
    ``wire``: whose error body a 405 on these paths gets."""

    method: str
    pattern: re.Pattern[str]
    handler: Callable[[HttpRequest], _Reply]
    wire: Wire = "chat"


@dataclass(frozen=True)
class FormField:
    """One field of a ``multipart/form-data`` body."""

    name: str
    data: bytes
    filename: str | None = None
    content_type: str | None = None


_BOUNDARY = re.compile(r'boundary=(?:"([^"]+)"|([^;\s]+))', re.IGNORECASE)
_DISPOSITION_PARAM = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_multipart(content_type: str, body: bytes) -> dict[str, FormField]:
    """The fields of a ``multipart/form-data`` body by name (the last one of a repeated
    name wins); ValueError when the content type has no boundary or a part is malformed."""
    match = _BOUNDARY.search(content_type)
    if not content_type.lower().startswith("multipart/form-data") or match is None:
        raise ValueError("not a multipart/form-data body with a boundary")
    delimiter = b"--" + (match.group(1) or match.group(2)).encode("latin-1")
    fields: dict[str, FormField] = {}
    for chunk in body.split(delimiter)[1:]:
        if chunk.startswith(b"--"):
            break
        head, sep, data = chunk.removeprefix(b"\r\n").partition(b"\r\n\r\n")
        if not sep:
            raise ValueError("a multipart part without a header block")
        part_headers: dict[str, str] = {}
        for line in head.decode("utf-8", "replace").split("\r\n"):
            name, colon, value = line.partition(":")
            if colon:
                part_headers[name.strip().lower()] = value.strip()
        params = dict(_DISPOSITION_PARAM.findall(part_headers.get("content-disposition", "")))
        if "name" not in params:
            raise ValueError("a multipart part without a name")
        fields[params["name"]] = FormField(
            name=params["name"],
            data=data.removesuffix(b"\r\n"),
            filename=params.get("filename"),
            content_type=part_headers.get("content-type"),
        )
    return fields


# --- the server -----------------------------------------------------------------------------


class FakeLLMServer:
    """A fake OpenAI/Anthropic endpoint on 127.0.0.1; see the module docstring."""

    def __init__(
        self,
        responder: Responder,
        latency: float = 0.0,
        port: int = 0,
        host: str = "127.0.0.1",
        batch_settings: BatchSettings | None = None,
    ) -> None:
        from tests.fake_llm.batches import FakeBatches  # it builds on this module

        self.responder = responder
        self.latency = latency
        self.host = host
        self._port = port
        self._lock = threading.Lock()
        self._script: deque[Behaviour] = deque()
        self._records: list[RecordedRequest] = []
        self._seen_system: set[tuple[str, str]] = set()
        self._ids = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        self._stopping: asyncio.Event | None = None
        self.batches: FakeBatches = FakeBatches(self, batch_settings)
        """The batch APIs: their settings, records and scripts (``tests.fake_llm.batches``)."""
        self._routes: list[Route] = self.batches.routes()

    # lifecycle

    def start(self) -> FakeLLMServer:
        if self._thread is not None:
            return self
        self._ready.clear()
        self._startup_error = None
        self._thread = threading.Thread(target=self._run, name="fake-llm-server", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._startup_error is not None:
            self._thread.join()
            self._thread = None
            raise RuntimeError("the fake LLM server did not start") from self._startup_error
        return self

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        stopping = self._stopping
        if stopping is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(stopping.set)
        thread.join(timeout=10)
        self._thread = None
        self._loop = None

    def __enter__(self) -> FakeLLMServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        return self._port

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self._port}"

    # scripting and records

    def script(self, *behaviours: Behaviour) -> None:
        """Queue behaviours, consumed one per incoming request in arrival order."""
        with self._lock:
            self._script.extend(behaviours)

    @property
    def pending(self) -> int:
        """Scripted behaviours not consumed yet."""
        with self._lock:
            return len(self._script)

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._records)

    def reset(self) -> None:
        """Forget the recorded requests, the script and the prompt cache, and the batch
        state (``FakeBatches.reset``)."""
        with self._lock:
            self._records.clear()
            self._script.clear()
            self._seen_system.clear()
        self.batches.reset()  # not under self._lock: the batches take it while answering

    def answer_line(
        self, wire: Wire, body: dict[str, Any], headers: dict[str, str]
    ) -> tuple[int, dict[str, Any]]:
        """The status and JSON body the synchronous endpoint of ``wire`` would answer for
        ``body``, consuming the next scripted behaviour (a ``Hang`` answers at once) and
        sharing the prompt cache, but not recorded in ``requests``: for batch lines."""
        with self._lock:
            behaviour = self._script.popleft() if self._script else None
        reply = self._answer(wire, body, headers, behaviour)
        return reply.status, reply.body

    # the event loop

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        except BaseException as exc:  # reported to start() when it happens there
            self._startup_error = exc
        finally:
            self._ready.set()
            loop.close()

    async def _serve(self) -> None:
        self._stopping = asyncio.Event()
        self._server = await asyncio.start_server(
            self._connection, self.host, self._port, backlog=BACKLOG, limit=HEADER_LIMIT
        )
        self._port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        await self._stopping.wait()
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            while await self._one_request(reader, writer):
                pass
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        except ValueError:  # a malformed Content-Length or chunk size
            pass
        except asyncio.CancelledError:
            pass
        finally:
            self._tasks.discard(task)
            with contextlib.suppress(Exception):
                writer.close()

    async def _one_request(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        """Serve one request; False when the connection should close."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return False
        request_line, _, header_block = head[:-4].decode("latin-1").partition("\r\n")
        parts = request_line.split(" ")
        if len(parts) != 3:
            await self._write(writer, _Reply(400, error_body("chat", 400, "bad request line")))
            return False
        method, target, version = parts
        headers: dict[str, str] = {}
        for line in header_block.split("\r\n"):
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        raw = await self._read_body(reader, headers)
        connection = headers.get("connection", "").lower()
        keep_alive = connection != "close" and (version == "HTTP/1.1" or connection == "keep-alive")
        # Stamped once the whole request is in and recorded without an await in between,
        # so records (and scripted behaviours) follow arrival order.
        arrival = time.monotonic()
        path, _, query = target.partition("?")
        reply = self._respond(method, path, query, headers, raw, arrival)
        delay = reply.delay + self.latency
        if delay > 0:
            await asyncio.sleep(delay)
        if writer.transport.is_closing():
            return False
        await self._write(writer, reply, keep_alive)
        return keep_alive

    @staticmethod
    async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
        if "chunked" in headers.get("transfer-encoding", "").lower():
            chunks: list[bytes] = []
            while True:
                size_line = await reader.readuntil(b"\r\n")
                size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while await reader.readuntil(b"\r\n") != b"\r\n":
                        pass
                    return b"".join(chunks)
                chunks.append(await reader.readexactly(size))
                await reader.readexactly(2)
        length = int(headers.get("content-length", "0") or 0)
        return await reader.readexactly(length) if length > 0 else b""

    @staticmethod
    async def _write(writer: asyncio.StreamWriter, reply: _Reply, keep_alive: bool = False) -> None:
        payload = reply.raw if reply.raw is not None else json.dumps(reply.body).encode("utf-8")
        phrase = _PHRASES.get(reply.status, "Status")
        lines = [
            f"HTTP/1.1 {reply.status} {phrase}",
            f"content-type: {reply.content_type}",
            f"content-length: {len(payload)}",
            f"connection: {'keep-alive' if keep_alive else 'close'}",
            *(f"{name}: {value}" for name, value in reply.headers),
        ]
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        try:
            writer.write(head + payload)
            await writer.drain()
        except (ConnectionError, RuntimeError):
            pass

    # answering

    def _record(
        self, arrival: float, wire: str, path: str, body: dict[str, Any], headers: dict[str, str],
        status: int,
    ) -> None:  # fmt: skip
        with self._lock:
            self._records.append(RecordedRequest(arrival, wire, path, body, headers, status))

    def _routed(
        self, method: str, path: str, query: str, headers: dict[str, str], raw: bytes,
        arrival: float,
    ) -> _Reply | None:  # fmt: skip
        """The reply of the extra route serving ``path`` (405 when none takes ``method``),
        or None when none matches it."""
        matched: Route | None = None
        for route in self._routes:
            match = route.pattern.fullmatch(path)
            if match is None:
                continue
            matched = route
            if route.method == method:
                pairs = urllib.parse.parse_qsl(query, keep_blank_values=True)
                request = HttpRequest(
                    method, path, dict(pairs), headers, raw, arrival, match.groupdict()
                )
                return route.handler(request)
        if matched is not None:
            message = f"{method} not allowed on {path}"
            return _Reply(405, error_body(matched.wire, 405, message))
        return None

    def _respond(
        self, method: str, path: str, query: str, headers: dict[str, str], raw: bytes,
        arrival: float,
    ) -> _Reply:  # fmt: skip
        if path in HEALTH_PATHS and method == "GET":
            return _Reply(200, {"status": "ok"})
        wire = ROUTES.get(path)
        if wire is None:
            routed = self._routed(method, path, query, headers, raw, arrival)
            if routed is not None:
                return routed
            reply = _Reply(404, error_body("chat", 404, f"no route for {method} {path}"))
            self._record(arrival, "unknown", path, {}, headers, reply.status)
            return reply
        if method != "POST":
            reply = _Reply(405, error_body(wire, 405, f"{method} not allowed on {path}"))
            self._record(arrival, wire, path, {}, headers, reply.status)
            return reply
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        if not isinstance(body, dict):
            reply = _Reply(400, error_body(wire, 400, "the body is not a JSON object"))
            self._record(arrival, wire, path, {}, headers, reply.status)
            return reply
        with self._lock:
            behaviour = self._script.popleft() if self._script else None
        reply = self._answer(wire, body, headers, behaviour)
        self._record(arrival, wire, path, body, headers, reply.status)
        return reply

    def _answer(
        self, wire: Wire, body: dict[str, Any], headers: dict[str, str], behaviour: Behaviour | None
    ) -> _Reply:
        if isinstance(behaviour, RateLimited):
            error = error_body(wire, 429, "Rate limit reached; please try again later.")
            if wire != "anthropic":
                error["error"]["code"] = behaviour.code
            return _Reply(429, error, [("retry-after", str(behaviour.retry_after))])
        if isinstance(behaviour, ServerError):
            return _Reply(behaviour.status, error_body(wire, behaviour.status, "server error"))
        if isinstance(behaviour, BadRequest):
            return _Reply(behaviour.status, error_body(wire, behaviour.status, behaviour.message))
        request = parse_request(wire, body, headers)
        delay = 0.0
        if isinstance(behaviour, Raw):
            outcome = _Outcome(raw=behaviour.text)
        elif isinstance(behaviour, Answer):
            outcome = _Outcome(content=behaviour.content, true_probs=behaviour.true_probs)
        elif isinstance(behaviour, Refusal):
            outcome = _Outcome(refusal=behaviour.text)
        else:
            if isinstance(behaviour, Hang):
                delay = behaviour.seconds
            try:
                answer = self.responder(request)
            except Exception as exc:
                message = f"responder failed: {type(exc).__name__}: {exc}"
                return _Reply(500, error_body(wire, 500, message), delay=delay)
            outcome = _Outcome(content=answer.content, true_probs=answer.true_probs)
        reply = self._format(request, outcome)
        reply.delay = delay
        return reply

    def _cached(self, wire: Wire, system: str, cacheable: bool = True) -> bool:
        """Whether the system text is already in this wire's prompt cache (and put it there)."""
        if not cacheable or not system:
            return False
        key = (wire, system)
        with self._lock:
            if key in self._seen_system:
                return True
            self._seen_system.add(key)
            return False

    def _format(self, request: FakeRequest, outcome: _Outcome) -> _Reply:
        text = outcome.raw
        if text is None and outcome.content is not None:
            text = json.dumps(outcome.content, ensure_ascii=False)
        number = next(self._ids)
        if request.wire == "chat":
            return _Reply(200, self._chat(request, outcome, text, number))
        if request.wire == "responses":
            return _Reply(200, self._responses(request, outcome, text, number))
        return _Reply(200, self._anthropic(request, outcome, text, number))

    def _top_n(self, request: FakeRequest) -> int | None:
        n = request.body.get("top_logprobs")
        return n if isinstance(n, int) and not isinstance(n, bool) else None

    def _chat(
        self, request: FakeRequest, outcome: _Outcome, text: str | None, number: int
    ) -> dict[str, Any]:
        system_tokens = n_tokens(request.system)
        prompt_tokens = system_tokens + n_tokens(request.user)
        cached = system_tokens if self._cached("chat", request.system) else 0
        output_tokens = n_tokens(outcome.refusal if outcome.refusal is not None else text or "")
        logprobs: dict[str, Any] | None = None
        if outcome.refusal is not None:
            message: dict[str, Any] = {
                "role": "assistant", "content": None, "refusal": outcome.refusal,
                "annotations": [],
            }  # fmt: skip
        else:
            message = {"role": "assistant", "content": text, "refusal": None, "annotations": []}
            if request.wants_logprobs:
                tokens = split_logprobs(text or "", outcome.true_probs, self._top_n(request))
                logprobs = {"content": tokens, "refusal": None}
        return {
            "id": f"chatcmpl-fake{number:08d}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": request.model,
            "choices": [
                {"index": 0, "message": message, "logprobs": logprobs, "finish_reason": "stop"}
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": output_tokens,
                "total_tokens": prompt_tokens + output_tokens,
                "prompt_tokens_details": {"cached_tokens": cached, "audio_tokens": 0},
                "completion_tokens_details": {
                    "reasoning_tokens": 0,
                    "audio_tokens": 0,
                    "accepted_prediction_tokens": 0,
                    "rejected_prediction_tokens": 0,
                },
            },
            "service_tier": _tier(request.body),
            "system_fingerprint": "fp_fake",
        }

    def _responses(
        self, request: FakeRequest, outcome: _Outcome, text: str | None, number: int
    ) -> dict[str, Any]:
        system_tokens = n_tokens(request.system)
        input_tokens = system_tokens + n_tokens(request.user)
        cached = system_tokens if self._cached("responses", request.system) else 0
        part: dict[str, Any]
        if outcome.refusal is not None:
            part = {"type": "refusal", "refusal": outcome.refusal}
            output_tokens = n_tokens(outcome.refusal)
        else:
            logprobs: list[dict[str, Any]] = []
            if request.wants_logprobs:
                logprobs = split_logprobs(text or "", outcome.true_probs, self._top_n(request))
            part = {"type": "output_text", "text": text or "", "annotations": [],
                    "logprobs": logprobs}  # fmt: skip
            output_tokens = n_tokens(text or "")
        now = time.time()
        body = request.body
        return {
            "id": f"resp_fake{number:08d}",
            "object": "response",
            "created_at": int(now),
            "completed_at": int(now),
            "status": "completed",
            "background": False,
            "error": None,
            "incomplete_details": None,
            "instructions": body.get("instructions"),
            "max_output_tokens": body.get("max_output_tokens"),
            "model": request.model,
            "output": [
                {
                    "id": f"msg_fake{number:08d}",
                    "type": "message",
                    "status": "completed",
                    "role": "assistant",
                    "content": [part],
                }
            ],
            "parallel_tool_calls": True,
            "previous_response_id": None,
            "reasoning": {"effort": None, "summary": None},
            "store": bool(body.get("store", True)),
            "service_tier": _tier(body),
            "temperature": 1.0,
            "text": body.get("text") or {"format": {"type": "text"}},
            "tool_choice": "auto",
            "tools": [],
            "top_logprobs": self._top_n(request) or 0,
            "top_p": 1.0,
            "truncation": "disabled",
            "usage": {
                "input_tokens": input_tokens,
                "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
                "output_tokens": output_tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": input_tokens + output_tokens,
            },
            "metadata": {},
        }

    def _anthropic(
        self, request: FakeRequest, outcome: _Outcome, text: str | None, number: int
    ) -> dict[str, Any]:
        cache_control = _anthropic_cache_control(request.body)
        system_tokens = n_tokens(request.system)
        user_tokens = n_tokens(request.user)
        created = read = 0
        if cache_control and request.system:
            if self._cached("anthropic", request.system):
                read = system_tokens
            else:
                created = system_tokens
            input_tokens = user_tokens
        else:
            input_tokens = system_tokens + user_tokens
        content: list[dict[str, Any]]
        if outcome.refusal is not None:
            content, stop_reason, output_tokens = [], "refusal", 0
        elif outcome.raw is None and outcome.content is not None and request.schema_name:
            content = [
                {
                    "type": "tool_use",
                    "id": f"toolu_fake{number:08d}",
                    "name": request.schema_name,
                    "input": outcome.content,
                }
            ]
            stop_reason, output_tokens = "tool_use", n_tokens(text or "")
        else:
            content = [{"type": "text", "text": text or ""}]
            stop_reason, output_tokens = "end_turn", n_tokens(text or "")
        return {
            "id": f"msg_fake{number:08d}",
            "type": "message",
            "role": "assistant",
            "model": request.model,
            "content": content,
            "stop_reason": stop_reason,
            "stop_sequence": None,
            "usage": {
                "input_tokens": input_tokens,
                "output_tokens": output_tokens,
                "cache_creation_input_tokens": created,
                "cache_read_input_tokens": read,
                "service_tier": "standard",
            },
        }


_PHRASES = {s.value: s.phrase for s in http.HTTPStatus}

__all__ = [
    "Answer",
    "BadRequest",
    "Behaviour",
    "FakeAnswer",
    "FakeLLMServer",
    "FakeRequest",
    "FormField",
    "Hang",
    "HttpRequest",
    "RateLimited",
    "Raw",
    "RecordedRequest",
    "Refusal",
    "Responder",
    "Route",
    "ServerError",
    "Wire",
    "error_body",
    "n_tokens",
    "parse_multipart",
    "parse_request",
    "split_logprobs",
]
