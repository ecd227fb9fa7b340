"""Every score a judgment carries, by one flat name (``fuzz.f1``, ``intruder.accuracy``):
what the catalog, ``browse``, ``summarize`` and the baseline comparison list, filter,
sort and compare, so that a scorer added later is one entry here."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from labeler.run.schemas import DetectionScore, IntruderScore, Judgment

DETECTION_METRICS = ("accuracy", "balanced_accuracy", "f1", "auroc", "auprc")


@dataclass(frozen=True)
class ScoreMetric:
    name: str
    """``scorer.metric``: ``detection.f1``, ``fuzz.auroc``, ``intruder.accuracy``."""
    scorer: str
    metric: str
    chance: float | None
    """What answers independent of the truth score on average where it does not depend
    on the feature (0.5 for balanced accuracy and AUROC); None where it does (F1 and
    AUPRC: the base rate; intruder accuracy: in ``IntruderScore.chance``)."""
    read: Callable[[Judgment], float | None]


def _detection(scorer: str, metric: str) -> Callable[[Judgment], float | None]:
    def read(j: Judgment) -> float | None:
        score: DetectionScore | None = j.detection if scorer == "detection" else j.fuzz
        return None if score is None else getattr(score, metric)

    return read


def _intruder(metric: str) -> Callable[[Judgment], float | None]:
    def read(j: Judgment) -> float | None:
        score: IntruderScore | None = j.intruder
        return None if score is None else getattr(score, metric)

    return read


METRICS: tuple[ScoreMetric, ...] = (
    *(
        ScoreMetric(
            f"{scorer}.{metric}",
            scorer,
            metric,
            0.5 if metric in ("balanced_accuracy", "auroc") else None,
            _detection(scorer, metric),
        )
        for scorer in ("detection", "fuzz")
        for metric in DETECTION_METRICS
    ),
    ScoreMetric("intruder.accuracy", "intruder", "accuracy", None, _intruder("accuracy")),
    ScoreMetric("intruder.p_value", "intruder", "p_value", None, _intruder("p_value")),
)
BY_NAME = {m.name: m for m in METRICS}
HEADLINE = ("detection.f1", "fuzz.f1", "intruder.accuracy")
"""One score per scorer, the one shown first (F1 passes the sanity checks of
Oikarinen et al. 2025; intruder accuracy is read against its chance)."""


def score_values(judgment: Judgment) -> dict[str, float | None]:
    """Every metric's value for one judgment (None: not scored, or undefined)."""
    return {m.name: m.read(judgment) for m in METRICS}
