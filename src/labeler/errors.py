"""Errors of the labeling side; all are ``UserError`` so the CLI reports them plainly."""

from __future__ import annotations

from pathlib import Path

from adapters.errors import UserError
from labeler.run.schemas import Usage

# The SQLite files this process opened: SQLite never names the file an error is about,
# so the CLI reports a corrupt or unwritable store against these.
OPENED_STORES: list[Path] = []


def note_store(path: Path) -> None:
    if path not in OPENED_STORES:
        OPENED_STORES.append(path)


class UnknownJudgeError(UserError):
    """A judge name that no registered backend understands."""


class JudgeFailure(Exception):
    """A judgment that could not be made. ``reason`` ("KIND: detail", e.g.
    "invalid_reply: classify: ...") is stored with the failure; ``usage`` is what the
    attempt still cost, per stage."""

    def __init__(self, reason: str, usage: dict[str, Usage] | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.usage = usage or {}

    @property
    def kind(self) -> str:
        return self.reason.split(":", 1)[0]


class Reschedule(Exception):
    """A provider's rate limit (429) that the executor should wait out by rescheduling the
    work ``retry_after`` seconds later (None: the server gave no time) instead of holding
    a worker slot; ``usage`` is what the stage's calls had used."""

    def __init__(
        self, retry_after: float | None, usage: dict[str, Usage] | None = None, reason: str = ""
    ) -> None:
        super().__init__(reason or "rate limited")
        self.retry_after = retry_after
        self.usage = usage or {}
