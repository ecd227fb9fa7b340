"""The label store read as polars tables: every judgment, every review, the plan.

Reading through SQL (``json_extract``) rather than one pydantic model per row keeps a
run of hundreds of thousands of features and several judges to seconds and to a few
hundred megabytes.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

import polars as pl

from labeler.store import LabelStore

HEURISTIC = "heuristic"
_BATCH = 100_000

PLANNED_SCHEMA = pl.Schema({"feature_id": pl.String, "layer": pl.Int32, "index": pl.Int32})

# (column, SQL expression, dtype) of a judgment row; the payload fields are null on failures.
_BRIEF = (
    ("feature_id", "feature_id", pl.String),
    ("judge", "judge", pl.String),
    ("status", "status", pl.String),
    ("reason", "reason", pl.String),
    ("cost_usd", "cost_usd", pl.Float64),
    ("category", "json_extract(payload, '$.classification.category')", pl.String),
    ("subcategory", "json_extract(payload, '$.classification.subcategory')", pl.String),
    ("mechanism", "json_extract(payload, '$.classification.mechanism')", pl.String),
    ("domain_type", "json_extract(payload, '$.classification.domain_type')", pl.String),
    ("confidence", "json_extract(payload, '$.classification.confidence')", pl.String),
    ("detection", "json_extract(payload, '$.detection.accuracy')", pl.Float64),
)
_FULL = (
    *_BRIEF,
    ("prompt_hash", "prompt_hash", pl.String),
    ("attempts", "attempts", pl.Int32),
    ("created_at", "created_at", pl.String),
    ("explanation", "json_extract(payload, '$.explanation')", pl.String),
    ("rationale", "json_extract(payload, '$.classification.rationale')", pl.String),
    ("precision", "json_extract(payload, '$.detection.precision')", pl.Float64),
    ("recall", "json_extract(payload, '$.detection.recall')", pl.Float64),
    ("auroc", "json_extract(payload, '$.detection.auroc')", pl.Float64),
    ("detection_by_set", "json_extract(payload, '$.detection_by_set')", pl.String),
)
REVIEW_SCHEMA = pl.Schema(
    {
        "review_id": pl.Int64,
        "feature_id": pl.String,
        "reviewer": pl.String,
        "action": pl.String,
        "category": pl.String,
        "subcategory": pl.String,
        "mechanism": pl.String,
        "domain_type": pl.String,
        "note": pl.String,
        "decided_at": pl.String,
    }
)


def _read(
    conn: sqlite3.Connection, query: str, schema: pl.Schema, args: Sequence[object] = ()
) -> pl.DataFrame:
    cursor = conn.execute(query, tuple(args))
    parts = []
    while rows := cursor.fetchmany(_BATCH):
        parts.append(pl.DataFrame(rows, schema=schema, orient="row"))
    return pl.concat(parts) if parts else pl.DataFrame(schema=schema)


def planned_frame(store: LabelStore) -> pl.DataFrame:
    """The features planned for labeling: feature_id, layer, index."""
    return _read(store.conn, "SELECT feature_id, layer, idx FROM planned", PLANNED_SCHEMA)


def judgment_frame(
    store: LabelStore, full: bool = False, feature_id: str | None = None
) -> pl.DataFrame:
    """One row per stored (feature, judge): status and reason, cost, the classification
    and the detection accuracy; with ``full`` also the explanation, rationale, the other
    detection scores (``detection_by_set`` as JSON text), prompt hash and time. Of one
    feature with ``feature_id``."""
    columns = _FULL if full else _BRIEF
    select = ", ".join(expr for _, expr, _ in columns)
    schema = pl.Schema({name: dtype for name, _, dtype in columns})
    if feature_id is None:
        return _read(store.conn, f"SELECT {select} FROM judgments", schema)
    query = f"SELECT {select} FROM judgments WHERE feature_id=?"
    return _read(store.conn, query, schema, (feature_id,))


def review_frame(store: LabelStore) -> pl.DataFrame:
    """Every review decision and skip, in the order they were made."""
    return _read(
        store.conn,
        "SELECT id, feature_id, reviewer, action, category, subcategory, mechanism, "
        "domain_type, note, decided_at FROM reviews ORDER BY id",
        REVIEW_SCHEMA,
    )


def judge_names(judgments: pl.DataFrame) -> list[str]:
    """Judges in a stable order: model judges by name, the heuristic last."""
    names = sorted(set(judgments["judge"].to_list()))
    return [n for n in names if n != HEURISTIC] + [n for n in names if n == HEURISTIC]
