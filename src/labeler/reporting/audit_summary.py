"""What ``summarize`` says of the audits: the shares corrected by people's decisions, the
judges' precision and recall against them, and how well the resampled confidence is
calibrated (``labeler.audit.estimate`` has the statistics and their sources)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import polars as pl
from pydantic import BaseModel, Field

from labeler.audit.estimate import (
    AuditedShare,
    AuditUse,
    Calibration,
    Ratio,
    Sample,
    audit_sample,
    audited_share,
    calibration,
    labeled_population,
    plan_weights,
    ratio,
)
from labeler.labeling.store import LabelStore
from labeler.reporting.final_labels import human_labels, judge_labels
from labeler.reporting.label_table import judge_names
from prompts import CATEGORIES

REASONING = "reasoning"
JUDGES = "judges"
NO_AUDIT_NOTE = (
    "the intervals count which features were labeled, not the judges' errors: they take "
    "the judges' labels as right. `labeler audit RUN --n 100` draws features for people "
    "to decide, and their decisions correct the estimate (docs/audit.md)"
)


class RaterAccuracy(BaseModel):
    """A rater's precision and recall for "reasoning" against people's audit labels."""

    rater: str = Field(description="'judges' (the labels the estimate corrects) or a judge")
    precision: Ratio
    recall: Ratio


class AuditSummary(BaseModel):
    """The audited estimate: judges' labels corrected by people's decisions."""

    n_population: int = Field(description="judge-labeled features the audits are drawn from")
    n_drawn: int = Field(description="features drawn by the audits (each counted once)")
    n_decided: int = Field(description="drawn features people have decided")
    n_used: int = Field(description="decided features the estimate uses (draw-order prefixes)")
    audits: list[AuditUse]
    reasoning: AuditedShare | None = Field(
        description="the share of reasoning features with a 95% interval that includes the "
        "judges' error; null until some audited feature is decided"
    )
    by_category: dict[str, AuditedShare]
    accuracy: list[RaterAccuracy] = Field(
        description="the judges' label and each judge against the audit labels"
    )
    calibration: list[Calibration] = Field(
        description="per judge with resampled confidences (`label --resamples`)"
    )


@dataclass(frozen=True)
class JudgesSide:
    """What the estimate reads of the judges (it does not change with the audits): the
    labeled features in order, their layers, the judges' label, each judge's category
    and resampled confidence."""

    population: list[str]
    layers: npt.NDArray[np.int64]
    judged: list[str | None]
    per_judge: dict[str, list[str | None]]
    confidence: dict[str, npt.NDArray[np.float64]]


def judges_side(store: LabelStore, planned: pl.DataFrame, judgments: pl.DataFrame) -> JudgesSide:
    """``judgments``: the brief judgment frame."""
    population = labeled_population(store)
    frame = (
        pl.DataFrame({"feature_id": population}, schema={"feature_id": pl.String})
        .join(planned.select("feature_id", "layer"), on="feature_id", how="left")
        .join(judge_labels(judgments).select("feature_id", "category"), on="feature_id", how="left")
    )
    return JudgesSide(
        population=population,
        layers=frame["layer"].to_numpy().astype(np.int64),
        judged=frame["category"].to_list(),
        per_judge=_judge_categories(judgments, population),
        confidence=_resample_confidence(store, population),
    )


def audit_summary(
    store: LabelStore,
    planned: pl.DataFrame,
    judgments: pl.DataFrame,
    reviews: pl.DataFrame,
    alive: dict[int, int],
    judges: JudgesSide | None = None,
) -> AuditSummary | None:
    """None when the run has no audit. ``judgments`` is the brief judgment frame;
    ``judges``, read from it once, for a caller that summarizes many audits of the same
    labels (a simulation)."""
    audits = store.audits.all()
    if not audits:
        return None
    side = judges or judges_side(store, planned, judgments)
    population, layers, judged = side.population, side.layers, side.judged
    human = dict(human_labels(reviews).select("feature_id", "category").iter_rows())
    sample, uses = audit_sample(store, population, set(human))
    drawn = {fid for _, fid, _ in store.audits.drawn()}
    for audit in audits:  # an imported audit keeps only its drawn features' rows
        if audit.source != "drawn":
            drawn |= {f for f, _, _, q in store.audits.frame(audit.audit_id) if q is not None}
    truth = [human.get(f) for f in population]
    plan_weight = plan_weights(layers, alive)

    def share(value: str) -> AuditedShare | None:
        if not len(sample.index):
            return None
        yhat = np.array([c == value for c in judged], dtype=np.float64)
        y = np.array([c == value for c in truth], dtype=np.float64)
        return audited_share(yhat, y, sample, layers, alive)

    shares: dict[str, AuditedShare | None] = {c: share(c) for c in CATEGORIES}
    per_judge, confidence = side.per_judge, side.confidence
    accuracy = [_accuracy(JUDGES, judged, truth, sample, plan_weight)]
    accuracy += [_accuracy(j, cats, truth, sample, plan_weight) for j, cats in per_judge.items()]
    calibrations = [
        calibration(
            judge,
            confidence[judge],
            np.array(
                [c is not None and c == t for c, t in zip(per_judge[judge], truth, strict=True)],
                dtype=np.float64,
            ),
            sample,
            plan_weight,
        )
        for judge in per_judge
        if judge in confidence
    ]
    return AuditSummary(
        n_population=len(population),
        n_drawn=len(drawn),
        n_decided=len(drawn & set(human)),
        n_used=sample.size,
        audits=uses,
        reasoning=shares[REASONING],
        by_category={c: s for c, s in shares.items() if s is not None},
        accuracy=accuracy if len(sample.index) else [],
        calibration=[c for c in calibrations if c.n],
    )


def _judge_categories(
    judgments: pl.DataFrame, population: list[str]
) -> dict[str, list[str | None]]:
    ok = judgments.filter(pl.col("status") == "ok")
    out = {}
    for judge in judge_names(ok):
        mine = dict(
            ok.filter(pl.col("judge") == judge).select("feature_id", "category").iter_rows()
        )
        out[judge] = [mine.get(f) for f in population]
    return out


def _accuracy(
    rater: str,
    categories: list[str | None],
    truth: list[str | None],
    sample: Sample,
    plan_weight: np.ndarray,
) -> RaterAccuracy:
    said = np.array([c == REASONING for c in categories], dtype=np.float64)
    rated = np.array([c is not None for c in categories], dtype=np.float64)
    real = np.array([t == REASONING for t in truth], dtype=np.float64)
    both = said * real
    return RaterAccuracy(
        rater=rater,
        precision=ratio(both, said, sample, plan_weight),
        recall=ratio(both, real * rated, sample, plan_weight),
    )


def _resample_confidence(
    store: LabelStore, population: list[str]
) -> dict[str, npt.NDArray[np.float64]]:
    """Each judge's resampled confidence per population feature (NaN where none), for the
    judges that have any."""
    position = {fid: i for i, fid in enumerate(population)}
    rows = store.conn.execute(
        "SELECT feature_id, judge, payload ->> '$.resamples.confidence' FROM judgments "
        "WHERE status = 'ok'"
    )
    out: dict[str, npt.NDArray[np.float64]] = {}
    for fid, judge, value in rows:
        if fid in position and value is not None:
            array = out.setdefault(str(judge), np.full(len(population), np.nan))
            array[position[fid]] = float(value)
    return out
