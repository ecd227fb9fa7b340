"""``labeler review RUN --web``: the review page, served on 127.0.0.1 only.

One page (``review_page.html``, package data next to this module) and a small JSON API
over :mod:`labeler.review.queue`:

- ``GET /`` and ``GET /feature/ID``: the page (status 404 for a feature not planned);
- ``GET /api/session``: the server's reviewer, the queue setting and the taxonomy;
- ``GET /api/queue[?include_decided=0|1]``: the review queue (:func:`review_queue`): the
  audited features in audit order, each with its place (``audit``), then the disputed
  ones, most informative first, each with its preferred judge's explanation (the page
  hides an undecided audited one's);
- ``GET /api/feature/ID``: everything about one feature, each judge's scores of every
  scorer (``scores``: detection, ``fuzz``, ``intruder``;
  :func:`labeler.review.feature_page.judge_scores`), with
  ``disagreement`` and its
  output score's promoted tokens as shown (``promoted_shown``, :mod:`labeler.review.tokens`),
  its place in an audit (``audit``) and whether it is ``blind`` (audited, undecided: the
  page hides the judges until asked), each judge's resampled confidence
  (``resample_confidence``, ``resamples``);
- ``POST /api/feature/ID/decision``: append a decision (one flat JSON object of at most
  ``MAX_BODY`` bytes; anything else is a 400 or 413 with a one-line reason); answers it
  (201), every decision on the feature and whether the reviewers disagree. A
  ``decision_key`` the page sends with it is stored with the decision, so a repeated
  request (the page's retry after an answer it never got, even from a server restarted
  meanwhile) answers the decision already stored (200) instead of storing it again.

The label store's SQLite connection belongs to the thread that opened it, so the HTTP
server reads requests on threads of its own (an idle connection a browser opens ahead of
time never blocks it; the listen backlog takes bursts of clients) and hands each one to
the thread that called :func:`serve`, which does all the store work, one request at a
time. An app may answer some requests on a lane of its own (the catalog browser's
searches), a thread that never waits for the store's.
"""

from __future__ import annotations

import json
import logging
import queue
import re
import secrets
import signal
import threading
from collections.abc import Callable
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import TYPE_CHECKING, cast
from urllib.parse import parse_qs, unquote, urlsplit

from labeler.errors import USER_ERRORS, UserError
from labeler.labeling.store import LabelStore
from labeler.reporting.disputes import DisputeRules
from labeler.review.feature_page import feature_payload
from labeler.review.queue import (
    UnknownFeature,
    record_decision_once,
    review_queue,
    reviewers_disagree,
)
from labeler.run.data import RunData
from labeler.run.schemas import ReviewDecision
from prompts import CATEGORIES, load_taxonomy

if TYPE_CHECKING:
    from labeler.review.neighbours import NeighbourIndex

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
PAGE = "review_page.html"
NONCE_MARK = "__CSP_NONCE__"
MAX_BODY = 64 * 1024
DISCARD_LIMIT = 16 * MAX_BODY  # a larger refused body is not read: the connection closes
REQUEST_TIMEOUT_S = 120.0
IDLE_CONNECTION_S = 30
LISTEN_BACKLOG = 512  # connections the kernel holds until they are accepted
DECISION_FIELDS = ("action", "category", "subcategory", "mechanism", "domain_type", "note",
                   "reviewer")  # fmt: skip
DECISION_KEY = "decision_key"
MAX_KEY = 100
_CHOICE_FIELDS = ("category", "subcategory", "mechanism", "domain_type")
_JSON = "application/json; charset=utf-8"
_HTML = "text/html; charset=utf-8"
_TRUE, _FALSE = ("1", "true", "yes"), ("0", "false", "no")


@dataclass(frozen=True)
class Request:
    """An HTTP request as the review app sees it."""

    method: str
    path: str
    query: dict[str, list[str]] = field(default_factory=dict)
    body: bytes = b""
    host: str = ""
    origin: str | None = None
    content_type: str = ""


@dataclass(frozen=True)
class Response:
    """An answer; ``nonce`` is the Content-Security-Policy nonce of an HTML page."""

    status: int
    content_type: str
    body: bytes
    nonce: str | None = None
    headers: tuple[tuple[str, str], ...] = ()


def json_response(status: int, data: object) -> Response:
    return Response(status, _JSON, json.dumps(data, ensure_ascii=False).encode("utf-8"))


def error_response(status: int, message: str, **extra: object) -> Response:
    """``{"error": message, ...}``: what the client sees of any failure (never a traceback)."""
    return json_response(status, {"error": message, **extra})


def security_headers(nonce: str | None) -> list[tuple[str, str]]:
    """Headers on every answer: only the page's own inline script and style (by nonce) run,
    it talks only to this server, nothing is framed, sniffed or cached; Trusted Types make
    any HTML-string sink (innerHTML and the like) throw instead of parsing."""
    own = f"'nonce-{nonce}'" if nonce else "'none'"
    policy = (
        f"default-src 'none'; script-src {own}; style-src {own}; connect-src 'self'; "
        "img-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'; "
        "require-trusted-types-for 'script'; trusted-types 'none'"
    )
    return [
        ("Content-Security-Policy", policy),
        ("X-Content-Type-Options", "nosniff"),
        ("X-Frame-Options", "DENY"),
        ("Referrer-Policy", "no-referrer"),
        ("Cross-Origin-Opener-Policy", "same-origin"),
        ("Cross-Origin-Resource-Policy", "same-origin"),
        ("Cache-Control", "no-store"),
    ]


def read_page(name: str = PAGE) -> str:
    """One of the package's HTML pages, with its nonce placeholder."""
    try:
        page = resources.files(__package__ or "labeler.review").joinpath(name).read_text("utf-8")
    except FileNotFoundError:
        raise UserError(
            f"{name} is missing from the installed labeler package (package data); "
            "reinstall the package"
        ) from None
    if NONCE_MARK not in page:
        raise UserError(f"{name}: no {NONCE_MARK} placeholder for the script's nonce")
    return page


Route = tuple[re.Pattern[str], dict[str, Callable[..., Response]]]


class ReviewApp:
    """The review server's answers without the HTTP: ``handle`` turns a request into a
    response. Call it only from the thread that opened ``store``, except for requests
    that ``lane`` sends elsewhere."""

    lanes: tuple[str, ...] = ()  # threads of its own, besides the store's, that answer

    def __init__(
        self,
        run: RunData,
        store: LabelStore,
        rules: DisputeRules,
        reviewer: str,
        include_decided: bool,
    ) -> None:
        self.run = run
        self.store = store
        self.rules = rules
        self.reviewer = reviewer.strip()
        self.include_decided = include_decided
        self.catalog = False  # whether "/" is the catalog (labeler browse) or the queue
        self.neighbours: NeighbourIndex | None = None  # each feature's nearest (browse builds it)
        self.page = read_page()
        self.hosts: frozenset[str] = frozenset()
        self.routes: list[Route] = [
            (re.compile(r"/"), {"GET": self._index}),
            (re.compile(r"/feature/([^/]+)"), {"GET": self._feature_page}),
            (re.compile(r"/api/session"), {"GET": self._session}),
            (re.compile(r"/api/queue"), {"GET": self._queue}),
            (re.compile(r"/api/feature/([^/]+)"), {"GET": self._feature}),
            (re.compile(r"/api/feature/([^/]+)/decision"), {"POST": self._decide}),
        ]

    def bind(self, port: int) -> None:
        """Answer only requests addressed to this port on the loopback interface (a page
        elsewhere that rebinds its own name to 127.0.0.1 gets nothing)."""
        self.hosts = frozenset({f"{HOST}:{port}", f"localhost:{port}"})

    def lane(self, request: Request) -> str | None:
        """Which of ``lanes`` answers ``request``; None: the store's thread."""
        return None

    def handle(self, request: Request) -> Response:
        try:
            if request.host not in self.hosts:
                return error_response(403, f"this server answers only {HOST} on its own port")
            origins = {f"http://{h}" for h in self.hosts}
            if request.method == "POST" and request.origin not in (None, *origins):
                return error_response(403, "decisions are accepted from the review page only")
            return self._route(request)
        except Exception:  # the client gets a short message, the log the traceback
            log.exception("review page: %s %s failed", request.method, request.path)
            return error_response(500, "internal error; the server's log says what went wrong")

    def _route(self, request: Request) -> Response:
        for pattern, methods in self.routes:
            match = pattern.fullmatch(request.path)
            if match is None:
                continue
            answer = methods.get(request.method)
            if answer is None:
                allowed = ", ".join(methods)
                return Response(
                    405, _JSON, json.dumps({"error": f"use {allowed}"}).encode(),
                    headers=(("Allow", allowed),),
                )  # fmt: skip
            return answer(request, *(unquote(g) for g in match.groups()))
        return error_response(404, "no such page")

    def _page(self, status: int, page: str | None = None) -> Response:
        nonce = secrets.token_urlsafe(18)
        body = (page or self.page).replace(NONCE_MARK, nonce).encode()
        return Response(status, _HTML, body, nonce)

    def _index(self, request: Request) -> Response:
        return self._page(200)

    def _feature_page(self, request: Request, feature_id: str) -> Response:
        """The page; it shows the feature, or says it does not exist (status 404)."""
        return self._page(200 if self.store.is_planned(feature_id) else 404)

    def _session(self, request: Request) -> Response:
        taxonomy = load_taxonomy()
        return json_response(200, {
            "run": str(self.run.folder),
            "reviewer": self.reviewer,
            "include_decided": self.include_decided,
            "catalog": self.catalog,
            "categories": {c: taxonomy.categories.get(c, "") for c in CATEGORIES},
            "subcategories": taxonomy.subcategories,
            "mechanisms": taxonomy.mechanisms,
            "domain_types": taxonomy.domain_types,
        })  # fmt: skip

    def _queue(self, request: Request) -> Response:
        include = self.include_decided
        asked = request.query.get("include_decided")
        if asked:
            if asked[-1].lower() not in _TRUE + _FALSE:
                return error_response(400, "include_decided: use 1 or 0", field="include_decided")
            include = asked[-1].lower() in _TRUE
        items = review_queue(self.store, self.rules, include_decided=include)
        return json_response(200, [item.model_dump(mode="json") for item in items])

    def _feature(self, request: Request, feature_id: str) -> Response:
        try:
            data = feature_payload(self.run, self.store, self.rules, feature_id, self.neighbours)
        except UnknownFeature as exc:
            return error_response(404, str(exc), feature_id=feature_id)
        return json_response(200, data)

    def _decide(self, request: Request, feature_id: str) -> Response:
        if request.content_type.split(";")[0].strip().lower() != "application/json":
            return error_response(415, "send the decision as JSON (Content-Type: application/json)")
        try:
            body = json.loads(request.body.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            return error_response(400, f"the body is not JSON: {exc}")
        except RecursionError:
            return error_response(
                400, "the body is nested too deeply; a decision is one flat JSON object"
            )
        if not isinstance(body, dict):
            return error_response(400, "the body must be a JSON object")
        unknown = sorted(set(body) - set(DECISION_FIELDS) - {"feature_id", DECISION_KEY})
        if unknown:
            return error_response(
                400, f"unknown field {unknown[0]!r}; expected {', '.join(DECISION_FIELDS)}",
                field=unknown[0],
            )  # fmt: skip
        nested = next((k for k, v in body.items() if isinstance(v, dict | list)), None)
        if nested is not None:
            kind = "an object" if isinstance(body[nested], dict) else "an array"
            return error_response(
                400, f"{nested}: must be a string or null, not {kind}", field=nested
            )
        if body.get("feature_id", feature_id) != feature_id:
            return error_response(400, "feature_id: differs from the address", field="feature_id")
        reviewer = body.get("reviewer") or ""
        if not isinstance(reviewer, str):
            return error_response(400, "reviewer: must be a name", field="reviewer")
        reviewer = reviewer.strip() or self.reviewer
        if not reviewer:
            return error_response(
                400, "reviewer: a reviewer name is needed (send one, or start the server "
                "with --reviewer NAME)", field="reviewer",
            )  # fmt: skip
        key = body.get(DECISION_KEY)
        if key is not None and (not isinstance(key, str) or not 0 < len(key) <= MAX_KEY):
            return error_response(
                400, f"{DECISION_KEY}: must be a string of 1 to {MAX_KEY} characters",
                field=DECISION_KEY,
            )  # fmt: skip
        fields: dict[str, object] = {k: v for k, v in body.items() if k in DECISION_FIELDS}
        for name in _CHOICE_FIELDS:  # an unset select sends ""
            if fields.get(name) == "":
                fields[name] = None
        fields |= {"feature_id": feature_id, "reviewer": reviewer}
        try:
            decision, stored = record_decision_once(self.store, fields, key)
        except UnknownFeature as exc:
            return error_response(404, str(exc), feature_id=feature_id)
        except USER_ERRORS as exc:
            return error_response(400, str(exc))
        if not stored:  # the page's retry of a decision stored before
            return self._decided(200, decision)
        log.info("%s: %s %s by %s", feature_id, decision.action, decision.category or "", reviewer)
        return self._decided(201, decision)

    def _decided(self, status: int, decision: ReviewDecision) -> Response:
        """The answer to a stored decision: it, every decision on its feature and whether
        the reviewers disagree."""
        reviews = self.store.reviews(decision.feature_id)
        return json_response(status, {
            "decision": decision.model_dump(mode="json"),
            "reviews": [r.model_dump(mode="json") for r in reviews],
            "disagreement": reviewers_disagree(reviews),
        })  # fmt: skip


class _OwnerThread:
    """Runs calls, one at a time, on the thread that owns the label store."""

    def __init__(self) -> None:
        self._calls: queue.Queue[tuple[Callable[[], Response], Future[Response]]] = queue.Queue()
        self._closed = threading.Event()

    def call(self, work: Callable[[], Response]) -> Response:
        """From a server thread: the owner thread's answer (503 once it stops)."""
        if self._closed.is_set():
            return error_response(503, "the review server is stopping")
        future: Future[Response] = Future()
        self._calls.put((work, future))
        try:
            return future.result(timeout=REQUEST_TIMEOUT_S)
        except (CancelledError, TimeoutError):
            return error_response(503, "the review server is stopping or busy; try again")

    def run(self, stop: threading.Event) -> None:
        """Answer calls until ``stop`` is set; a KeyboardInterrupt ends it (raised)."""
        while not stop.is_set():
            try:
                work, future = self._calls.get(timeout=0.2)
            except queue.Empty:
                continue
            if not future.set_running_or_notify_cancel():
                continue
            try:
                response = work()
            except BaseException:  # Ctrl-C while answering: the client hears why, then stop
                future.set_result(error_response(503, "the review server is stopping"))
                raise
            future.set_result(response)

    def close(self) -> None:
        self._closed.set()
        while True:
            try:
                _, future = self._calls.get_nowait()
            except queue.Empty:
                return
            future.cancel()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = LISTEN_BACKLOG

    def __init__(self, address: tuple[str, int], answer: Callable[[Request], Response]) -> None:
        super().__init__(address, _Handler)
        self.answer = answer

    def handle_error(self, request: object, client_address: object) -> None:
        log.warning("review page: connection from %s failed", client_address, exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    server_version = "labeler-review"
    sys_version = ""
    timeout = IDLE_CONNECTION_S

    def version_string(self) -> str:
        return self.server_version

    def do_GET(self) -> None:
        self._answer("GET")

    def do_HEAD(self) -> None:
        self._answer("GET", head=True)

    def do_POST(self) -> None:
        self._answer("POST")

    def do_PUT(self) -> None:
        self._answer("PUT")

    def do_PATCH(self) -> None:
        self._answer("PATCH")

    def do_DELETE(self) -> None:
        self._answer("DELETE")

    def do_OPTIONS(self) -> None:
        self._answer("OPTIONS")

    def _answer(self, method: str, head: bool = False) -> None:
        self._send(self._read(method), head)

    def _read(self, method: str) -> Response:
        size = self.headers.get("Content-Length")
        body = b""
        if size is not None:
            if not size.isdigit():
                self.close_connection = True
                return error_response(400, "bad Content-Length")
            if int(size) > MAX_BODY:
                self._discard(int(size))
                return error_response(413, f"the body is over {MAX_BODY} bytes")
            body = self.rfile.read(int(size))
        elif self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            return error_response(411, "send a Content-Length")
        url = urlsplit(self.path)
        request = Request(
            method=method,
            path=url.path,
            query=parse_qs(url.query),
            body=body,
            host=self.headers.get("Host", ""),
            origin=self.headers.get("Origin"),
            content_type=self.headers.get("Content-Type", ""),
        )
        return cast(_Server, self.server).answer(request)

    def _discard(self, size: int) -> None:
        """Read and drop a refused body up to DISCARD_LIMIT, so that the client reads the
        answer rather than a reset connection; past it, close the connection."""
        if size > DISCARD_LIMIT:
            self.close_connection = True
            return
        while size > 0:
            chunk = self.rfile.read(min(size, MAX_BODY))
            if not chunk:
                break
            size -= len(chunk)

    def _send(self, response: Response, head: bool = False) -> None:
        self.send_response(response.status)
        for name, value in [*security_headers(response.nonce), *response.headers]:
            self.send_header(name, value)
        self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(len(response.body)))
        self.end_headers()
        if not head:
            self.wfile.write(response.body)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Malformed requests and unknown methods: a JSON error with the same headers."""
        self.close_connection = True
        try:
            phrase = HTTPStatus(code).phrase
        except ValueError:
            phrase = "error"
        self._send(error_response(code, message or phrase), head=self.command == "HEAD")

    def log_message(self, format: str, *args: object) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    def log_error(self, format: str, *args: object) -> None:
        log.info("%s %s", self.address_string(), format % args)


def _hear_ctrl_c() -> None:
    """Make Ctrl-C stop the server even when the process that started this one ignored
    or blocked SIGINT (both are inherited: a script's background job, a test runner's
    worker); only the main thread can install the handler."""
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGINT) in (signal.SIG_IGN, signal.SIG_DFL, None):
        signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def serve(
    run: RunData,
    store: LabelStore,
    rules: DisputeRules,
    reviewer: str,
    port: int,
    include_decided: bool,
    on_ready: Callable[[str], object] | None = None,
    stop: threading.Event | None = None,
    app: ReviewApp | None = None,
) -> None:
    """Serve the review page on 127.0.0.1:``port`` (0: a free port) until Ctrl-C (which
    returns normally) or until ``stop`` is set. ``on_ready`` gets the page's URL once it
    answers. Call it from the thread that opened ``store``: all store work happens there.
    ``reviewer`` ("" for none) is used for decisions that name no reviewer. ``app``: what
    answers (the catalog browser's), made on this thread; by default the review page's."""
    app = app or ReviewApp(run, store, rules, reviewer, include_decided)
    owner = _OwnerThread()
    lanes = {name: _OwnerThread() for name in app.lanes}
    _hear_ctrl_c()

    def answer(request: Request) -> Response:
        lane = lanes.get(app.lane(request) or "", owner)
        return lane.call(lambda: app.handle(request))

    try:
        server = _Server((HOST, port), answer)
    except (OSError, OverflowError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise UserError(
            f"--port {port}: cannot serve on {HOST}:{port} ({reason}); --port 0 picks a free one"
        ) from None
    app.bind(server.server_port)
    url = f"http://{HOST}:{server.server_port}/"
    stopped = threading.Event()
    threads = [
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                         name="review-web", daemon=True),
        *(threading.Thread(target=lane.run, args=(stopped,), name=f"review-{name}", daemon=True)
          for name, lane in lanes.items()),
    ]  # fmt: skip
    for thread in threads:
        thread.start()
    log.info("review page at %s", url)
    try:
        if on_ready is not None:
            on_ready(url)
        owner.run(stop or threading.Event())
    except KeyboardInterrupt:
        log.info("review page stopped")
    finally:
        for lane in (owner, *lanes.values()):
            lane.close()
        stopped.set()
        server.shutdown()
        server.server_close()
        for thread in threads:
            thread.join()
