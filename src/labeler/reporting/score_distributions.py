"""How a judge's scores spread over features: the median and interquartile range of
every score a judgment carries (``labeler.judges.score_values.METRICS``: detection,
fuzzing, intruder), by the final category and by layer.

Detection's F1 and balanced accuracy keep their own place (``by_category``,
``by_layer``): of the detection scores only these two pass the sanity checks of
Oikarinen et al. (ICML 2025) without the judge's probabilities (see
``labeler.judges.metrics``). ``by_metric`` holds every metric any of the judge's
judgments has a value of, under its flat name (``fuzz.f1``, ``intruder.accuracy``), so a
scorer asked for later shows up without a change here. Features whose score is undefined
(a class missing), not scored, or stored before the score existed are left out of ``n``.
"""

from __future__ import annotations

import polars as pl
from pydantic import BaseModel, Field

from labeler.judges.score_values import METRICS as SCORE_METRICS
from labeler.labeling.store import LabelStore

METRICS = ("f1", "balanced_accuracy")
"""Detection's, kept in ``by_category`` and ``by_layer``."""
_NAMES = tuple(m.name for m in SCORE_METRICS)
_QUERY = (
    "SELECT feature_id, judge, "
    + ", ".join(f"CAST(payload ->> '$.detection.{m}' AS REAL)" for m in METRICS)
    + ", "
    + ", ".join(f"CAST(payload ->> '$.{name}' AS REAL)" for name in _NAMES)
    + " FROM judgments WHERE status = 'ok'"
)
_SCHEMA = pl.Schema(
    {"feature_id": pl.String, "judge": pl.String, **{m: pl.Float64 for m in METRICS},
     **{name: pl.Float64 for name in _NAMES}}
)  # fmt: skip


class Spread(BaseModel):
    """The median and quartiles (linear interpolation) of a score; null when n is 0."""

    n: int
    median: float | None
    q1: float | None
    q3: float | None


class ScoreSpreads(BaseModel):
    f1: Spread
    balanced_accuracy: Spread


class MetricDistribution(BaseModel):
    """One score's spread by the feature's final category and by layer."""

    by_category: dict[str, Spread]
    by_layer: dict[str, Spread]


class DetectionDistribution(BaseModel):
    """One judge's scores over the features it labeled: detection F1 and balanced
    accuracy in ``by_category`` and ``by_layer``, every score present in ``by_metric``."""

    by_category: dict[str, ScoreSpreads] = Field(description="by the feature's final category")
    by_layer: dict[str, ScoreSpreads]
    by_metric: dict[str, MetricDistribution] = Field(
        default_factory=dict,
        description="every score with a value in at least one of the judge's judgments, "
        "by its flat name (labeler.judges.score_values: detection.f1, fuzz.f1, "
        "intruder.accuracy, ...), in that module's order",
    )


def detection_scores(store: LabelStore) -> pl.DataFrame:
    """feature_id, judge, detection's f1 and balanced_accuracy, and every metric by its
    flat name (``fuzz.f1``) of every successful judgment."""
    rows = store.conn.execute(_QUERY).fetchall()
    return pl.DataFrame(rows, schema=_SCHEMA, orient="row")


def spread(values: pl.Series) -> Spread:
    values = values.drop_nulls()
    if values.is_empty():
        return Spread(n=0, median=None, q1=None, q3=None)

    def q(p: float) -> float:
        return float(values.quantile(p, interpolation="linear") or 0.0)

    return Spread(n=values.len(), median=q(0.5), q1=q(0.25), q3=q(0.75))


def _spreads(frame: pl.DataFrame) -> ScoreSpreads:
    return ScoreSpreads(
        f1=spread(frame["f1"]), balanced_accuracy=spread(frame["balanced_accuracy"])
    )


def distribution(
    scores: pl.DataFrame, final: pl.DataFrame, categories: tuple[str, ...], layers: list[str]
) -> DetectionDistribution:
    """``scores``: one judge's rows of :func:`detection_scores`; ``final``: feature_id,
    layer and the final ``category`` (null where no final label)."""
    joined = scores.join(final.select("feature_id", "layer", "category"), on="feature_id")
    by_category = {c: joined.filter(pl.col("category") == c) for c in categories}
    by_layer = {la: joined.filter(pl.col("layer") == int(la)) for la in layers}
    present = [n for n in _NAMES if n in scores.columns and scores[n].is_not_null().any()]
    return DetectionDistribution(
        by_category={c: _spreads(part) for c, part in by_category.items()},
        by_layer={la: _spreads(part) for la, part in by_layer.items()},
        by_metric={
            name: MetricDistribution(
                by_category={c: spread(part[name]) for c, part in by_category.items()},
                by_layer={la: spread(part[name]) for la, part in by_layer.items()},
            )
            for name in present
        },
    )
