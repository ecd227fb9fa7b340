"""The calls a labeler has sent and not yet heard back from, in ``RUN/calls-in-flight.log``.

A provider bills a call when it answers it, whether or not the labeler lives to read the
reply. Each paid call is noted as a line when it is sent and another when its reply (or
error) is in; the lines are appended unbuffered, so they survive the process being
killed. The next labeling of the run, under the run's lock, counts every call sent and
never answered as unanswered: its cost is estimated (input tokens as the rate limiter
estimates them, output tokens as a typical reply of its stage) and stored with the
judge's spending, then the journal starts afresh.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

JOURNAL_NAME = "calls-in-flight.log"


@dataclass(frozen=True)
class Unanswered:
    judge: str
    stage: str
    input_tokens: int


class CallJournal:
    """A :class:`~labeler.judges.halting.CallLog` appending to the run's journal."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / JOURNAL_NAME
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._prefix = uuid.uuid4().hex[:12]
        self._numbers = itertools.count()

    def _write(self, entry: dict[str, object]) -> None:
        os.write(self._fd, (json.dumps(entry, separators=(",", ":")) + "\n").encode())

    def begin(self, judge: str, stage: str, input_tokens: int) -> str:
        ticket = f"{self._prefix}-{next(self._numbers)}"
        self._write({"t": ticket, "judge": judge, "stage": stage, "in": input_tokens})
        return ticket

    def end(self, ticket: str) -> None:
        self._write({"t": ticket})

    def close(self) -> None:
        os.close(self._fd)


def unanswered(folder: Path) -> list[Unanswered]:
    """Calls noted as sent and never as answered; a damaged line (a write cut by a full
    disk or a kill) is skipped and reported."""
    path = folder / JOURNAL_NAME
    try:
        text = path.read_bytes().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return []
    sent: dict[str, Unanswered] = {}
    ended: set[str] = set()
    for number, line in enumerate(text.splitlines(), start=1):
        try:
            entry = json.loads(line)
            ticket = str(entry["t"])
            if "judge" in entry:
                sent[ticket] = Unanswered(str(entry["judge"]), str(entry["stage"]),
                                          int(entry["in"]))  # fmt: skip
            else:
                ended.add(ticket)
        except (ValueError, KeyError, TypeError):
            if line.strip():
                log.warning("%s:%d: damaged line skipped", path, number)
    return [call for ticket, call in sent.items() if ticket not in ended]


def forget(folder: Path) -> None:
    """Start the journal afresh (once what it held is counted)."""
    (folder / JOURNAL_NAME).unlink(missing_ok=True)
