"""A run's scores read against its control run (``labeler summarize RUN --baseline BASE``).

Features of random networks get auto-interpretation scores close to those of trained
ones (Heap et al. 2025, arXiv 2501.17727), so a median says little alone. For every
score both runs carry, per judge: the median and interquartile range of each, and the
share of the run's features that reach the control's 95th percentile (its 5th for a
p-value, where lower is better). Scores are bounded and tie at their best value (an F1
of 1, every intruder found), so "reach" counts a tie, and what a run drawn like its
control would put there is the control's own share at or beyond that percentile: 5%
without ties, more with them. The score separates the run from chance when the run's
share, with its 95% Wilson interval, lies above the control's own. Among the features
that reach it, the share the judge called reasoning says whether the claim "these are
reasoning features" rests on scores that mean something.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl
from pydantic import BaseModel, Field

from labeler.judges.score_values import METRICS, score_values
from labeler.judges.scorers import wilson_interval
from labeler.labeling.store import LabelStore
from labeler.reporting.score_distributions import Spread, spread

LOWER_IS_BETTER = frozenset({"intruder.p_value"})
TAIL = 0.95
"""The control's quantile a run's feature must reach (its 1 - TAIL quantile where lower
is better)."""


class MetricVsBaseline(BaseModel):
    """One judge's one score in the run beside the control's."""

    judge: str
    metric: str = Field(description="a flat score name (labeler.judges.score_values)")
    lower_is_better: bool
    run: Spread
    baseline: Spread
    threshold: float = Field(
        description="the control's 95th percentile (5th where lower is better)"
    )
    n_reach: int = Field(description="the run's features at or beyond the threshold")
    share_reach: float = Field(description="n_reach over the run's features with the score")
    share_reach_ci: tuple[float, float] = Field(description="95% Wilson interval")
    baseline_share_reach: float = Field(
        description="the control's own share at or beyond the threshold: what chance gives "
        "(0.05 without ties at the threshold)"
    )
    reasoning_among_reach: float | None = Field(
        description="share of the run's features that reach it the judge classified as reasoning"
    )
    separates: bool = Field(
        description="the interval of share_reach lies above baseline_share_reach"
    )
    sentence: str


class BaselineComparison(BaseModel):
    """``summary.json``'s ``baseline``: the run's scores against its control's."""

    baseline: str = Field(description="the control run folder")
    control_of: str = Field(description="the run the control was made for")
    same_run: bool = Field(description="whether that is this run")
    metrics: list[MetricVsBaseline]
    separates: bool = Field(description="some score separates the run from its control")
    verdict: str


def _frame(store: LabelStore, judge: str) -> pl.DataFrame:
    """feature_id, category and every metric of a judge's successful judgments."""
    rows = []
    for fid, stored in store.judgments(judge).items():
        if stored.status != "ok" or stored.judgment is None:
            continue
        j = stored.judgment
        rows.append({"feature_id": fid, "category": j.classification.category,
                     **score_values(j)})  # fmt: skip
    schema = {"feature_id": pl.String, "category": pl.String,
              **{m.name: pl.Float64 for m in METRICS}}  # fmt: skip
    return pl.DataFrame(rows, schema=schema)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def metric_vs_baseline(
    judge: str, metric: str, run: pl.DataFrame, base: pl.DataFrame
) -> MetricVsBaseline | None:
    """The comparison of one metric, None where either run has no value of it."""
    mine = run.filter(pl.col(metric).is_not_null())
    theirs = base[metric].drop_nulls()
    if mine.is_empty() or theirs.is_empty():
        return None
    lower = metric in LOWER_IS_BETTER
    threshold = float(theirs.quantile(1 - TAIL if lower else TAIL, interpolation="linear") or 0.0)

    column = pl.col(metric)
    reach = mine.filter(column <= threshold if lower else column >= threshold)
    control_reach = theirs.filter(theirs <= threshold if lower else theirs >= threshold)
    n, k = mine.height, reach.height
    low, high = wilson_interval(k, n)
    chance = control_reach.len() / theirs.len()
    reasoning = reach.filter(pl.col("category") == "reasoning").height / k if k else None
    separates = low > chance
    ours, control = spread(mine[metric]), spread(theirs)
    sentence = (
        f"{metric}: median {_fmt(ours.median)} vs baseline {_fmt(control.median)}; "
        f"{k / n:.0%} of features reach the baseline's {'5th' if lower else '95th'} "
        f"percentile ({threshold:.3g}; {chance:.0%} of the baseline's own do)"
    )
    if reasoning is not None:
        sentence += f"; of those, {reasoning:.1%} are reasoning"
    if not separates:
        sentence += (
            f". The baseline scores as high: {metric} does not separate the run from chance "
            "on this model"
        )
    return MetricVsBaseline(
        judge=judge, metric=metric, lower_is_better=lower, run=ours, baseline=control,
        threshold=threshold, n_reach=k, share_reach=k / n, share_reach_ci=(low, high),
        baseline_share_reach=chance, reasoning_among_reach=reasoning, separates=separates,
        sentence=sentence,
    )  # fmt: skip


def compare_with_baseline(
    run_store: LabelStore, base_store: LabelStore, base: Path, control_of: str, run: Path
) -> BaselineComparison:
    """Every metric of every judge that labeled both runs."""
    judges = [j for j in run_store.judges() if j in set(base_store.judges())]
    rows = []
    for judge in judges:
        mine, theirs = _frame(run_store, judge), _frame(base_store, judge)
        for metric in METRICS:
            row = metric_vs_baseline(judge, metric.name, mine, theirs)
            if row is not None:
                rows.append(row)
    separates = any(r.separates for r in rows)
    if not rows:
        verdict = f"no score in common with the baseline {base} (no judge or scorer labeled both)"
    elif separates:
        named = ", ".join(sorted({r.metric.split(".")[0] for r in rows if r.separates}))
        verdict = f"the run's scores stand above its baseline's ({named} scores)"
    else:
        verdict = (
            "the baseline scores as high as the run on every score: the scores do not "
            "separate the run from chance on this model"
        )
    return BaselineComparison(
        baseline=str(base), control_of=control_of,
        same_run=Path(control_of) == run.resolve(), metrics=rows, separates=separates,
        verdict=verdict,
    )  # fmt: skip
