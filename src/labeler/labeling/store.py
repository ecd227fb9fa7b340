"""The label store: SQLite in the run folder, one judgment per (feature, judge).

Written by the one labeler that holds the run's lock (``labeling.lock``), and by review
decisions; safe to read while a labeling runs (WAL). Every write transaction takes
SQLite's write lock before it reads (``BEGIN IMMEDIATE``), so a read-then-write (adding a
new attempt's cost to the earlier ones) is never interleaved with another writer's.
A failure is a row too, with its reason, so no feature ever leaves a denominator.
Stage results of staged judges are kept too, so a judgment interrupted between stages
(or failed in one) reuses the stages that succeeded. A successful judgment, once
stored, is never rewritten. Text is stored with keys redacted (``labeler.redaction``).
"""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from labeler.errors import UserError, note_store
from labeler.judges.requests import ApiRequest, KeptReply, pack, served_by, unpack
from labeler.judges.stages import SCORER_STAGES, StageOutcome, add_costs, add_usage
from labeler.redaction import redact, redact_optional
from labeler.run.schemas import Judgment, ReviewDecision, Usage

STORE_SCHEMA_VERSION = 11
BUSY_TIMEOUT_S = 60.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS planned (
    feature_id TEXT PRIMARY KEY, layer INTEGER NOT NULL, idx INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS judgments (
    feature_id TEXT NOT NULL,
    judge TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('ok', 'failed')),
    payload TEXT,
    reason TEXT,
    prompt_hash TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 1,
    created_at TEXT NOT NULL,
    usage TEXT,
    cost_usd REAL,
    category TEXT,
    subcategory TEXT,
    mechanism TEXT,
    domain_type TEXT,
    confidence TEXT,
    detection REAL,
    PRIMARY KEY (feature_id, judge)
);
CREATE TABLE IF NOT EXISTS stages (
    feature_id TEXT NOT NULL,
    judge TEXT NOT NULL,
    prompt_hash TEXT NOT NULL,
    stage TEXT NOT NULL,
    payload TEXT NOT NULL,
    task_id TEXT,
    created_at TEXT NOT NULL,
    charged INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (feature_id, judge, prompt_hash, stage)
);
CREATE INDEX IF NOT EXISTS judgments_created ON judgments (created_at);
CREATE TABLE IF NOT EXISTS reviews (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    feature_id TEXT NOT NULL,
    reviewer TEXT NOT NULL,
    action TEXT NOT NULL CHECK (action IN ('decide', 'skip')),
    category TEXT,
    subcategory TEXT,
    mechanism TEXT,
    domain_type TEXT,
    note TEXT NOT NULL DEFAULT '',
    decided_at TEXT NOT NULL,
    request_key TEXT
);
CREATE INDEX IF NOT EXISTS reviews_feature ON reviews (feature_id);
CREATE TABLE IF NOT EXISTS replies (
    key TEXT PRIMARY KEY,
    provider TEXT NOT NULL,
    model TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    reply BLOB NOT NULL,
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS batches (
    local_id TEXT PRIMARY KEY,
    judge TEXT NOT NULL,
    provider TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('submitting', 'submitted', 'ended')),
    batch_id TEXT,
    input_file_id TEXT,
    provider_status TEXT,
    n_requests INTEGER NOT NULL,
    counts TEXT,
    made_at REAL NOT NULL,
    submitted_at REAL,
    ended_at REAL
);
CREATE TABLE IF NOT EXISTS batch_requests (
    custom_id TEXT PRIMARY KEY,
    local_id TEXT NOT NULL,
    key TEXT NOT NULL,
    ask INTEGER NOT NULL,
    try INTEGER NOT NULL,
    outcome TEXT CHECK (outcome IN ('ok', 'error', 'expired', 'cancelled')),
    reply BLOB,
    error TEXT,
    done_at REAL,
    used INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS batch_requests_key ON batch_requests (key, ask);
CREATE TABLE IF NOT EXISTS output_scores (
    feature_id TEXT PRIMARY KEY,
    layer INTEGER NOT NULL,
    payload TEXT NOT NULL,
    significant INTEGER NOT NULL,
    made_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS unanswered_calls (
    judge TEXT NOT NULL,
    stage TEXT NOT NULL,
    usage TEXT NOT NULL,
    cost_usd REAL,
    noted_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS audits (
    audit_id INTEGER PRIMARY KEY AUTOINCREMENT,
    n_drawn INTEGER NOT NULL,
    seed INTEGER,
    weighting TEXT NOT NULL,
    n_frame INTEGER NOT NULL,
    frame_hash TEXT NOT NULL,
    source TEXT NOT NULL,
    made_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS audit_frame (
    audit_id INTEGER NOT NULL,
    feature_id TEXT NOT NULL,
    size REAL,
    position INTEGER,
    probability REAL,
    PRIMARY KEY (audit_id, feature_id)
);
CREATE INDEX IF NOT EXISTS audit_frame_drawn ON audit_frame (audit_id, position)
    WHERE position IS NOT NULL;
CREATE TABLE IF NOT EXISTS run_lock (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    token TEXT NOT NULL,
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    what TEXT NOT NULL,
    since REAL NOT NULL,
    beat REAL NOT NULL
);
"""
# The classification and detection accuracy of a judgment, copied out of its payload by
# triggers (whoever writes the row), so that summaries read columns instead of JSON.
_LABEL_COLUMNS = """
    category=json_extract(NEW.payload, '$.classification.category'),
    subcategory=json_extract(NEW.payload, '$.classification.subcategory'),
    mechanism=json_extract(NEW.payload, '$.classification.mechanism'),
    domain_type=json_extract(NEW.payload, '$.classification.domain_type'),
    confidence=json_extract(NEW.payload, '$.classification.confidence'),
    detection=json_extract(NEW.payload, '$.detection.accuracy')"""
_TRIGGERS = f"""
CREATE UNIQUE INDEX IF NOT EXISTS reviews_request_key ON reviews (feature_id, request_key)
    WHERE request_key IS NOT NULL;
CREATE TRIGGER IF NOT EXISTS judgments_label_on_insert AFTER INSERT ON judgments BEGIN
    UPDATE judgments SET {_LABEL_COLUMNS} WHERE rowid = NEW.rowid;
END;
CREATE TRIGGER IF NOT EXISTS judgments_label_on_update AFTER UPDATE OF payload ON judgments
BEGIN
    UPDATE judgments SET {_LABEL_COLUMNS} WHERE rowid = NEW.rowid;
END;
"""
# Each step takes the store from the version before it to the next one.
_MIGRATIONS = {
    2: (
        "ALTER TABLE judgments ADD COLUMN usage TEXT",
        "ALTER TABLE judgments ADD COLUMN cost_usd REAL",
    ),
    3: (),  # the stages table and the created_at index are created if missing
    4: (),  # the reviews table is created if missing
    5: (
        *(
            f"ALTER TABLE judgments ADD COLUMN {c} TEXT"
            for c in ("category", "subcategory", "mechanism", "domain_type", "confidence")
        ),
        "ALTER TABLE judgments ADD COLUMN detection REAL",
        "UPDATE judgments SET " + _LABEL_COLUMNS.replace("NEW.", ""),
    ),
    6: (),  # the run_lock table is created if missing
    7: (),  # the replies, batches and batch_requests tables are created if missing
    8: (),  # the output_scores table is created if missing
    9: (),  # the unanswered_calls table is created if missing
    10: (),  # reviews.request_key, added by _add_missing_columns where the table lacks it
    11: (),  # the audits and audit_frame tables are created if missing
}


_REVIEW_FIELDS = ("feature_id", "reviewer", "action", "category", "subcategory", "mechanism",
                  "domain_type", "note", "decided_at")  # fmt: skip
_REVIEW_COLUMNS = ", ".join(_REVIEW_FIELDS)


def _review(row: tuple[Any, ...]) -> ReviewDecision:
    return ReviewDecision.model_validate(dict(zip(_REVIEW_FIELDS, row, strict=True)))


# (table, column, type) added after the table was first made
_ADDED_COLUMNS = (("reviews", "request_key", "TEXT"),)


@dataclass(frozen=True)
class AuditRow:
    """One audit's design (``labeler.audit``): ``source`` is ``drawn`` or where its
    decisions were imported from; a drawn audit keeps every frame feature's size, an
    imported one the inclusion probability of each drawn feature."""

    audit_id: int
    n_drawn: int
    seed: int | None
    weighting: str
    n_frame: int
    frame_hash: str
    source: str
    made_at: str


@dataclass(frozen=True)
class StoredJudgment:
    feature_id: str
    judge: str
    status: str
    judgment: Judgment | None
    reason: str | None
    attempts: int


class LabelStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._in_transaction = False
        self.conn = connect(path)
        self.conn.executescript(_SCHEMA)
        row = self.conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        if row is None:
            with self.transaction():
                self.conn.execute(
                    "INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)",
                    (str(STORE_SCHEMA_VERSION),),
                )
        elif int(row[0]) > STORE_SCHEMA_VERSION:
            raise UserError(
                f"{path}: label store schema_version is {row[0]}, this labeler reads up to "
                f"{STORE_SCHEMA_VERSION}; upgrade the labeler"
            )
        elif int(row[0]) < STORE_SCHEMA_VERSION:
            self._migrate(int(row[0]))
        self._add_missing_columns()
        self.conn.executescript(_TRIGGERS)

    def _add_missing_columns(self) -> None:
        """Columns added to a table that an older store may have made without them (a
        table older stores lack altogether is made whole by the schema)."""
        for table, column, kind in _ADDED_COLUMNS:
            have = {str(r[1]) for r in self.conn.execute(f"PRAGMA table_info({table})")}
            if column not in have:
                with self.transaction():
                    self.conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")

    def _migrate(self, version: int) -> None:
        with self.transaction():
            for step in range(version + 1, STORE_SCHEMA_VERSION + 1):
                for statement in _MIGRATIONS[step]:
                    self.conn.execute(statement)
            self.conn.execute(
                "UPDATE meta SET value=? WHERE key='schema_version'", (str(STORE_SCHEMA_VERSION),)
            )

    def close(self) -> None:
        self.conn.close()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Every write inside commits together or not at all (writes nest)."""
        if self._in_transaction:
            yield
            return
        self._in_transaction = True
        try:
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise
            self.conn.execute("COMMIT")
        finally:
            self._in_transaction = False

    def get_meta(self, key: str) -> str | None:
        row = self.conn.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        with self.transaction():
            self.conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    def store_id(self) -> str:
        """This labeling's identity: it names the labeling's work in a fleet. Made anew
        when the store is found at another path than the one it was made at, so that a
        copy of a run never shares the original's work (work in flight when a run folder
        is moved is sent again under the new identity)."""
        where = str(self.path.resolve())
        found, made_at = self.get_meta("store_id"), self.get_meta("store_path")
        if found is None or made_at not in (None, where):
            found = uuid.uuid4().hex
            self.set_meta("store_id", found)
        if made_at != where:
            self.set_meta("store_path", where)
        return found

    def add_planned(self, features: Iterable[tuple[str, int, int]]) -> None:
        with self.transaction():
            self.conn.executemany("INSERT OR IGNORE INTO planned VALUES (?, ?, ?)", features)

    def planned(self) -> list[tuple[str, int, int]]:
        rows = self.conn.execute("SELECT feature_id, layer, idx FROM planned ORDER BY layer, idx")
        return [(str(a), int(b), int(c)) for a, b, c in rows]

    def is_planned(self, feature_id: str) -> bool:
        row = self.conn.execute("SELECT 1 FROM planned WHERE feature_id=?", (feature_id,))
        return row.fetchone() is not None

    def done(self, judge: str, scorers: tuple[str, ...] = ()) -> set[str]:
        """Features with a successful judgment by ``judge`` that carries the result of
        every scorer in ``scorers`` beyond detection (``fuzz``, ``intruder``)."""
        wanted = [s for s in scorers if s in SCORER_STAGES]
        carries = "".join(f" AND json_extract(payload, '$.{s}') IS NOT NULL" for s in wanted)
        rows = self.conn.execute(
            "SELECT feature_id FROM judgments WHERE judge=? AND status='ok'" + carries, (judge,)
        )
        return {r[0] for r in rows}

    def judges(self) -> list[str]:
        return [r[0] for r in self.conn.execute("SELECT DISTINCT judge FROM judgments ORDER BY 1")]

    def put_ok(
        self, judgment: Judgment, charge: tuple[dict[str, Usage], float | None] | None = None
    ) -> None:
        """Store a judgment; ``charge`` (usage, cost) is what to add to the row's spending
        when it differs from the judgment's own (stages charged by an earlier attempt).
        A successful judgment already stored stays as it is."""
        usage, cost = charge if charge is not None else (judgment.usage, judgment.cost_usd)
        with self.transaction():
            if self._add_scores(judgment):
                self.add_cost(judgment.feature_id, judgment.judge, usage, cost)
                return
        self._put(judgment.feature_id, judgment.judge, "ok", judgment.model_dump_json(), None,
                  judgment.prompt_hash, usage, cost)  # fmt: skip

    def _add_scores(self, judgment: Judgment) -> bool:
        """Where ``judgment``'s (feature, judge) is stored as ok already: add the scorer
        results it carries and the stored one lacks (a scorer asked for later), leaving
        the rest as it is; whether a successful judgment was stored."""
        row = self.conn.execute(
            "SELECT payload FROM judgments WHERE feature_id=? AND judge=? AND status='ok'",
            (judgment.feature_id, judgment.judge),
        ).fetchone()
        if row is None:
            return False
        stored = Judgment.model_validate_json(row[0])
        added = {
            s: getattr(judgment, s)
            for s in SCORER_STAGES
            if getattr(stored, s) is None and getattr(judgment, s) is not None
        }
        if added:
            added["schema_version"] = judgment.schema_version
            self.conn.execute(
                "UPDATE judgments SET payload=? WHERE feature_id=? AND judge=?",
                (redact(stored.model_copy(update=added).model_dump_json()),
                 judgment.feature_id, judgment.judge),
            )  # fmt: skip
        return True

    def put_failure(
        self,
        feature_id: str,
        judge: str,
        reason: str,
        prompt_hash: str,
        usage: dict[str, Usage] | None = None,
        cost_usd: float | None = None,
    ) -> None:
        """A failure with its reason and what it still cost; a later success replaces it
        (the attempts counter keeps counting). A stored success is never replaced: what
        the failed attempt cost is added to it."""
        self._put(feature_id, judge, "failed", None, reason, prompt_hash, usage or {}, cost_usd)

    def _put(
        self,
        feature_id: str,
        judge: str,
        status: str,
        payload: str | None,
        reason: str | None,
        prompt_hash: str,
        usage: dict[str, Usage],
        cost_usd: float | None,
    ) -> None:
        now = _now()
        payload, reason = redact_optional(payload), redact_optional(reason)
        with self.transaction():
            before = self.conn.execute(
                "SELECT usage, cost_usd, status FROM judgments WHERE feature_id=? AND judge=?",
                (feature_id, judge),
            ).fetchone()
            if before is not None and before[2] == "ok":
                self.add_cost(feature_id, judge, usage, cost_usd)
                return
            if before is not None:  # what earlier attempts spent stays counted
                usage = _add_usage(_read_usage(before[0]), usage)
                if before[1] is not None:
                    cost_usd = before[1] + (cost_usd or 0.0)
            self.conn.execute(
                """INSERT INTO judgments
                     (feature_id, judge, status, payload, reason, prompt_hash, attempts,
                      created_at, usage, cost_usd)
                   VALUES (?, ?, ?, ?, ?, ?, 1, ?, ?, ?)
                   ON CONFLICT (feature_id, judge) DO UPDATE SET
                     status=excluded.status, payload=excluded.payload, reason=excluded.reason,
                     prompt_hash=excluded.prompt_hash, attempts=judgments.attempts + 1,
                     created_at=excluded.created_at, usage=excluded.usage,
                     cost_usd=excluded.cost_usd""",
                (feature_id, judge, status, payload, reason, prompt_hash, now,
                 json.dumps({k: u.model_dump() for k, u in usage.items()}), cost_usd),
            )  # fmt: skip

    def ok_judgment(self, feature_id: str, judge: str) -> Judgment | None:
        """The successful judgment stored for (feature, judge), if any."""
        row = self.conn.execute(
            "SELECT payload FROM judgments WHERE feature_id=? AND judge=? AND status='ok'",
            (feature_id, judge),
        ).fetchone()
        return None if row is None else Judgment.model_validate_json(row[0])

    def status_of(self, feature_id: str, judge: str) -> str | None:
        row = self.conn.execute(
            "SELECT status FROM judgments WHERE feature_id=? AND judge=?", (feature_id, judge)
        ).fetchone()
        return None if row is None else str(row[0])

    def failed_attempts(self, feature_id: str, judge: str) -> int:
        """How many times this (feature, judge) has been stored as failed and not since
        succeeded: it makes a new attempt's task ids differ from the failed one's."""
        row = self.conn.execute(
            "SELECT status, attempts FROM judgments WHERE feature_id=? AND judge=?",
            (feature_id, judge),
        ).fetchone()
        return 0 if row is None or row[0] == "ok" else int(row[1])

    def put_stage(self, outcome: StageOutcome, task_id: str | None = None) -> bool:
        """Keep a successful stage's result (and the replies it accepted, in the reply
        cache); False if it was already kept."""
        with self.transaction():
            self.put_replies(outcome.kept)
            cursor = self.conn.execute(
                "INSERT OR IGNORE INTO stages VALUES (?, ?, ?, ?, ?, ?, ?, 0)",
                (outcome.feature_id, outcome.judge, outcome.prompt_hash, outcome.stage,
                 redact(outcome.model_dump_json(exclude={"kept"})), task_id, _now()),
            )  # fmt: skip
        return cursor.rowcount == 1

    def put_replies(self, kept: Iterable[KeptReply]) -> None:
        """Keep accepted replies by their request's key (a key kept already stays)."""
        rows = [(k.key, k.provider, k.model, k.endpoint, pack(k.reply), _now()) for k in kept]
        if rows:
            with self.transaction():
                # a kept row is replaced by the same reply: one that was damaged is repaired
                self.conn.executemany("INSERT OR REPLACE INTO replies VALUES (?, ?, ?, ?, ?, ?)",
                                      rows)  # fmt: skip

    def get(self, key: str) -> dict[str, Any] | None:
        """A kept reply by its request's key, or None (absent or damaged)."""
        row = self.conn.execute("SELECT reply FROM replies WHERE key=?", (key,)).fetchone()
        return None if row is None else unpack(row[0])

    def lookup(self, request: ApiRequest) -> dict[str, Any] | None:
        """The store as a reply cache: the reply kept for ``request``, or None when none
        is, its row names another provider, model or endpoint, it is damaged, or the
        reply names another model than the one asked for."""
        row = self.conn.execute(
            "SELECT provider, model, endpoint, reply FROM replies WHERE key=?", (request.key,)
        ).fetchone()
        if row is None or tuple(row[:3]) != (request.provider, request.model, request.endpoint):
            return None
        reply = unpack(row[3])
        return reply if reply is not None and served_by(request.model, reply) else None

    def stage_outcomes(self, feature_id: str, judge: str, prompt_hash: str) -> list[StageOutcome]:
        rows = self.conn.execute(
            "SELECT payload FROM stages WHERE feature_id=? AND judge=? AND prompt_hash=?",
            (feature_id, judge, prompt_hash),
        )
        return [StageOutcome.model_validate_json(r[0]) for r in rows]

    def charge_stages(
        self, feature_id: str, judge: str, prompt_hash: str
    ) -> tuple[dict[str, Usage], float | None]:
        """Usage and cost of the kept stages not yet charged to the judgment row, now
        marked charged (call inside the transaction that writes the row)."""
        rows = self.conn.execute(
            "SELECT payload FROM stages WHERE feature_id=? AND judge=? AND prompt_hash=? "
            "AND charged=0",
            (feature_id, judge, prompt_hash),
        ).fetchall()
        outcomes = [StageOutcome.model_validate_json(r[0]) for r in rows]
        self.conn.execute(
            "UPDATE stages SET charged=1 WHERE feature_id=? AND judge=? AND prompt_hash=?",
            (feature_id, judge, prompt_hash),
        )
        return add_usage(*(o.usage for o in outcomes)), add_costs([o.cost_usd for o in outcomes])

    def finished_since(self, since: str, judge: str) -> list[str]:
        """created_at of ``judge``'s judgments stored at or after ``since`` (ISO, UTC)."""
        rows = self.conn.execute(
            "SELECT created_at FROM judgments WHERE judge=? AND created_at >= ? "
            "ORDER BY created_at",
            (judge, since),
        )
        return [str(r[0]) for r in rows]

    def add_cost(self, feature_id: str, judge: str, usage: dict[str, Usage],
                 cost_usd: float | None) -> None:  # fmt: skip
        """Count what a late stage cost on a (feature, judge) already stored."""
        with self.transaction():
            row = self.conn.execute(
                "SELECT usage, cost_usd FROM judgments WHERE feature_id=? AND judge=?",
                (feature_id, judge),
            ).fetchone()
            if row is None:
                return
            total = _add_usage(_read_usage(row[0]), usage)
            cost = None if row[1] is None or cost_usd is None else row[1] + cost_usd
            self.conn.execute(
                "UPDATE judgments SET usage=?, cost_usd=? WHERE feature_id=? AND judge=?",
                (json.dumps({k: u.model_dump() for k, u in total.items()}), cost, feature_id,
                 judge),
            )  # fmt: skip

    def add_unanswered(self, judge: str, stage: str, usage: Usage, cost_usd: float | None) -> None:
        """Count a call sent by a labeler that was killed before its reply came (its
        usage and cost estimated)."""
        with self.transaction():
            self.conn.execute(
                "INSERT INTO unanswered_calls VALUES (?, ?, ?, ?, ?)",
                (judge, stage, usage.model_dump_json(), cost_usd, time.time()),
            )

    def unanswered(self, judge: str) -> list[tuple[str, Usage, float | None]]:
        """(stage, estimated usage, estimated cost) of each unanswered call of ``judge``."""
        rows = self.conn.execute(
            "SELECT stage, usage, cost_usd FROM unanswered_calls WHERE judge=?", (judge,)
        )
        return [(str(stage), Usage.model_validate_json(u), c) for stage, u, c in rows]

    def accounting(
        self, judge: str
    ) -> list[tuple[str, str | None, dict[str, Usage], float | None]]:
        """(status, reason, usage per stage, cost) of every stored row of ``judge``."""
        rows = self.conn.execute(
            "SELECT status, reason, usage, cost_usd FROM judgments WHERE judge=?", (judge,)
        )
        return [
            (str(status), reason, _read_usage(usage), cost) for status, reason, usage, cost in rows
        ]

    def judgments(self, judge: str) -> dict[str, StoredJudgment]:
        rows = self.conn.execute(
            "SELECT feature_id, judge, status, payload, reason, attempts FROM judgments "
            "WHERE judge=?",
            (judge,),
        )
        out = {}
        for fid, jname, status, payload, reason, attempts in rows:
            judgment = Judgment.model_validate_json(payload) if payload else None
            out[fid] = StoredJudgment(fid, jname, status, judgment, reason, attempts)
        return out

    def add_review(
        self, decision: ReviewDecision, request_key: str | None = None
    ) -> tuple[ReviewDecision, bool]:
        """Append a person's decision (stamped now unless it carries a time); earlier
        decisions, the reviewer's own included, stay as they were. ``request_key``: the
        sender's name for this request; a request sent again with it (a retry after an
        answer that never came, even from a server restarted since) stores nothing and
        gets the decision stored the first time. Returns the decision and whether it was
        stored now."""
        if not decision.decided_at:
            decision = decision.model_copy(update={"decided_at": _now()})
        with self.transaction():
            if request_key is not None:
                row = self.conn.execute(
                    f"SELECT {_REVIEW_COLUMNS} FROM reviews WHERE feature_id=? AND request_key=?",
                    (decision.feature_id, request_key),
                ).fetchone()
                if row is not None:
                    return _review(row), False
            self.conn.execute(
                f"INSERT INTO reviews ({_REVIEW_COLUMNS}, request_key) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (decision.feature_id, decision.reviewer, decision.action, decision.category,
                 decision.subcategory, decision.mechanism, decision.domain_type, decision.note,
                 decision.decided_at, request_key),
            )  # fmt: skip
        return decision, True

    def put_output_scores(self, rows: list[tuple[str, int, str, bool]]) -> None:
        """Steering scores (``labeler.causal.output_score``): (feature_id, layer, JSON
        payload, significant), replacing a feature's earlier score."""
        now = time.time()
        with self.transaction():
            self.conn.executemany(
                "INSERT OR REPLACE INTO output_scores VALUES (?, ?, ?, ?, ?)",
                [(fid, layer, payload, int(sig), now) for fid, layer, payload, sig in rows],
            )

    def output_scores(self) -> dict[str, str]:
        """Each scored feature's JSON payload."""
        rows = self.conn.execute("SELECT feature_id, payload FROM output_scores").fetchall()
        return {str(fid): str(payload) for fid, payload in rows}

    def output_score(self, feature_id: str) -> str | None:
        row = self.conn.execute(
            "SELECT payload FROM output_scores WHERE feature_id=?", (feature_id,)
        ).fetchone()
        return None if row is None else str(row[0])

    @property
    def audits(self) -> AuditTables:
        """The audits drawn for (or imported into) this run."""
        return AuditTables(self)

    def reviews(self, feature_id: str | None = None) -> list[ReviewDecision]:
        """Decisions in the order they were made, of one feature or of all."""
        query = f"SELECT {_REVIEW_COLUMNS} FROM reviews"
        args: tuple[str, ...] = ()
        if feature_id is not None:
            query, args = query + " WHERE feature_id=?", (feature_id,)
        return [_review(row) for row in self.conn.execute(query + " ORDER BY id", args)]


class AuditTables:
    """The audits of a label store (``labeler.audit``): appended, never changed."""

    def __init__(self, store: LabelStore) -> None:
        self.store = store

    def add(
        self,
        audit: AuditRow,
        rows: Iterable[tuple[str, float | None, int | None, float | None]],
    ) -> int:
        """Store an audit and its frame: (feature_id, size, position, probability) rows.
        Returns the new audit's id (``audit.audit_id`` is ignored)."""
        conn = self.store.conn
        with self.store.transaction():
            cursor = conn.execute(
                "INSERT INTO audits (n_drawn, seed, weighting, n_frame, frame_hash, source, "
                "made_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (audit.n_drawn, audit.seed, audit.weighting, audit.n_frame, audit.frame_hash,
                 audit.source, audit.made_at or _now()),
            )  # fmt: skip
            audit_id = int(cursor.lastrowid or 0)
            conn.executemany(
                "INSERT INTO audit_frame VALUES (?, ?, ?, ?, ?)",
                ((audit_id, fid, size, pos, prob) for fid, size, pos, prob in rows),
            )
        return audit_id

    def all(self) -> list[AuditRow]:
        rows = self.store.conn.execute(
            "SELECT audit_id, n_drawn, seed, weighting, n_frame, frame_hash, source, made_at "
            "FROM audits ORDER BY audit_id"
        )
        return [AuditRow(*row) for row in rows]

    def frame(self, audit_id: int) -> list[tuple[str, float | None, int | None, float | None]]:
        """(feature_id, size, position, probability) of every frame row of an audit."""
        return [
            (str(f), s, p, q)
            for f, s, p, q in self.store.conn.execute(
                "SELECT feature_id, size, position, probability FROM audit_frame WHERE audit_id=?",
                (audit_id,),
            )
        ]

    def drawn(self, audit_id: int | None = None) -> list[tuple[int, str, int]]:
        """(audit_id, feature_id, position) of the drawn features, in draw order."""
        query = "SELECT audit_id, feature_id, position FROM audit_frame WHERE position IS NOT NULL"
        args: tuple[int, ...] = ()
        if audit_id is not None:
            query, args = query + " AND audit_id=?", (audit_id,)
        rows = self.store.conn.execute(query + " ORDER BY audit_id, position", args)
        return [(int(a), str(f), int(p)) for a, f, p in rows]


def connect(path: Path, timeout: float = BUSY_TIMEOUT_S) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are begun explicitly) that waits up
    to ``timeout`` seconds for another writer's transaction instead of failing at once."""
    note_store(path)
    conn = sqlite3.connect(path, timeout=timeout, isolation_level=None,
                           check_same_thread=False)  # fmt: skip
    conn.execute("PRAGMA journal_mode=WAL")
    return conn


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")


def _read_usage(text: str | None) -> dict[str, Usage]:
    return {k: Usage(**v) for k, v in json.loads(text).items()} if text else {}


def _add_usage(a: dict[str, Usage], b: dict[str, Usage]) -> dict[str, Usage]:
    return {k: a.get(k, Usage()) + b.get(k, Usage()) for k in {**a, **b}}
