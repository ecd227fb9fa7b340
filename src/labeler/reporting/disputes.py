"""Disputed features: where the labels deserve a person's look.

A feature is disputed when (each rule can be turned off or tuned):
- ``judges_disagree``: its judges gave different categories;
- ``low_confidence``: a judge's confidence is one of the listed levels;
- ``min_detection``: a judge's detection accuracy is below the threshold;
- ``heuristic_outvoted``: the free heuristic judge disagrees with every model judge;
- ``all_failed``: every judge that tried failed, so only a person can label it.

The most informative come first, by a score that adds the spread of the judges' votes
(entropy in bits: 1 for a two-way split), how far the lowest detection accuracy falls
below the threshold, 0.25 for each low-confidence judgment, 0.5 when the heuristic is
outvoted, and 0.75 when every judge failed.
"""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from labeler.errors import UserError, first_error
from labeler.reporting.label_table import HEURISTIC
from labeler.run.feature_ids import feature_order
from prompts import Confidence


def _only_low() -> list[Confidence]:
    return ["low"]


class DisputeRules(BaseModel):
    """When a feature goes to review; read from a JSON file with ``--rules``."""

    model_config = ConfigDict(extra="forbid")

    judges_disagree: bool = Field(True, description="judges gave different categories")
    low_confidence: list[Confidence] = Field(
        default_factory=_only_low, description="confidence levels that send it to review"
    )
    min_detection: float | None = Field(
        0.6, ge=0.0, le=1.0, description="detection accuracy below this sends it to review"
    )
    heuristic_outvoted: bool = Field(
        True, description="the heuristic judge disagrees with every model judge"
    )
    all_failed: bool = Field(True, description="every judge that tried failed")

    @classmethod
    def load(cls, path: Path | None) -> DisputeRules:
        if path is None:
            return cls()
        try:
            return cls.model_validate(json.loads(path.read_text(encoding="utf-8")))
        except FileNotFoundError:
            raise UserError(f"{path}: no such rules file") from None
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}: not JSON ({exc})") from None
        except ValidationError as exc:
            field, message = first_error(exc)
            raise UserError(f"{path}: {field}: {message}") from None


DISPUTE_SCHEMA = pl.Schema(
    {  # type: ignore[arg-type]
        "feature_id": pl.String,
        "reasons": pl.List(pl.String),
        "score": pl.Float64,
        "categories": pl.List(pl.String),
        "min_detection": pl.Float64,
    }
)


def find_disputes(judgments: pl.DataFrame, rules: DisputeRules) -> pl.DataFrame:
    """Disputed features, most informative first, ties by feature id in numeric order
    (DISPUTE_SCHEMA): the reasons, a score, the judges' votes (a list of
    ``judge=category``, by judge) and the lowest detection."""
    ok = judgments.filter(pl.col("status") == "ok")
    failed = _all_failed(judgments, ok) if rules.all_failed else pl.DataFrame(schema=DISPUTE_SCHEMA)
    if ok.is_empty():
        return failed
    threshold = rules.min_detection
    votes = ok.group_by("feature_id", "category").agg(pl.len().alias("n"))
    entropy = (
        votes.with_columns((pl.col("n") / pl.col("n").sum().over("feature_id")).alias("p"))
        .group_by("feature_id")
        .agg((-(pl.col("p") * pl.col("p").log(2))).sum().alias("entropy"))
    )
    model_cats = (
        ok.filter(pl.col("judge") != HEURISTIC)
        .group_by("feature_id")
        .agg(pl.col("category").alias("model_categories"))
    )
    heuristic = ok.filter(pl.col("judge") == HEURISTIC).select(
        "feature_id", pl.col("category").alias("heuristic_category")
    )
    per = (
        ok.sort("judge")
        .group_by("feature_id")
        .agg(
            pl.col("category").n_unique().alias("n_categories"),
            pl.col("confidence").is_in(rules.low_confidence).sum().alias("n_low_confidence"),
            pl.col("detection").min().alias("min_detection"),
            pl.concat_str(pl.col("judge"), pl.lit("="), pl.col("category")).alias("categories"),
        )
        .join(entropy, on="feature_id")
        .join(model_cats, on="feature_id", how="left")
        .join(heuristic, on="feature_id", how="left")
    )
    outvoted = (
        pl.col("heuristic_category").is_not_null()
        & (pl.col("model_categories").list.len().fill_null(0) > 0)
        & ~pl.col("model_categories").list.contains(pl.col("heuristic_category")).fill_null(True)
    )
    shortfall = (
        (pl.lit(threshold) - pl.col("min_detection")).clip(lower_bound=0.0).fill_null(0.0)
        if threshold is not None
        else pl.lit(0.0)
    )
    flags = {
        "judges_disagree": (pl.col("n_categories") > 1) & pl.lit(rules.judges_disagree),
        "low_confidence": pl.col("n_low_confidence") > 0,
        "low_detection": shortfall > 0,
        "heuristic_outvoted": outvoted & pl.lit(rules.heuristic_outvoted),
    }
    reasons = pl.concat_list(
        [
            pl.when(flag).then(pl.lit(name)).otherwise(pl.lit(None, pl.String))
            for name, flag in flags.items()
        ]
    ).list.drop_nulls()
    score = (
        pl.col("entropy") * pl.lit(float(rules.judges_disagree))
        + shortfall
        + 0.25 * pl.col("n_low_confidence")
        + 0.5 * flags["heuristic_outvoted"].cast(pl.Float64)
    )
    flagged = (
        per.with_columns(reasons.alias("reasons"), score.alias("score"))
        .filter(pl.col("reasons").list.len() > 0)
        .select(DISPUTE_SCHEMA.names())
    )
    keys = [pl.col("score"), *feature_order()]
    return pl.concat([flagged, failed]).sort(keys, descending=[True] + [False] * (len(keys) - 1))


def _all_failed(judgments: pl.DataFrame, ok: pl.DataFrame) -> pl.DataFrame:
    """Features no judge labeled though at least one tried."""
    return (
        judgments.filter(pl.col("status") == "failed")
        .join(ok.select("feature_id"), on="feature_id", how="anti")
        .sort("judge")
        .group_by("feature_id")
        .agg((pl.col("judge") + pl.lit("=failed")).alias("categories"))
        .select(
            "feature_id",
            pl.lit(["all_failed"], dtype=pl.List(pl.String)).alias("reasons"),
            pl.lit(0.75).alias("score"),
            "categories",
            pl.lit(None, dtype=pl.Float64).alias("min_detection"),
        )
    )
