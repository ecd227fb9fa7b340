"""The label store: SQLite in the run folder, one judgment per (feature, judge).

Written by one thread (the executor's driver); safe to read while a labeling runs (WAL).
A failure is a row too, with its reason, so no feature ever leaves a denominator.
"""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from adapters.errors import UserError
from labeler.schemas import Judgment, Usage

STORE_SCHEMA_VERSION = 2

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
    PRIMARY KEY (feature_id, judge)
);
"""
# Each step takes the store from the version before it to the next one.
_MIGRATIONS = {
    2: (
        "ALTER TABLE judgments ADD COLUMN usage TEXT",
        "ALTER TABLE judgments ADD COLUMN cost_usd REAL",
    ),
}


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
        elif int(row[0]) > STORE_SCHEMA_VERSION:
            raise UserError(
                f"{path}: label store schema_version is {row[0]}, this labeler reads up to "
                f"{STORE_SCHEMA_VERSION}; upgrade the labeler"
            )
        elif int(row[0]) < STORE_SCHEMA_VERSION:
            self._migrate(int(row[0]))

    def _migrate(self, version: int) -> None:
        with self.conn:
            for step in range(version + 1, STORE_SCHEMA_VERSION + 1):
                for statement in _MIGRATIONS[step]:
                    self.conn.execute(statement)
            self.conn.execute(
                "UPDATE meta SET value=? WHERE key='schema_version'", (str(STORE_SCHEMA_VERSION),)
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
                  judgment.prompt_hash, judgment.usage, judgment.cost_usd)  # fmt: skip

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
        (the attempts counter keeps counting)."""
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
        now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        with self.conn:
            before = self.conn.execute(
                "SELECT usage, cost_usd FROM judgments WHERE feature_id=? AND judge=?",
                (feature_id, judge),
            ).fetchone()
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


def _read_usage(text: str | None) -> dict[str, Usage]:
    return {k: Usage(**v) for k, v in json.loads(text).items()} if text else {}


def _add_usage(a: dict[str, Usage], b: dict[str, Usage]) -> dict[str, Usage]:
    return {k: a.get(k, Usage()) + b.get(k, Usage()) for k in {**a, **b}}
