"""Errors of the labeling side; all are ``UserError`` so the CLI reports them plainly."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from adapters.errors import AdapterError
from collectors.errors import CollectError
from labeler.run.schemas import Usage

if TYPE_CHECKING:
    from pydantic import ValidationError


class UserError(Exception):
    """Bad input or state that the user can fix; the message names the file and field."""


USER_ERRORS: tuple[type[Exception], ...] = (UserError, AdapterError, CollectError)
"""Every error the CLI, the review server and the fleet's workers report as the user's
to fix (one line, no traceback): the labeling side's and the model and collection
sides' own."""


def first_error(exc: ValidationError) -> tuple[str, str]:
    """The dotted field path and message of a pydantic error's first problem."""
    first = exc.errors()[0]
    return ".".join(str(part) for part in first["loc"]), str(first["msg"])


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
