"""The labeled feature catalog as JSONL (schema: docs/catalog-schema.md).

Built with polars a layer at a time: the labels of every feature are joined in memory
(small), the examples are read and serialized one layer at a time (large), and each
layer is written as it is made, so memory is bounded by one layer's examples.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Callable
from pathlib import Path

import polars as pl

from collectors.run_format import EXAMPLES, FEATURES
from labeler.disputes import DisputeRules, find_disputes
from labeler.final_labels import final_labels
from labeler.label_table import judgment_frame, planned_frame, review_frame
from labeler.run_data import RunData
from labeler.schemas import CATALOG_SCHEMA_VERSION
from labeler.store import LabelStore
from labeler.summarize import no_labels

_SCORE = pl.Struct(
    {
        "accuracy": pl.Float64,
        "precision": pl.Float64,
        "recall": pl.Float64,
        "n_positive": pl.Int64,
        "n_negative": pl.Int64,
        "auroc": pl.Float64,
    }
)
_BY_SET = pl.Struct({"top": _SCORE, "random": _SCORE})
_EXAMPLE_FIELDS = (
    "kind",
    "rank",
    "quantile",
    "activation",
    "tokens",
    "acts",
    "highlight",
    "domain",
    "region",
)
_KIND_ORDER = {"top": 0, "random": 1, "quantile": 2}


def _judgment_lists(judgments: pl.DataFrame) -> pl.DataFrame:
    """Every judge's judgment of each feature, failures included, as one list column."""
    detection = pl.when(pl.col("status") == "ok").then(
        pl.struct(
            "accuracy",
            "precision",
            "recall",
            "auroc",
            pl.col("detection_by_set").str.json_decode(_BY_SET).alias("by_set"),
        )
    )
    entry = pl.struct(
        "judge",
        "status",
        pl.col("reason").alias("failure_reason"),
        "explanation",
        "category",
        "subcategory",
        "mechanism",
        "domain_type",
        "confidence",
        "rationale",
        detection.alias("detection"),
        "prompt_hash",
        "attempts",
        "created_at",
        "cost_usd",
    )
    return (
        judgments.rename({"detection": "accuracy"})
        .sort("feature_id", "judge")
        .group_by("feature_id", maintain_order=True)
        .agg(entry.alias("judgments"))
    )


def _review_lists(reviews: pl.DataFrame) -> pl.DataFrame:
    entry = pl.struct(
        "reviewer",
        "action",
        "category",
        "subcategory",
        "mechanism",
        "domain_type",
        "note",
        "decided_at",
    )
    return reviews.group_by("feature_id", maintain_order=True).agg(entry.alias("reviews"))


def _labels_table(run: RunData, store: LabelStore, rules: DisputeRules) -> pl.DataFrame:
    """One row per planned feature with everything but its examples, in catalog order."""
    planned = planned_frame(store)
    judgments = judgment_frame(store, full=True)
    if planned.is_empty() or judgments.is_empty():
        raise no_labels(store)
    reviews = review_frame(store)
    final = final_labels(planned, judgments, reviews)
    disputes = find_disputes(judgments, rules).select(
        "feature_id", pl.col("reasons").alias("dispute_reasons")
    )
    features = (
        pl.scan_parquet(run.folder / FEATURES)
        .select(
            "feature_id", "frequency", "count", "top_logits", "top_logit_values", "bottom_logits"
        )
        .join(planned.lazy().select("feature_id"), on="feature_id")
        .collect()
    )
    table = (
        final.join(features, on="feature_id", how="left")
        .join(_judgment_lists(judgments), on="feature_id", how="left")
        .join(_review_lists(reviews), on="feature_id", how="left")
        .join(disputes, on="feature_id", how="left")
    )
    empty = {
        c: pl.col(c).fill_null(pl.lit([], dtype=table.schema[c]))
        for c in ("judgments", "reviews", "dispute_reasons")
    }
    provenance = {
        "run": str(run.folder),
        "adapter_hash": run.info.adapter_hash,
        "corpus_hash": run.info.corpus_hash,
        "unit": run.info.unit,
        "exported_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    return (
        table.with_columns(**empty)
        .select(
            pl.lit(CATALOG_SCHEMA_VERSION).alias("schema_version"),
            "feature_id",
            "layer",
            "index",
            pl.col("frequency").alias("activation_freq"),
            pl.col("count").alias("activation_count"),
            pl.struct("category", "subcategory", "mechanism", "domain_type").alias("final_label"),
            pl.col("source").alias("label_source"),
            pl.col("source_detail").alias("label_source_detail"),
            "reviewers_disagree",
            (pl.col("dispute_reasons").list.len() > 0).alias("disputed"),
            "dispute_reasons",
            "judgments",
            "reviews",
            "top_logits",
            "top_logit_values",
            "bottom_logits",
            pl.struct([pl.lit(v).alias(k) for k, v in provenance.items()]).alias("provenance"),
        )
        .sort("layer", "index")
    )


def _layer_examples(run: RunData, layer: int, ids: pl.Series) -> pl.DataFrame:
    """The examples of one layer's features as a list column; the range on feature_id
    lets the parquet reader skip other layers' row groups."""
    prefix = f"L{layer}F"
    return (
        pl.scan_parquet(run.folder / EXAMPLES)
        .filter((pl.col("feature_id") >= prefix) & (pl.col("feature_id") < f"L{layer}G"))
        .filter(pl.col("feature_id").is_in(ids.implode()))
        .with_columns(pl.col("kind").replace_strict(_KIND_ORDER, default=3).alias("_order"))
        .sort(
            "feature_id",
            "_order",
            pl.col("quantile").fill_null(0),
            "rank",
            descending=[False, False, True, False],
        )
        .group_by("feature_id", maintain_order=True)
        .agg(pl.struct(*_EXAMPLE_FIELDS).alias("examples"))
        .collect()
    )


def export_catalog(
    run: RunData,
    store: LabelStore,
    out: Path,
    with_examples: bool,
    rules: DisputeRules | None = None,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Write the catalog to ``out`` (.jsonl, or gzip with .gz) atomically; returns the
    lines written. ``progress`` is told the features of each layer as it is written."""
    table = _labels_table(run, store, rules or DisputeRules())
    gz = out.name.endswith(".gz")
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    try:
        with tmp.open("wb") as fh:
            for (layer,), part in table.group_by("layer", maintain_order=True):
                if with_examples:
                    examples = _layer_examples(run, int(layer), part["feature_id"])  # type: ignore[call-overload]
                    part = part.join(examples, on="feature_id", how="left", maintain_order="left")
                    part = part.with_columns(
                        pl.col("examples").fill_null(pl.lit([], dtype=examples.schema["examples"]))
                    )
                part.write_ndjson(
                    fh,
                    compression="gzip" if gz else "uncompressed",
                    compression_level=6 if gz else None,
                )
                if progress is not None:
                    progress(part.height)
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return table.height
