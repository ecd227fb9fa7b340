"""An intervention study's folder: its plan and what it has measured, kept as it finishes.

``plan.json`` holds everything the results depend on (the conditions with their feature
lists, the prompts' hash, the sampling settings, the word set, the device and dtype the
model runs in); a study started again with the same plan resumes, and so does one whose
plan only adds conditions (more controls: they are drawn in a seeded order, so the
controls measured are the first of the new plan's); one with another plan is refused,
naming the options that differ. Results are appended to a JSONL log, one line
per response (or per teacher-forced trace), flushed and synced after each batch, so a
killed study loses at most the batch in progress.

The log is append-only: opening it never removes a byte. A damaged line (cut off by a
kill, not JSON, or without the fields a result has) is skipped and listed in
:attr:`ResultLog.damaged`, so the caller can name it; the result it held is measured
again and appended, and every line after it is kept.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapters.outputs import write_text_atomic
from labeler.errors import UserError

PLAN = "plan.json"
GENERATIONS = "generations.jsonl"
TEACHER_FORCED = "teacher_forced.jsonl"
LOGS = (GENERATIONS, TEACHER_FORCED)

# Plan keys that come from one command-line option: a refusal names the option.
PLAN_OPTIONS = {"words": "--words", "seed": "--seed", "samples": "--samples",
                "limit": "--limit", "device": "--device", "dtype": "--dtype",
                "prompts": "--prompts", "corpus": "--corpus"}  # fmt: skip


def _differences(previous: dict[str, Any], plan: dict[str, Any]) -> list[str]:
    """The settings that differ, as options where one option sets them (with both
    values when they are short), else by the plan's key."""
    out = []
    for key in sorted(set(previous) | set(plan)):
        before, now = previous.get(key), plan.get(key)
        if before == now:
            continue
        name = PLAN_OPTIONS.get(key, key)
        short = all(isinstance(v, str | int | float | type(None)) for v in (before, now))
        out.append(f"{name} {before} there, {now} now" if short else name)
    return out


def _extends(previous: Any, plan: dict[str, Any]) -> bool:
    """Whether ``plan`` is ``previous`` with conditions added: every other setting and
    every condition measured the same (name, mode, control and features)."""
    if not isinstance(previous, dict) or not isinstance(previous.get("conditions"), list):
        return False
    rest = {k: v for k, v in previous.items() if k != "conditions"}
    if rest != {k: v for k, v in plan.items() if k != "conditions"}:
        return False
    now = {c["name"]: c for c in plan["conditions"]}
    return all(isinstance(c, dict) and now.get(c.get("name")) == c
               for c in previous["conditions"])  # fmt: skip


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
        if previous != plan and _extends(previous, plan):
            write_text_atomic(path, json.dumps(plan, indent=1) + "\n")
            return True
        if previous != plan:
            changed = _differences(previous if isinstance(previous, dict) else {}, plan)
            raise UserError(
                f"{folder}: a study with other settings ({'; '.join(changed)}) is there; "
                "pass --overwrite to replace it, or choose another --out"
            )
        return True
    folder.mkdir(parents=True, exist_ok=True)
    for name in LOGS:  # an overwritten study's results go with it; nothing else does
        (folder / name).unlink(missing_ok=True)
    write_text_atomic(path, json.dumps(plan, indent=1) + "\n")
    return False


@dataclass(frozen=True)
class Damaged:
    """A log line that holds no usable result."""

    line: int
    reason: str


Fields = Mapping[str, type | tuple[type, ...]]
"""A result's fields and the JSON types each must have."""


class ResultLog:
    """Appended JSON lines keyed by some of their fields. With ``fields``, a line
    without one of them, or with one of another type, is damaged."""

    def __init__(self, path: Path, key: Sequence[str], fields: Fields | None = None) -> None:
        self.path = path
        self.key = tuple(key)
        self.fields: Fields = fields if fields is not None else {k: object for k in self.key}
        self.rows: dict[tuple[Any, ...], dict[str, Any]] = {}
        self.damaged: list[Damaged] = []
        self._torn = False
        if path.exists():
            self._load()

    def _load(self) -> None:
        with self.path.open("rb") as fh:
            for number, raw in enumerate(fh, 1):
                if not raw.strip():
                    continue
                self._torn = not raw.endswith(b"\n")
                found = "cut off" if self._torn else self._parse(raw)
                if isinstance(found, str):
                    self.damaged.append(Damaged(number, found))
                else:
                    self.rows[self._key(found)] = found

    def _parse(self, raw: bytes) -> dict[str, Any] | str:
        """The line's result, or what is wrong with it."""
        try:
            row = json.loads(raw)
        except ValueError:  # not JSON, or not UTF-8
            return "not JSON"
        if not isinstance(row, dict):
            return "not a JSON object"
        for name, kind in self.fields.items():
            value = row.get(name)
            if name not in row or not isinstance(value, kind) or _is_bool_for_number(value, kind):
                return f"field '{name}' missing or of the wrong type"
        return row

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
        if self._torn:  # end the cut-off line, so the new results start lines of their own
            lines.insert(0, "\n")
            self._torn = False
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write("".join(lines))
            fh.flush()
            os.fsync(fh.fileno())


def _is_bool_for_number(value: object, kind: type | tuple[type, ...]) -> bool:
    """JSON true and false are Python ints too; a number field must not take them."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return isinstance(value, bool) and bool not in kinds and object not in kinds
