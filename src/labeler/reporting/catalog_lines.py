"""A labeled run's catalog lines, a layer at a time (schema: docs/catalog-schema.md).

A feature's final label and disputes depend on its own judgments and reviews only, so
each layer's lines (judgments, labels, disputes, reviews, logit lens, examples) are built
on their own: the catalog export writes them, the catalog browser indexes them.
"""

from __future__ import annotations

import io
import sqlite3
import threading

import polars as pl

from collectors.example_order import sort_examples
from collectors.run_format import EXAMPLES, FEATURES
from labeler.labeling.store import LabelStore
from labeler.reporting.disputes import DisputeRules, find_disputes
from labeler.reporting.final_labels import final_labels
from labeler.reporting.label_table import judgment_frame, planned_frame, review_frame
from labeler.run.data import RunData
from labeler.run.schemas import CATALOG_SCHEMA_VERSION

_EXAMPLE_FIELDS = ("kind", "rank", "quantile", "activation", "tokens", "acts", "highlight",
                   "domain", "region")  # fmt: skip


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
        pl.when(pl.col("status") == "ok").then(pl.col("fuzz")).alias("fuzz"),
        pl.when(pl.col("status") == "ok").then(pl.col("intruder")).alias("intruder"),
        # the share of the classifier's resampled answers agreeing with the label
        # (``label --resamples``); null when not asked
        pl.when(pl.col("status") == "ok")
        .then(pl.col("resample_confidence"))
        .alias("resample_confidence"),
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


class LayerReader:
    """Builds one layer's catalog lines: its judgments, final labels, disputes, reviews,
    logit lens and examples. Runs on worker threads, each with its own connection to the
    store (sqlite connections stay on their thread). Final labels and disputes depend on
    a feature's own judgments and reviews only, so a layer is decided on its own."""

    def __init__(
        self,
        run: RunData,
        store: LabelStore,
        rules: DisputeRules,
        with_examples: bool,
        provenance: dict[str, str],
        gzip_level: int | None,
    ) -> None:
        self.run, self.store_path, self.rules = run, store.path, rules
        self.with_examples, self.provenance, self.gzip_level = with_examples, provenance, gzip_level
        self.planned = planned_frame(store)
        self.reviews = review_frame(store)
        self.review_lists = _review_lists(self.reviews)
        self.local = threading.local()

    def connection(self) -> sqlite3.Connection:
        """This thread's connection to the label store."""
        if not hasattr(self.local, "conn"):
            self.local.conn = sqlite3.connect(self.store_path)
        conn: sqlite3.Connection = self.local.conn
        return conn

    def prepare(self, layer: int) -> tuple[int, pl.DataFrame | bytes]:
        """The layer's line count and its lines: as a frame for the writer to serialize,
        or, when gzipped, already compressed as one gzip member (gzip readers read
        concatenated members as one stream), which keeps compression off the writer."""
        lines = self.lines(layer)
        if self.gzip_level is None:
            return lines.height, lines
        buffer = io.BytesIO()
        lines.write_ndjson(buffer, compression="gzip", compression_level=self.gzip_level)
        return lines.height, buffer.getvalue()

    def lines(self, layer: int) -> pl.DataFrame:
        """The layer's catalog lines, by feature index, columns in the documented order."""
        planned = self.planned.filter(pl.col("layer") == layer)
        judgments = judgment_frame(self.connection(), full=True, layer=layer)
        final = final_labels(planned, judgments, self.reviews)
        disputes = find_disputes(judgments, self.rules).select(
            "feature_id", pl.col("reasons").alias("dispute_reasons")
        )
        features = (
            pl.scan_parquet(self.run.folder / FEATURES)
            .filter(pl.col("layer") == layer)
            .select("feature_id", "frequency", "count", "top_logits", "top_logit_values",
                    "bottom_logits")
            .collect()
        )  # fmt: skip
        part = (
            final.join(features, on="feature_id", how="left")
            .join(self.review_lists, on="feature_id", how="left")
            .join(disputes, on="feature_id", how="left")
            .join(_judgment_lists(judgments), on="feature_id", how="left")
            .sort("index")
        )
        part = part.join(self._output_scores(layer), on="feature_id", how="left")
        empty = {c: pl.col(c).fill_null(pl.lit([], dtype=part.schema[c]))
                 for c in ("reviews", "dispute_reasons", "judgments")}  # fmt: skip
        examples = self._examples(layer) if self.with_examples else None
        return _lines(part.with_columns(**empty), examples, self.provenance)

    def _output_scores(self, layer: int) -> pl.DataFrame:
        """The layer's output scores (``labeler score-outputs``) as a struct column."""
        rows = (
            self.connection()
            .execute("SELECT feature_id, payload FROM output_scores WHERE layer=?", (layer,))
            .fetchall()
        )
        frame = pl.DataFrame(rows, schema={"feature_id": pl.String, "payload": pl.String},
                             orient="row")  # fmt: skip
        return frame.select(
            "feature_id", pl.col("payload").str.json_decode(OUTPUT_SCORE).alias("output_score")
        )

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


OUTPUT_SCORE = pl.Struct({
    "size": pl.Float64, "tokens": pl.List(pl.String), "logprob_change": pl.Float64,
    "lens_change": pl.Float64, "mass_change": pl.Float64, "kl": pl.Float64,
    "null_high": pl.Float64, "p_value": pl.Float64, "significant": pl.Boolean,
    "promoted": pl.List(pl.String),
})  # fmt: skip
"""What the catalog keeps of a feature's output score (``labeler.causal.output_score``)."""


def _lines(
    part: pl.DataFrame, examples: pl.DataFrame | None, provenance: dict[str, str]
) -> pl.DataFrame:
    """One layer's catalog lines, columns in the documented order."""
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
        "output_score",
        pl.struct([pl.lit(v).alias(k) for k, v in provenance.items()]).alias("provenance"),
    )
    if examples is None:
        return out
    if examples["feature_id"].equals(out["feature_id"]):  # every feature planned: no join
        return out.with_columns(examples["examples"])
    out = out.join(examples, on="feature_id", how="left", maintain_order="left")
    return out.with_columns(pl.col("examples").fill_null(pl.lit([], dtype=out.schema["examples"])))
