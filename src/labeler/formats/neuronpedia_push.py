"""Send an exported Neuronpedia folder (:mod:`labeler.formats.neuronpedia`) to Neuronpedia.

Steps, in order: create the model and the source set (unless told they exist), upload every
``upload/batch-N.json``, then create one list per category and add its features, at most
ADD_AT_ONCE per call. Each finished step is appended to ``FOLDER/pushed.jsonl`` (fsynced)
before the next starts, so a rerun after a failure or a kill sends only what is left and
never repeats a finished step. A step is finished only when Neuronpedia answers it with its
JSON reply: anything else (an error, a redirect, a sign-in page) stops the push and is not
logged. The key is read from the environment and sent only in the ``x-api-key`` header, and
only to ``--url``: a redirect is never followed, since following it would hand the key to
whatever host it names. The key is never written anywhere.
"""

from __future__ import annotations

import contextlib
import email.message
import json
import logging
import os
import re
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from labeler.errors import UserError
from labeler.formats.neuronpedia import UPLOAD_DIR

log = logging.getLogger(__name__)

KEY_ENV = "NEURONPEDIA_API_KEY"
DEFAULT_URL = "https://www.neuronpedia.org"
LOG = "pushed.jsonl"
ADD_AT_ONCE = 100  # features per /api/list/add-features call
TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Step:
    """One request: its name in the log, its route and its body."""

    name: str
    route: str
    body: Any


def _read(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: missing; write the folder with "
                        "`labeler export RUN --format neuronpedia`") from None  # fmt: skip
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: not JSON ({exc})") from None


def _done(folder: Path) -> dict[str, tuple[int, Any]]:
    """The finished steps in the log, by name: the line that says so and the answer kept.

    A damaged line (a line cut off by a kill, or anything but a JSON object with a step
    name) is skipped with a warning naming it, and the lines after it still count: losing
    them would send their steps twice."""
    path = folder / LOG
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return {}
    done: dict[str, tuple[int, Any]] = {}
    for number, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except ValueError:  # not JSON, or not UTF-8
            entry = None
        if isinstance(entry, dict) and isinstance(entry.get("step"), str):
            done[entry["step"]] = (number, entry.get("answer"))
        else:
            log.warning("%s:%d: not a record of a finished step (%s); skipped, so its step, if "
                        "any, is sent again", path, number, _shown(line))  # fmt: skip
    return done


def _shown(line: bytes) -> str:
    text = " ".join(line.decode("utf-8", "replace").split())
    return repr(text if len(text) <= 60 else text[:59] + "…")


def _end_last_line(folder: Path) -> None:
    """End the log's last line if a kill cut it off mid-line, so that the next record
    starts a line of its own instead of joining the damaged one."""
    path = folder / LOG
    with contextlib.suppress(FileNotFoundError), path.open("rb+") as fh:
        if fh.seek(0, os.SEEK_END) > 0:
            fh.seek(-1, os.SEEK_END)
            if fh.read(1) != b"\n":
                fh.write(b"\n")
                fh.flush()
                os.fsync(fh.fileno())


def _record(folder: Path, name: str, answer: Any) -> None:
    with (folder / LOG).open("a", encoding="utf-8") as fh:
        fh.write(json.dumps({"step": name, "answer": answer}, ensure_ascii=False) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """Follows no redirect: urllib would resend the headers, the key among them, to any
    host a redirect names. Declining leaves the 3xx answer to be raised as an HTTPError."""

    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: IO[bytes],
        code: int,
        msg: str,
        headers: email.message.Message,
        newurl: str,
    ) -> urllib.request.Request | None:
        return None


_OPENER = urllib.request.build_opener(_NoRedirects)
_TITLE = re.compile(rb"<title[^>]*>(.*?)</title", re.IGNORECASE | re.DOTALL)


def _post(url: str, key: str, route: str, body: Any) -> Any:
    """Neuronpedia's JSON answer (an object or an array) to POSTing ``body`` to ``route``;
    UserError on anything else, the key never in its message."""
    request = urllib.request.Request(
        url.rstrip("/") + route,
        data=json.dumps(body, ensure_ascii=False).encode("utf-8"),
        headers={"Content-Type": "application/json", "x-api-key": key},
        method="POST",
    )
    try:
        with _OPENER.open(request, timeout=TIMEOUT_S) as answer:
            status, kind, data = answer.status, answer.headers.get_content_type(), answer.read()
    except urllib.error.HTTPError as exc:
        if 300 <= exc.code < 400:
            where = " ".join((exc.headers.get("Location") or "nowhere").split()).replace(key, "…")
            raise UserError(
                f"POST {route}: HTTP {exc.code}: redirected to {where}, not followed (the key "
                "goes only to --url); pass the address that answers without a redirect as --url"
            ) from None
        raise UserError(f"POST {route}: HTTP {exc.code}: {_detail(exc)}") from None
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise UserError(f"POST {url.rstrip('/')}{route}: {reason}") from None
    return _json_reply(route, status, kind, data)


def _detail(exc: urllib.error.HTTPError) -> str:
    """What an error answer says: its JSON ``error`` or ``message``, else its text, short."""
    detail = exc.read().decode("utf-8", "replace")
    with contextlib.suppress(json.JSONDecodeError, AttributeError):
        parsed = json.loads(detail)
        detail = str(parsed.get("error") or parsed.get("message") or detail)
    return " ".join(detail.split())[:300] or exc.reason


def _json_reply(route: str, status: int, kind: str, data: bytes) -> Any:
    """The parsed answer when it is the JSON object or array Neuronpedia's API replies with;
    UserError otherwise: a page in its place (a sign-in or proxy page answering 200) means
    the request was not taken, and counting it as sent would skip it on every rerun."""
    try:
        parsed = json.loads(data)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict | list):
        return parsed
    title = _TITLE.search(data)
    if title is not None or "html" in kind:
        what = "an HTML page" + (f" titled {_shown(title.group(1))}" if title else "")
    else:
        what = f"{kind}, {_shown(data[:200])}" if data.strip() else "nothing"
    raise UserError(
        f"POST {route}: HTTP {status}: the answer is {what}, not Neuronpedia's JSON reply; "
        "check that --url is Neuronpedia's address and the key is valid"
    )


def push(
    folder: Path,
    url: str = DEFAULT_URL,
    create: bool = True,
    lists: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[int, int]:
    """Send what is left of ``folder``; returns (steps sent now, steps in all). ``progress``
    is told (steps finished, steps in all) after each step."""
    key = os.environ.get(KEY_ENV, "").strip()
    if not key:
        raise UserError(f"{KEY_ENV} is not set: put your Neuronpedia API key there "
                        "(neuronpedia.org, Settings)")  # fmt: skip
    steps: list[Step] = []
    if create:
        steps.append(Step("model", "/api/model/new", _read(folder / "model.json")))
        steps.append(Step("source-set", "/api/source-set/new", _read(folder / "source-set.json")))
    batches = sorted((folder / UPLOAD_DIR).glob("batch-*.json"), key=lambda p: int(p.stem[6:]))
    if not batches:
        raise UserError(f"{folder / UPLOAD_DIR}: no batch-N.json to send")
    steps += [Step(p.stem, "/api/feature/upload-batch", p) for p in batches]
    items = _read(folder / "lists.json") if lists else []
    total = len(steps) + sum(1 + -(-len(i["features"]) // ADD_AT_ONCE) for i in items)
    pusher = _Pusher(folder, url, key, _done(folder), total, progress)
    _end_last_line(folder)
    for step in steps:
        if step.name not in pusher.done:
            body = _read(step.body) if isinstance(step.body, Path) else step.body
            pusher.send(step.name, step.route, body)
        pusher.finish()
    for item in items:
        pusher.send_list(item)
    return pusher.sent, total


@dataclass
class _Pusher:
    """Sends steps and logs each finished one, counting them for ``push``'s answer and its
    progress."""

    folder: Path
    url: str
    key: str
    done: dict[str, tuple[int, Any]]
    total: int
    progress: Callable[[int, int], None] | None
    sent: int = 0
    finished: int = 0

    def send(self, name: str, route: str, body: Any) -> Any:
        """POST ``body``, log step ``name`` with the answer's brief, return the answer."""
        answer = _post(self.url, self.key, route, body)
        _record(self.folder, name, _brief(answer))
        self.sent += 1
        return answer

    def finish(self, steps: int = 1) -> None:
        self.finished += steps
        if self.progress is not None:
            self.progress(self.finished, self.total)

    def send_list(self, item: dict[str, Any]) -> None:
        """Make one list (unless the log has its id) and add its features, ADD_AT_ONCE a
        call; a list made now gets all of them, whatever the log says of an older one."""
        name = f"list:{item['name']}"
        list_id = _list_id(self.folder, name, self.done.get(name))
        fresh = list_id is None
        if list_id is None:
            about = {"name": item["name"], "description": item["description"]}
            made = _post(self.url, self.key, "/api/list/new", about)
            list_id = made.get("id") if isinstance(made, dict) else None
            if not isinstance(list_id, str) or not list_id:
                raise UserError(f"POST /api/list/new: the answer has no list id: {made!r:.200}")
            _record(self.folder, name, {"id": list_id})
            self.sent += 1
        members = item["features"]
        for start in range(0, len(members), ADD_AT_ONCE):
            part = f"{name}:{start // ADD_AT_ONCE}"
            if fresh or part not in self.done:
                chunk = [m | {"index": str(m["index"])}
                         for m in members[start : start + ADD_AT_ONCE]]  # fmt: skip
                body = {"listId": list_id, "featuresToAdd": chunk}
                _post(self.url, self.key, "/api/list/add-features", body)
                _record(self.folder, part, len(chunk))
                self.sent += 1
        self.finish(1 + -(-len(members) // ADD_AT_ONCE))


def _list_id(folder: Path, name: str, logged: tuple[int, Any] | None) -> str | None:
    """The id of the list the log says step ``name`` created; None when it has none (the
    list is made again), with a warning when the log's line is damaged."""
    if logged is None:
        return None
    number, answer = logged
    list_id = answer.get("id") if isinstance(answer, dict) else None
    if isinstance(list_id, str) and list_id:
        return list_id
    log.warning("%s:%d: %s without a list id; skipped, so the list is made again",
                folder / LOG, number, name)  # fmt: skip
    return None


def _brief(answer: Any) -> Any:
    """What the log keeps of an answer: its message, or the created object's id (of an
    array, its length)."""
    if isinstance(answer, dict):
        return {k: answer[k] for k in ("message", "id", "url") if k in answer}
    return {"items": len(answer)} if isinstance(answer, list) else None
