"""An intervention study's folder: its plan and what it has measured, kept as it finishes.

``plan.json`` holds everything the results depend on (the conditions with their feature
lists, the prompts' hash, the sampling settings, the word set); a study started again
with the same plan resumes, one with another plan is refused. Results are appended to a
JSONL log, one line per response (or per teacher-forced trace), flushed and synced after
each batch, so a killed study loses at most the batch in progress; a line cut off by the
kill is dropped when the log is opened again.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from adapters.errors import UserError

PLAN = "plan.json"
GENERATIONS = "generations.jsonl"
TEACHER_FORCED = "teacher_forced.jsonl"
LOGS = (GENERATIONS, TEACHER_FORCED)


def open_plan(folder: Path, plan: dict[str, Any], overwrite: bool) -> bool:
    """Write the plan, or check it against the one there; True when resuming."""
    path = folder / PLAN
    if path.exists() and not overwrite:
        try:
            previous = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise UserError(
                f"{path}: not JSON ({exc.msg}); pass --overwrite to start again"
            ) from exc
        if previous != plan:
            changed = sorted(k for k in set(previous) | set(plan) if previous.get(k) != plan.get(k))
            raise UserError(
                f"{folder}: a study with other settings ({', '.join(changed)}) is there; "
                "pass --overwrite to replace it, or choose another --out"
            )
        return True
    folder.mkdir(parents=True, exist_ok=True)
    for name in LOGS:  # an overwritten study's results go with it; nothing else does
        (folder / name).unlink(missing_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(plan, indent=1) + "\n", encoding="utf-8")
    temporary.replace(path)
    return False


class ResultLog:
    """Appended JSON lines keyed by some of their fields."""

    def __init__(self, path: Path, key: Sequence[str]) -> None:
        self.path = path
        self.key = tuple(key)
        self.rows: dict[tuple[Any, ...], dict[str, Any]] = {}
        if path.exists():
            self._load()

    def _load(self) -> None:
        good = 0
        with self.path.open("rb") as fh:
            for raw in fh:
                if not raw.endswith(b"\n"):
                    break  # cut off by a kill
                try:
                    row = json.loads(raw)
                except json.JSONDecodeError:
                    break
                self.rows[self._key(row)] = row
                good += len(raw)
        if good != self.path.stat().st_size:
            with self.path.open("r+b") as fh:
                fh.truncate(good)

    def _key(self, row: dict[str, Any]) -> tuple[Any, ...]:
        return tuple(row[k] for k in self.key)

    def __contains__(self, key: tuple[Any, ...]) -> bool:
        return key in self.rows

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.rows.values())

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, rows: Iterable[dict[str, Any]]) -> None:
        lines = []
        for row in rows:
            self.rows[self._key(row)] = row
            lines.append(json.dumps(row, ensure_ascii=False) + "\n")
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write("".join(lines))
            fh.flush()
            os.fsync(fh.fileno())
