"""The labeled feature catalog as JSONL (schema: docs/catalog-schema.md).

Built with polars a layer at a time: what decides each feature's final label (every
judge's category, the reviews) is read for all features, which is small; the rest of the
judgments and the examples are read, joined and written one layer at a time, the next
layer being prepared on a second thread while the current one is serialized, so memory
is bounded by a layer and both cores are kept busy.
"""

from __future__ import annotations

import datetime as dt
import os
import sqlite3
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import polars as pl

from collectors.run_format import EXAMPLES, FEATURES
from collectors.tables import sort_examples
from labeler.disputes import DisputeRules, find_disputes
from labeler.final_labels import final_labels
from labeler.label_table import judgment_frame, planned_frame, review_frame
from labeler.run_data import RunData
from labeler.schemas import CATALOG_SCHEMA_VERSION
from labeler.store import LabelStore
from labeler.summarize import no_labels

_EXAMPLE_FIELDS = ("kind", "rank", "quantile", "activation", "tokens", "acts", "highlight",
                   "domain", "region")  # fmt: skip
PREPARING = 2  # layers prepared ahead, on as many threads, while one is written
# gzip's fastest level by default: a catalog with examples shrinks about 2.9 times at
# level 1 and 4.4 times at 6, which takes twice as long.
GZIP_LEVEL = 1


def _judgment_lists(judgments: pl.DataFrame) -> pl.DataFrame:
    """Every judge's judgment of each feature, failures included, as one list column."""
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
        pl.when(pl.col("status") == "ok").then(pl.col("scores")).alias("detection"),
        "prompt_hash",
        "attempts",
        "created_at",
        "cost_usd",
    )
    return judgments.group_by("feature_id").agg(entry.sort_by("judge").alias("judgments"))


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
    """One row per planned feature with its final label, source, dispute flags, reviews
    and logit lens, in catalog order; judgments and examples are added a layer at a time."""
    planned = planned_frame(store)
    judgments = judgment_frame(store)
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
        .join(_review_lists(reviews), on="feature_id", how="left")
        .join(disputes, on="feature_id", how="left")
    )
    empty = {c: pl.col(c).fill_null(pl.lit([], dtype=table.schema[c]))
             for c in ("reviews", "dispute_reasons")}  # fmt: skip
    return table.with_columns(**empty).sort("layer", "index")


class _LayerReader:
    """Reads one layer's judgments and examples; runs on worker threads, each with its
    own connection to the store (sqlite connections stay on their thread)."""

    def __init__(self, run: RunData, store_path: Path, with_examples: bool) -> None:
        self.run, self.store_path, self.with_examples = run, store_path, with_examples
        self.local = threading.local()

    def _conn(self) -> sqlite3.Connection:
        if not hasattr(self.local, "conn"):
            self.local.conn = sqlite3.connect(self.store_path)
        conn: sqlite3.Connection = self.local.conn
        return conn

    def read(self, layer: int) -> tuple[pl.DataFrame, pl.DataFrame | None]:
        judged = _judgment_lists(judgment_frame(self._conn(), full=True, layer=layer))
        return judged, self._examples(layer) if self.with_examples else None

    def _examples(self, layer: int) -> pl.DataFrame:
        """The examples of one layer's features as a list column, by index: top examples
        first, then random ones, then quantile samples from the highest quantile down.
        Collected runs store them in that order already; others are sorted once. Grouping
        sorted rows takes slices instead of copies."""
        rows = (
            pl.scan_parquet(self.run.folder / EXAMPLES)
            .filter(pl.col("layer") == layer)
            .select("feature_id", "layer", "index", *_EXAMPLE_FIELDS)
            .collect()
        )
        return (
            sort_examples(rows)
            .lazy()
            .with_columns(pl.col("index").set_sorted())
            .group_by("index", maintain_order=True)
            .agg(pl.col("feature_id").first(), pl.struct(*_EXAMPLE_FIELDS).alias("examples"))
            .select("feature_id", "examples")
            .collect()
        )


def _lines(
    part: pl.DataFrame,
    judged: pl.DataFrame,
    examples: pl.DataFrame | None,
    provenance: dict[str, str],
) -> pl.DataFrame:
    """One layer's catalog lines, columns in the documented order."""
    part = part.join(judged, on="feature_id", how="left", maintain_order="left")
    part = part.with_columns(
        pl.col("judgments").fill_null(pl.lit([], dtype=part.schema["judgments"]))
    )
    out = part.select(
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
    if examples is None:
        return out
    if examples["feature_id"].equals(out["feature_id"]):  # every feature planned: no join
        return out.with_columns(examples["examples"])
    out = out.join(examples, on="feature_id", how="left", maintain_order="left")
    return out.with_columns(pl.col("examples").fill_null(pl.lit([], dtype=out.schema["examples"])))


def export_catalog(
    run: RunData,
    store: LabelStore,
    out: Path,
    with_examples: bool,
    rules: DisputeRules | None = None,
    progress: Callable[[int], None] | None = None,
    gzip_level: int = GZIP_LEVEL,
) -> int:
    """Write the catalog to ``out`` (.jsonl, or gzip with .gz at ``gzip_level``)
    atomically; returns the lines written. ``progress`` is told the features of each
    layer as it is written."""
    layers = [int(r[0]) for r in store.conn.execute("SELECT DISTINCT layer FROM planned")]
    reader = _LayerReader(run, store.path, with_examples)
    provenance = {
        "run": str(run.folder),
        "adapter_hash": run.info.adapter_hash,
        "corpus_hash": run.info.corpus_hash,
        "unit": run.info.unit,
        "exported_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    compression: Literal["gzip", "uncompressed"] = (
        "gzip" if out.name.endswith(".gz") else "uncompressed"
    )
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    try:
        with ThreadPoolExecutor(PREPARING, "catalog-layer") as pool:
            # Layers are read ahead while the labels are decided and while writing.
            ahead = sorted(layers)
            pending = deque(pool.submit(reader.read, layer) for layer in ahead[:PREPARING])
            table = _labels_table(run, store, rules or DisputeRules())
            parts = {int(k[0]): part for k, part in table.group_by("layer", maintain_order=True)}  # type: ignore[call-overload]
            with tmp.open("wb") as fh:
                for i, layer in enumerate(ahead):
                    judged, examples = pending.popleft().result()
                    if i + PREPARING < len(ahead):
                        pending.append(pool.submit(reader.read, ahead[i + PREPARING]))
                    lines = _lines(parts[layer], judged, examples, provenance)
                    lines.write_ndjson(fh, compression=compression, compression_level=gzip_level)
                    if progress is not None:
                        progress(lines.height)
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return table.height
