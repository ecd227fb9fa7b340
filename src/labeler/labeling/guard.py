"""The in-process transports' :class:`~labeler.judges.halting.SendGuard`: a call is sent
only while the labeling has not been interrupted and the run's lock is surely still
this labeler's.

The lock is a lease renewed by a thread every few seconds; a process paused past the
lease's life (SIGSTOP, a laptop lid, a stalled network file system) may have lost it to
another labeler without knowing yet. Such a lease is a fencing check: a call waits until
the renewal thread has either renewed the lease (the call goes) or found it taken (the
call is halted), so a resumed holder never duplicates the new holder's work.
"""

from __future__ import annotations

import asyncio
import time

from labeler.judges.halting import Halted
from labeler.labeling.interrupts import Interrupts
from labeler.labeling.lock import RunLock

POLL_S = 0.05


class LabelingGuard:
    def __init__(self, lock: RunLock, interrupts: Interrupts | None = None) -> None:
        self.lock = lock
        self.interrupts = interrupts

    def _halt(self) -> None:
        if self.interrupts is not None and self.interrupts.requested.is_set():
            raise Halted("interrupted")
        if self.lock.lost.is_set():
            raise Halted("lock_lost")

    async def clear(self) -> None:
        self._halt()
        while not self.lock.valid():
            await asyncio.sleep(POLL_S)
            self._halt()

    async def pause(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        self._halt()
        while (left := end - time.monotonic()) > 0:
            await asyncio.sleep(min(POLL_S * 4, left))
            self._halt()
