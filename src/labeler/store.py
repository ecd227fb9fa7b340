"""The label store: SQLite in the run folder, one judgment per (feature, judge).

Written by one thread (the executor's driver); safe to read while a labeling runs (WAL).
A failure is a row too, with its reason, so no feature ever leaves a denominator.
"""

from __future__ import annotations

import datetime as dt
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from adapters.errors import UserError
from labeler.schemas import Judgment

STORE_SCHEMA_VERSION = 1

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
    PRIMARY KEY (feature_id, judge)
);
"""


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
        self.conn = sqlite3.connect(path)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.executescript(_SCHEMA)
        row = self.conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        if row is None:
            with self.conn:
                self.conn.execute(
                    "INSERT INTO meta VALUES ('schema_version', ?)", (str(STORE_SCHEMA_VERSION),)
                )
        elif int(row[0]) != STORE_SCHEMA_VERSION:
            raise UserError(
                f"{path}: label store schema_version is {row[0]}, this labeler reads "
                f"{STORE_SCHEMA_VERSION}"
            )

    def close(self) -> None:
        self.conn.close()

    def add_planned(self, features: Iterable[tuple[str, int, int]]) -> None:
        with self.conn:
            self.conn.executemany("INSERT OR IGNORE INTO planned VALUES (?, ?, ?)", features)

    def planned(self) -> list[tuple[str, int, int]]:
        rows = self.conn.execute("SELECT feature_id, layer, idx FROM planned ORDER BY layer, idx")
        return [(str(a), int(b), int(c)) for a, b, c in rows]

    def done(self, judge: str) -> set[str]:
        """Features with a successful judgment by ``judge``."""
        rows = self.conn.execute(
            "SELECT feature_id FROM judgments WHERE judge=? AND status='ok'", (judge,)
        )
        return {r[0] for r in rows}

    def judges(self) -> list[str]:
        return [r[0] for r in self.conn.execute("SELECT DISTINCT judge FROM judgments ORDER BY 1")]

    def put_ok(self, judgment: Judgment) -> None:
        self._put(judgment.feature_id, judgment.judge, "ok", judgment.model_dump_json(), None,
                  judgment.prompt_hash)  # fmt: skip

    def put_failure(self, feature_id: str, judge: str, reason: str, prompt_hash: str) -> None:
        self._put(feature_id, judge, "failed", None, reason, prompt_hash)

    def _put(
        self,
        feature_id: str,
        judge: str,
        status: str,
        payload: str | None,
        reason: str | None,
        prompt_hash: str,
    ) -> None:
        now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        with self.conn:
            self.conn.execute(
                """INSERT INTO judgments VALUES (?, ?, ?, ?, ?, ?, 1, ?)
                   ON CONFLICT (feature_id, judge) DO UPDATE SET
                     status=excluded.status, payload=excluded.payload, reason=excluded.reason,
                     prompt_hash=excluded.prompt_hash, attempts=judgments.attempts + 1,
                     created_at=excluded.created_at""",
                (feature_id, judge, status, payload, reason, prompt_hash, now),
            )

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
