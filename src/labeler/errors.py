"""Errors of the labeling side; all are ``UserError`` so the CLI reports them plainly."""

from adapters.errors import UserError


class UnknownJudgeError(UserError):
    """A judge name that no registered backend understands."""


class JudgeFailure(Exception):
    """A judgment that could not be made; ``reason`` is stored with the failure."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
