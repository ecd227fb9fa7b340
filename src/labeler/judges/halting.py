"""What a judge asks before each provider call, so that a stopped labeling sends nothing.

A transport gives its judges a :class:`SendGuard`: the in-process transport one that
knows the run's lock and the interrupt (``labeling.guard``), a fleet worker one that
knows the fleet's stop flag. Every call, first try or retry, clears the guard just
before it is sent, and every wait between tries is the guard's ``pause``, so Ctrl-C
cuts a Retry-After wait at once and a labeler that lost its run's lock while paused
sends nothing more when it resumes.
"""

from __future__ import annotations

from typing import Protocol


class Halted(Exception):
    """The labeling stopped: no call was sent. ``reason``: 'interrupted', 'lock_lost' or
    the fleet's stop reason. Not the feature's failure: the transport leaves the feature
    pending."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class SendGuard(Protocol):
    async def clear(self) -> None:
        """Return when a call may be sent now; raise :class:`Halted` when none may."""
        ...

    async def pause(self, seconds: float) -> None:
        """Wait ``seconds`` between tries; raise :class:`Halted` as soon as the
        labeling stops."""
        ...


class CallLog(Protocol):
    """Where a judge notes each paid call as it is sent and as it ends, so that calls a
    killed labeler had in flight (billed, their replies never read) are still counted."""

    def begin(self, judge: str, stage: str, input_tokens: int) -> str:
        """Note a call about to be sent (``input_tokens``: its estimate); a ticket."""
        ...

    def end(self, ticket: str) -> None:
        """The call's reply (or error) is in: it is counted where its stage is."""
        ...
