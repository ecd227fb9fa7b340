"""What the batch transport keeps in the label store, so that a labeler stopped at any
moment resumes without submitting any request twice.

- ``batches``: one row per submission, written (``submitting``) before anything is sent
  to the provider, then given the provider's batch id (``submitted``), then ``ended``
  once its results are stored, with the provider's status and counts as last seen.
- ``batch_requests``: one row per request in a submission, by ``custom_id``, with the
  request's content key, which asking of it this is (``ask``: 0, or 1 for the re-ask of
  an invalid reply) and which try (``try``: a request that failed transiently, expired
  or was cancelled is submitted again under the next try's id), and, once its batch
  ended, its outcome: the reply, or the error.

:class:`StoredBatchReplies` is where the judges look for their replies: a request with
no row yet, or one in a batch in flight, raises ``AwaitingReply`` with the id it waits
on; a finished one gives its reply or raises the error the failure rules expect.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from labeler.judges.backend import TransientError
from labeler.judges.batch_api import LineResult, error_for
from labeler.judges.requests import ApiRequest, AwaitingReply, pack, unpack
from labeler.labeling.store import LabelStore
from labeler.redaction import redact, redact_json

MAX_UNRUN = 3
LINES_PER_TRANSACTION = 2_000
"""Submissions of one request that may expire or be cancelled before it fails."""


def custom_id(key: str, ask: int, attempt: int) -> str:
    """Valid for both providers (``^[a-zA-Z0-9_-]{1,64}$``); the same request asked the
    same time shares it, whichever feature asked it."""
    return f"r{key[:48]}-{ask}-{attempt}"


@dataclass(frozen=True)
class Waiting:
    """A request to submit: which asking and try of it."""

    request: ApiRequest
    custom_id: str
    ask: int
    attempt: int


class Awaiting(AwaitingReply):
    def __init__(self, request: ApiRequest, ask: int, attempt: int) -> None:
        super().__init__(request, custom_id(request.key, ask, attempt))
        self.waiting = Waiting(request, self.custom_id, ask, attempt)


@dataclass(frozen=True)
class Submission:
    local_id: str
    judge: str
    provider: str
    endpoint: str
    state: str
    batch_id: str | None
    provider_status: str | None
    n_requests: int
    counts: dict[str, int]
    made_at: float
    submitted_at: float | None


class BatchRecords:
    def __init__(self, store: LabelStore) -> None:
        self.store = store
        self.conn = store.conn

    # -- submissions ---------------------------------------------------------------------

    def begin(self, local_id: str, judge: str, provider: str, endpoint: str,
              requests: list[Waiting]) -> None:  # fmt: skip
        """Record a submission and its requests before anything is sent."""
        with self.store.transaction():
            self.conn.execute(
                "INSERT INTO batches (local_id, judge, provider, endpoint, state, n_requests, "
                "made_at) VALUES (?, ?, ?, ?, 'submitting', ?, ?)",
                (local_id, judge, provider, endpoint, len(requests), time.time()),
            )
            self.conn.executemany(
                "INSERT INTO batch_requests (custom_id, local_id, key, ask, try) "
                "VALUES (?, ?, ?, ?, ?)",
                [(w.custom_id, local_id, w.request.key, w.ask, w.attempt) for w in requests],
            )

    def file_uploaded(self, local_id: str, file_id: str) -> None:
        with self.store.transaction():
            self.conn.execute("UPDATE batches SET input_file_id=? WHERE local_id=?",
                              (file_id, local_id))  # fmt: skip

    def submitted(self, local_id: str, batch_id: str) -> None:
        with self.store.transaction():
            self.conn.execute(
                "UPDATE batches SET state='submitted', batch_id=?, submitted_at=? WHERE local_id=?",
                (batch_id, time.time(), local_id),
            )

    def never_made(self, local_id: str) -> list[str]:
        """Forget a submission the provider never received; its requests' ids."""
        with self.store.transaction():
            ids = self.custom_ids(local_id)
            self.conn.execute("DELETE FROM batch_requests WHERE local_id=?", (local_id,))
            self.conn.execute("DELETE FROM batches WHERE local_id=?", (local_id,))
        return ids

    def seen(self, local_id: str, status: str, counts: dict[str, int]) -> None:
        with self.store.transaction():
            self.conn.execute(
                "UPDATE batches SET provider_status=?, counts=? WHERE local_id=?",
                (status, json.dumps(counts), local_id),
            )

    def ended(self, local_id: str, status: str, results: list[LineResult]) -> list[str]:
        """Store a finished batch's results in one transaction; the ids it answered (a
        request with no result line counts as expired)."""
        now = time.time()
        whole = next((r for r in results if r.custom_id == "*"), None)
        lines = [r for r in results if r.custom_id != "*"]
        # a few thousand lines a transaction, so the run's lock is renewed meanwhile; a
        # labeler stopped in between stores the rest from the same results next time
        for start in range(0, len(lines), LINES_PER_TRANSACTION):
            with self.store.transaction():
                self.conn.executemany(
                    "UPDATE batch_requests SET outcome=?, reply=?, error=?, done_at=? "
                    "WHERE custom_id=? AND local_id=? AND outcome IS NULL",
                    [(r.outcome, _reply(r), _error(r), now, r.custom_id, local_id)
                     for r in lines[start : start + LINES_PER_TRANSACTION]],
                )  # fmt: skip
        with self.store.transaction():
            missing = whole or LineResult("", "expired", message="no result line for it")
            self.conn.execute(
                "UPDATE batch_requests SET outcome=?, error=?, done_at=? "
                "WHERE local_id=? AND outcome IS NULL",
                (missing.outcome, _error(missing), now, local_id),
            )
            self.conn.execute(
                "UPDATE batches SET state='ended', provider_status=?, ended_at=? WHERE local_id=?",
                (status, now, local_id),
            )
            return self.custom_ids(local_id)

    def custom_ids(self, local_id: str) -> list[str]:
        rows = self.conn.execute("SELECT custom_id FROM batch_requests WHERE local_id=?",
                                 (local_id,))  # fmt: skip
        return [str(r[0]) for r in rows]

    def has(self, custom_id: str) -> bool:
        row = self.conn.execute("SELECT 1 FROM batch_requests WHERE custom_id=?", (custom_id,))
        return row.fetchone() is not None

    def open(self) -> list[Submission]:
        """Submissions not ended, oldest first."""
        return self._submissions("WHERE state != 'ended'")

    def all(self) -> list[Submission]:
        return self._submissions("")

    def known_batch_ids(self) -> set[str]:
        rows = self.conn.execute("SELECT batch_id FROM batches WHERE batch_id IS NOT NULL")
        return {str(r[0]) for r in rows}

    def _submissions(self, where: str) -> list[Submission]:
        rows = self.conn.execute(
            "SELECT local_id, judge, provider, endpoint, state, batch_id, provider_status, "
            f"n_requests, counts, made_at, submitted_at FROM batches {where} ORDER BY made_at"
        )
        return [
            Submission(str(a), str(b), str(c), str(d), str(e), f, g, int(h),
                       json.loads(i) if i else {}, float(j), k)
            for a, b, c, d, e, f, g, h, i, j, k in rows
        ]  # fmt: skip


def _reply(result: LineResult) -> bytes | None:
    """A result's reply as stored: a model may repeat a key it was shown, and the row
    outlives the batch."""
    return None if result.reply is None else pack(redact_json(result.reply))


def _error(result: LineResult) -> str | None:
    if result.outcome == "ok":
        return None
    return json.dumps({"status": result.status, "message": redact(result.message)})


class StoredBatchReplies:
    """The judges' replies in the batch transport, read from ``batch_requests``."""

    def __init__(self, store: LabelStore, max_attempts: int) -> None:
        self.store = store
        self.conn = store.conn
        self.max_attempts = max_attempts
        self.consulted: set[str] = set()
        """Keys looked up since the transport last cleared it (one stage's)."""

    def reply(self, request: ApiRequest, ask: int) -> dict[str, Any]:
        self.consulted.add(request.key)
        rows = self.conn.execute(
            "SELECT try, outcome, reply, error, used FROM batch_requests WHERE key=? AND ask=? "
            "ORDER BY try",
            (request.key, ask),
        ).fetchall()
        next_try = rows[-1][0] + 1 if rows else 0
        rows = [r for r in rows if not r[4]]
        if not rows:
            raise Awaiting(request, ask, next_try)
        attempt, outcome, blob, error, _ = rows[-1]
        if outcome is None:
            raise Awaiting(request, ask, attempt)  # in a batch in flight
        if outcome == "ok":
            found = unpack(blob)
            if found is not None:
                return found
            raise Awaiting(request, ask, next_try)  # a damaged row: ask again
        detail = json.loads(error) if error else {}
        message = str(detail.get("message", ""))
        if outcome in ("expired", "cancelled"):
            unrun = sum(1 for r in rows if r[1] in ("expired", "cancelled"))
            if unrun < MAX_UNRUN:
                raise Awaiting(request, ask, next_try)
            raise TransientError(f"{outcome} in {unrun} batches: {message}", kind="expired")
        failure = error_for(detail.get("status"), message)
        if isinstance(failure, TransientError):
            failed = sum(1 for r in rows if r[1] == "error")
            if failed < self.max_attempts:
                raise Awaiting(request, ask, next_try)
            failure.reason = f"{failure.reason} (gave up after {failed} attempts)"
        raise failure

    def used_up(self, keys: set[str]) -> None:
        """The results of these requests ended in a stage's failure: a later labeling asks
        them afresh, as a synchronous one would call again."""
        with self.store.transaction():
            self.conn.executemany(
                "UPDATE batch_requests SET used=1 WHERE key=? AND outcome IS NOT NULL",
                [(k,) for k in keys],
            )
