"""Errors a user can act on. The CLI prints their message and exits non-zero."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydantic import ValidationError


class UserError(Exception):
    """Bad input or state that the user can fix; the message names the file and field."""


class CheckpointError(UserError):
    """A transcoder-adapter checkpoint that is missing, corrupt or not in the paper's format."""


def first_error(exc: ValidationError) -> tuple[str, str]:
    """The dotted field path and message of a pydantic error's first problem."""
    first = exc.errors()[0]
    return ".".join(str(part) for part in first["loc"]), str(first["msg"])
