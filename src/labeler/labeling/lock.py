"""The run's lock: one labeler writes a run's labels at a time, whatever its transport.

The lock is a row of the label store (``run_lock``), taken and renewed in write
transactions, so two labelers on one machine, or on two machines sharing the run folder,
see the same lock. It names its holder (host, pid, since when). A thread of its own
renews it every ``BEAT_S`` seconds, however busy the labeling's loop is; a holder on
this machine whose process is gone has no lock, and any holder loses it once it has not
been renewed for ``TTL_S`` seconds.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from labeler.errors import UserError
from labeler.labeling.interrupts import Interrupted
from labeler.labeling.store import connect

log = logging.getLogger(__name__)

TTL_ENV = "LABELER_LOCK_TTL_S"
TTL_S = 30.0
BEATS_PER_TTL = 15
WAIT_POLL_S = 1.0


@dataclass(frozen=True)
class Holder:
    token: str
    host: str
    pid: int
    what: str
    since: float
    beat: float

    def describe(self) -> str:
        since = dt.datetime.fromtimestamp(self.since, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        return f"{self.what} (host {self.host}, pid {self.pid}, since {since})"

    def alive(self, now: float, ttl_s: float) -> bool:
        """Renewed within ``ttl_s``, and on this machine its process still exists."""
        if now - self.beat >= ttl_s:
            return False
        return self.host != socket.gethostname() or process_exists(self.pid)


class RunLocked(UserError):
    """Another labeler holds the run."""


class LockLost(UserError):
    """The lock was taken by another labeler while this one held it (its renewals had
    stopped for longer than the lock lives)."""


class RunLock:
    """``with RunLock(store_path, "labeler label (local)"):`` holds the run for the block;
    with ``wait`` it waits for the holder to finish instead of refusing."""

    def __init__(
        self, store_path: Path, what: str, wait: bool = False, ttl_s: float | None = None,
        beat_s: float | None = None, cancelled: Callable[[], bool] | None = None,
    ) -> None:  # fmt: skip
        """``cancelled``: asked while waiting; True gives up with ``Interrupted``.
        ``ttl_s``: how long the lock lives unrenewed (default ``$LABELER_LOCK_TTL_S`` or
        30 s); it is renewed ``BEATS_PER_TTL`` times in that time."""
        self.path = store_path
        self.what = what
        self.wait = wait
        self.cancelled = cancelled
        self.ttl_s = ttl_s if ttl_s is not None else lock_ttl()
        self.beat_s = beat_s if beat_s is not None else self.ttl_s / BEATS_PER_TTL
        self.token = uuid.uuid4().hex
        self.lost = threading.Event()
        self._confirmed = 0.0
        """``time.monotonic()`` just before the last write that took or renewed the lock."""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:  # fmt: skip
        self.release()

    def _connect(self) -> sqlite3.Connection:
        # a renewal must not wait on another writer for as long as the lock lives
        return connect(self.path, timeout=self.ttl_s / 3)

    def acquire(self) -> None:
        conn = self._connect()
        try:
            announced = False
            while True:
                holder = self._try_take(conn)
                if holder is None:
                    break
                if not self.wait:
                    raise RunLocked(
                        f"{self.path.parent}: {holder.describe()} is labeling this run; wait "
                        "for it (--wait) or stop it first"
                    )
                if not announced:
                    log.warning("waiting for %s to finish labeling %s", holder.describe(),
                                self.path.parent)  # fmt: skip
                    announced = True
                if self.cancelled is not None and self.cancelled():
                    raise Interrupted()
                time.sleep(WAIT_POLL_S)
        finally:
            conn.close()
        self._thread = threading.Thread(target=self._renew, name="run-lock", daemon=True)
        self._thread.start()

    def valid(self) -> bool:
        """Whether the lock is surely still ours: not lost, and renewed within its life
        less a beat (a process paused longer may have lost it without knowing yet)."""
        return not self.lost.is_set() and (
            time.monotonic() - self._confirmed < self.ttl_s - self.beat_s
        )

    def _try_take(self, conn: sqlite3.Connection) -> Holder | None:
        """Take the lock, or return its live holder."""
        started = time.monotonic()
        now = time.time()
        conn.execute("BEGIN IMMEDIATE")
        try:
            holder = read_holder(conn)
            if holder is not None and holder.token != self.token and holder.alive(now, self.ttl_s):
                conn.execute("ROLLBACK")
                return holder
            conn.execute(
                "INSERT OR REPLACE INTO run_lock VALUES (1, ?, ?, ?, ?, ?, ?)",
                (self.token, socket.gethostname(), os.getpid(), self.what, now, now),
            )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        self._confirmed = started
        return None

    def _renew(self) -> None:
        conn = self._connect()
        try:
            while not self._stop.wait(self.beat_s):
                started = time.monotonic()
                try:
                    cursor = conn.execute(
                        "UPDATE run_lock SET beat=? WHERE id=1 AND token=?",
                        (time.time(), self.token),
                    )
                except sqlite3.Error as exc:  # busy past the timeout: try at the next beat
                    log.warning("renewing the run lock of %s: %s", self.path.parent, exc)
                    continue
                if cursor.rowcount != 1:
                    holder = read_holder(conn)
                    who = holder.describe() if holder is not None else "nobody"
                    log.error("the run lock of %s was taken over by %s", self.path.parent, who)
                    self.lost.set()
                    return
                self._confirmed = started
        finally:
            conn.close()

    def check(self) -> None:
        """Raise ``LockLost`` if another labeler took the lock."""
        if self.lost.is_set():
            raise LockLost(
                f"{self.path.parent}: another labeler took this run's lock while this one "
                "held it; this one stops (what it stored stays)"
            )

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        try:
            conn = self._connect()
            try:
                conn.execute("DELETE FROM run_lock WHERE id=1 AND token=?", (self.token,))
            finally:
                conn.close()
        except sqlite3.Error as exc:  # it lapses by itself; never hide the error at hand
            log.warning("releasing the run lock of %s: %s", self.path.parent, exc)


def lock_ttl() -> float:
    """The lock's life: ``$LABELER_LOCK_TTL_S`` (a run folder on a network file system
    whose writes can stall may want longer), else 30 s."""
    given = os.environ.get(TTL_ENV)
    if not given:
        return TTL_S
    try:
        value = float(given)
    except ValueError:
        value = 0.0
    if not 1.0 <= value <= 3600.0:
        raise UserError(f"${TTL_ENV}={given!r}: expected seconds between 1 and 3600")
    return value


def read_holder(conn: sqlite3.Connection) -> Holder | None:
    row = conn.execute("SELECT token, host, pid, what, since, beat FROM run_lock").fetchone()
    if row is None:
        return None
    return Holder(str(row[0]), str(row[1]), int(row[2]), str(row[3]), float(row[4]),
                  float(row[5]))  # fmt: skip


def process_exists(pid: int) -> bool:
    """Whether a process of this machine has this id (one of another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
