"""Ctrl-C and SIGTERM during a labeling.

The first signal asks the labeling to stop: no new stage starts, stages in flight finish
and are stored, and the command exits with ``EXIT_INTERRUPTED`` saying what it kept. A
second signal exits at once (every stored result is already committed).
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from types import FrameType, TracebackType

EXIT_INTERRUPTED = 130
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(Exception):
    """A signal came while the labeling waited to start (for the run's lock)."""


class Interrupts:
    """``with Interrupts() as stop:`` for the block, the first SIGINT or SIGTERM sets
    ``stop.requested``; a second one exits the process at once. ``on_signal(name,
    exiting)`` is told of each (the CLI says what happens). Outside the main thread it
    installs nothing."""

    def __init__(self, on_signal: Callable[[str, bool], None] | None = None) -> None:
        self.requested = threading.Event()
        self.on_signal = on_signal
        self._previous: dict[int, object] = {}

    def __enter__(self) -> Interrupts:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:  # fmt: skip
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        exiting = self.requested.is_set()
        self.requested.set()
        if self.on_signal is not None:
            self.on_signal(signal.Signals(signum).name, exiting)
        if exiting:
            os._exit(EXIT_INTERRUPTED)
