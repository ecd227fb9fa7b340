"""How a judge's detection scores spread over features: the median and interquartile
range of F1 and balanced accuracy, by the final category and by layer.

Only these two of the stored scores pass the sanity checks of Oikarinen et al. (ICML
2025) without the judge's probabilities (see ``labeler.judges.metrics``). Features whose
score is undefined (a class missing) or was stored before the score existed are left
out of ``n``."""

from __future__ import annotations

import polars as pl
from pydantic import BaseModel, Field

from labeler.labeling.store import LabelStore

METRICS = ("f1", "balanced_accuracy")
_QUERY = (
    "SELECT feature_id, judge, "
    "CAST(payload ->> '$.detection.f1' AS REAL), "
    "CAST(payload ->> '$.detection.balanced_accuracy' AS REAL) "
    "FROM judgments WHERE status = 'ok'"
)
_SCHEMA = pl.Schema(
    {"feature_id": pl.String, "judge": pl.String, "f1": pl.Float64,
     "balanced_accuracy": pl.Float64}
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


class DetectionDistribution(BaseModel):
    """One judge's detection F1 and balanced accuracy over the features it labeled."""

    by_category: dict[str, ScoreSpreads] = Field(description="by the feature's final category")
    by_layer: dict[str, ScoreSpreads]


def detection_scores(store: LabelStore) -> pl.DataFrame:
    """feature_id, judge, f1, balanced_accuracy of every successful judgment."""
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
    """``scores``: one judge's feature_id, f1, balanced_accuracy; ``final``: feature_id,
    layer and the final ``category`` (null where no final label)."""
    joined = scores.join(final.select("feature_id", "layer", "category"), on="feature_id")
    return DetectionDistribution(
        by_category={c: _spreads(joined.filter(pl.col("category") == c)) for c in categories},
        by_layer={la: _spreads(joined.filter(pl.col("layer") == int(la))) for la in layers},
    )
