"""The label store read as polars tables: every judgment, every review, the plan.

Reading columns (the store copies each judgment's classification out of its JSON) and
decoding the rest of the JSON in polars, rather than one pydantic model per row, keeps a
run of hundreds of thousands of features and several judges to seconds.
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
    ("category", "category", pl.String),
    ("subcategory", "subcategory", pl.String),
    ("mechanism", "mechanism", pl.String),
    ("domain_type", "domain_type", pl.String),
    ("confidence", "confidence", pl.String),
    ("detection", "detection", pl.Float64),
)
_FULL = (
    *_BRIEF,
    ("prompt_hash", "prompt_hash", pl.String),
    ("attempts", "attempts", pl.Int32),
    ("created_at", "created_at", pl.String),
    ("payload", "payload", pl.String),
)
SCORE = pl.Struct(
    {
        "accuracy": pl.Float64,
        "precision": pl.Float64,
        "recall": pl.Float64,
        "n_positive": pl.Int64,
        "n_negative": pl.Int64,
        "auroc": pl.Float64,
    }
)
# What of a judgment's JSON the full frame keeps beyond the columns.
_PAYLOAD = pl.Struct(
    {
        "explanation": pl.String,
        "classification": pl.Struct({"rationale": pl.String}),
        "detection": SCORE,
        "detection_by_set": pl.Struct({"top": SCORE, "random": SCORE}),
    }
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
    store: LabelStore | sqlite3.Connection,
    full: bool = False,
    feature_id: str | None = None,
    layer: int | None = None,
) -> pl.DataFrame:
    """One row per stored (feature, judge): status and reason, cost, the classification
    and the detection accuracy; with ``full`` also the explanation, rationale, every
    detection score (``scores``: the pooled one and ``by_set``), prompt hash, attempts and
    time. Of one feature with ``feature_id``, of one layer's features with ``layer``."""
    conn = store.conn if isinstance(store, LabelStore) else store
    columns = _FULL if full else _BRIEF
    select = ", ".join(expr for _, expr, _ in columns)
    schema = pl.Schema({name: dtype for name, _, dtype in columns})
    query = f"SELECT {select} FROM judgments"
    args: tuple[str, ...] = ()
    if feature_id is not None:
        query, args = query + " WHERE feature_id=?", (feature_id,)
    elif layer is not None:  # a range of the primary key: L{layer}F...
        query, args = query + " WHERE feature_id >= ? AND feature_id < ?", layer_range(layer)
    frame = _read(conn, query, schema, args)
    if not full:
        return frame
    payload = pl.col("payload").str.json_decode(_PAYLOAD)
    return frame.with_columns(
        payload.struct.field("explanation"),
        payload.struct.field("classification").struct.field("rationale"),
        pl.struct(
            payload.struct.field("detection").struct.field("accuracy", "precision", "recall",
                                                           "auroc"),
            payload.struct.field("detection_by_set").alias("by_set"),
        ).alias("scores"),
    ).drop("payload")  # fmt: skip


def layer_range(layer: int) -> tuple[str, str]:
    """Bounds of the feature ids of one layer (``L{layer}F...``) in string order."""
    return f"L{layer}F", f"L{layer}G"


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
