"""Send an exported Neuronpedia folder (:mod:`labeler.formats.neuronpedia`) to Neuronpedia.

Steps, in order: create the model and the source set (unless told they exist), upload every
``upload/batch-N.json``, then create one list per category and add its features, at most
ADD_AT_ONCE per call. Each finished step is appended to ``FOLDER/pushed.jsonl`` (fsynced)
before the next starts, so a rerun after a failure or a kill sends only what is left and
never repeats a finished step. The key is read from the environment and sent only in the
``x-api-key`` header; it is never written anywhere.
"""

from __future__ import annotations

import contextlib
import json
import os
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapters.errors import UserError
from labeler.formats.neuronpedia import UPLOAD_DIR

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


def _done(folder: Path) -> dict[str, Any]:
    """The finished steps in the log, by name (a line cut off by a kill is ignored)."""
    done: dict[str, Any] = {}
    path = folder / LOG
    if not path.exists():
        return done
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        done[entry["step"]] = entry.get("answer")
    return done


def _record(folder: Path, name: str, answer: Any) -> None:
    with (folder / LOG).open("a", encoding="utf-8") as fh:
        fh.write(json.dumps({"step": name, "answer": answer}, ensure_ascii=False) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def _post(url: str, key: str, route: str, body: Any) -> Any:
    request = urllib.request.Request(
        url.rstrip("/") + route,
        data=json.dumps(body, ensure_ascii=False).encode("utf-8"),
        headers={"Content-Type": "application/json", "x-api-key": key},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as answer:
            text = answer.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode("utf-8", "replace")
        with contextlib.suppress(json.JSONDecodeError, AttributeError):
            parsed = json.loads(detail)
            detail = str(parsed.get("error") or parsed.get("message") or detail)
        detail = " ".join(detail.split())[:300] or exc.reason
        raise UserError(f"POST {route}: HTTP {exc.code}: {detail}") from None
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise UserError(f"POST {url.rstrip('/')}{route}: {reason}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


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
    done = _done(folder)
    items = _read(folder / "lists.json") if lists else []
    total = len(steps) + sum(1 + -(-len(i["features"]) // ADD_AT_ONCE) for i in items)
    sent = finished = 0
    for step in steps:
        if step.name not in done:
            body = _read(step.body) if isinstance(step.body, Path) else step.body
            _record(folder, step.name, _brief(_post(url, key, step.route, body)))
            sent += 1
        finished += 1
        if progress is not None:
            progress(finished, total)
    if lists:
        for item in items:
            name = f"list:{item['name']}"
            if name not in done:
                about = {"name": item["name"], "description": item["description"]}
                made = _post(url, key, "/api/list/new", about)
                list_id = made.get("id") if isinstance(made, dict) else None
                if not list_id:
                    raise UserError(f"POST /api/list/new: the answer has no list id: {made!r:.200}")
                _record(folder, name, {"id": list_id})
                done[name] = {"id": list_id}
                sent += 1
            finished += 1
            list_id = done[name]["id"]
            members = item["features"]
            for start in range(0, len(members), ADD_AT_ONCE):
                part = f"{name}:{start // ADD_AT_ONCE}"
                if part not in done:
                    chunk = [m | {"index": str(m["index"])}
                             for m in members[start : start + ADD_AT_ONCE]]  # fmt: skip
                    _post(url, key, "/api/list/add-features",
                          {"listId": list_id, "featuresToAdd": chunk})  # fmt: skip
                    _record(folder, part, len(chunk))
                    sent += 1
                finished += 1
            if progress is not None:
                progress(finished, total)
    return sent, total


def _brief(answer: Any) -> Any:
    """What the log keeps of an answer: its message, or the created object's id."""
    if isinstance(answer, dict):
        return {k: answer[k] for k in ("message", "id", "url") if k in answer}
    return str(answer)[:200]
