"""The label store read as polars tables: every judgment, every review, the plan.

Reading columns (the store copies each judgment's classification out of its JSON) and
decoding the rest of the JSON in polars, rather than one pydantic model per row, keeps a
run of hundreds of thousands of features and several judges to seconds.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

import polars as pl

from labeler.labeling.store import LabelStore

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
    ("detection", "CASE WHEN CAST(payload ->> '$.detection.n_positive' AS INTEGER) > 0 AND "
     "CAST(payload ->> '$.detection.n_negative' AS INTEGER) > 0 THEN detection END",
     pl.Float64),
)  # fmt: skip
"""``detection`` is null where it is undefined: without both activating and
non-activating examples an accuracy measures one class only (see ``undefined``)."""
_SCORE_FIELDS: tuple[tuple[str, pl.DataType], ...] = (
    ("accuracy", pl.Float64()),
    ("precision", pl.Float64()),
    ("recall", pl.Float64()),
    ("n_positive", pl.Int64()),
    ("n_negative", pl.Int64()),
    ("auroc", pl.Float64()),
    ("f1", pl.Float64()),
    ("balanced_accuracy", pl.Float64()),
    ("auprc", pl.Float64()),
)
_POOLED = (  # what the catalog keeps pooled
    "accuracy", "precision", "recall", "auroc", "f1", "balanced_accuracy", "auprc",
)  # fmt: skip
_FUZZ = ("accuracy", "balanced_accuracy", "f1", "auroc", "auprc", "n_positive", "n_negative")
"""What the catalog keeps of the fuzzing scorer's score (``labeler.judges.scorers``)."""
_INTRUDER = (
    ("accuracy", pl.Float64()), ("chance", pl.Float64()), ("p_value", pl.Float64()),
    ("n_trials", pl.Int64()), ("n_correct", pl.Int64()),
)  # fmt: skip
_SETS = ("top", "random")
_BALANCED = ("accuracy", "precision", "recall", "f1", "balanced_accuracy", "auprc")
"""Scores that need both classes: over activating examples alone accuracy is recall and
precision is 1 whatever the explanation says; over non-activating alone neither means
anything. Where a class is missing they are null (auroc is null there already)."""


def _json_field(path: str, name: str, dtype: pl.DataType) -> tuple[str, str, pl.DataType]:
    sql_type = "REAL" if dtype == pl.Float64 else "INTEGER" if dtype == pl.Int64 else "TEXT"
    return name, f"CAST(payload ->> '$.{path}' AS {sql_type})", dtype


# The full frame pulls what it keeps out of each judgment's JSON in SQLite, whose JSON
# functions parse a row's payload once, instead of decoding the JSON in polars.
_SCORES = (
    *(_json_field(f"detection.{n}", f"pooled_{n}", d) for n, d in _SCORE_FIELDS),
    *(_json_field(f"detection_by_set.{s}.{n}", f"{s}_{n}", d)
      for s in _SETS for n, d in _SCORE_FIELDS),
    *(_json_field(f"fuzz.{n}", f"fuzz_{n}", d) for n, d in _SCORE_FIELDS if n in _FUZZ),
    *(_json_field(f"intruder.{n}", f"intruder_{n}", d) for n, d in _INTRUDER),
    *(_json_field(f"intruder.interval[{i}]", f"intruder_{b}", pl.Float64())
      for i, b in enumerate(("low", "high"))),
)  # fmt: skip
_FULL: tuple[tuple[str, str, pl.DataType], ...] = (
    *((name, expr, dtype()) for name, expr, dtype in _BRIEF),
    ("prompt_hash", "prompt_hash", pl.String()),
    ("attempts", "attempts", pl.Int32()),
    ("created_at", "created_at", pl.String()),
    _json_field("explanation", "explanation", pl.String()),
    _json_field("classification.rationale", "rationale", pl.String()),
    _json_field("resamples.confidence", "resample_confidence", pl.Float64()),
    *_SCORES,
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
    """The features planned for labeling: feature_id, layer, index, by layer and index."""
    query = "SELECT feature_id, layer, idx FROM planned ORDER BY layer, idx"
    return _read(store.conn, query, PLANNED_SCHEMA)


def judgment_frame(
    store: LabelStore | sqlite3.Connection,
    full: bool = False,
    feature_id: str | None = None,
    layer: int | None = None,
) -> pl.DataFrame:
    """One row per stored (feature, judge): status and reason, cost, the classification
    and the detection accuracy; with ``full`` also the explanation, rationale, every
    detection score (``scores``: the pooled one and ``by_set``), the other scorers' scores
    (``fuzz``, ``intruder``: null where not scored), the resampled classifier's
    confidence (``resample_confidence``, ``label --resamples``), prompt hash, attempts and
    time. Of
    one feature with ``feature_id``, of one layer's features with ``layer``."""
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

    def scores(prefix: str, names: Sequence[str], defined_only: bool = False) -> pl.Expr:
        both = (pl.col(f"{prefix}_n_positive") > 0) & (pl.col(f"{prefix}_n_negative") > 0)
        return pl.struct(
            (pl.when(both).then(pl.col(f"{prefix}_{n}")) if defined_only and n in _BALANCED
             else pl.col(f"{prefix}_{n}")).alias(n)
            for n in names
        )  # fmt: skip

    # each set's scores as stored, with their counts (what the delphi export checks its
    # answers against); the pooled score, the one shown, null where undefined
    every_score = [n for n, _ in _SCORE_FIELDS]
    scored = pl.any_horizontal(pl.col(f"{s}_n_positive").is_not_null() for s in _SETS)
    by_set = pl.when(scored).then(pl.struct(scores(s, every_score).alias(s) for s in _SETS))
    return frame.with_columns(
        pl.struct(
            scores("pooled", _POOLED, defined_only=True).struct.unnest(),
            undefined_reason("pooled").alias("undefined"),
            by_set.alias("by_set"),
        ).alias("scores"),
        pl.when(pl.col("fuzz_n_positive").is_not_null())
        .then(scores("fuzz", _FUZZ, defined_only=True))
        .alias("fuzz"),
        pl.when(pl.col("intruder_n_trials").is_not_null())
        .then(
            pl.struct(
                "intruder_accuracy",
                "intruder_chance",
                pl.when(pl.col("intruder_low").is_not_null())
                .then(pl.concat_list("intruder_low", "intruder_high"))
                .alias("interval"),
                "intruder_p_value",
                "intruder_n_trials",
                "intruder_n_correct",
            ).struct.rename_fields(
                ["accuracy", "chance", "interval", "p_value", "n_trials", "n_correct"]
            )
        )
        .alias("intruder"),
    ).drop(name for name, _, _ in _SCORES)


def undefined_reason(prefix: str) -> pl.Expr:
    """Why a detection score's accuracy, precision and recall are null: no
    non-activating examples, or no activating ones; null where they are defined."""
    positives, negatives = pl.col(f"{prefix}_n_positive"), pl.col(f"{prefix}_n_negative")
    return (
        pl.when(negatives == 0)
        .then(pl.lit("no negatives: the explanation was tested on activating examples only"))
        .when(positives == 0)
        .then(pl.lit("no positives: the explanation was tested on non-activating examples only"))
    )


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
