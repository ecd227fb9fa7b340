"""A judgment in stages, so that a fleet can run each stage where it fits.

An LLM judge's work on one feature is four model calls: the explanation, detection on
the top and on the random positives (both need the explanation), and the
classification; the scorers asked for beyond detection add theirs (``fuzz`` needs the
explanation, ``intruder`` does not), and so do the classifier's resamples
(``resample``: ``label --resamples K``, K more classifications on halves of the
examples, ``judges.resampling``). Each is a *stage* with its own result;
:func:`assemble` turns the results into the judgment. The local executor runs the
stages in one process; the Celery executor runs each as a task on a queue named by
stage group and provider (``explain.openai``, ``score.local``, ...), so that a paid
call that succeeded is kept even when a later stage of the same feature fails or its
worker dies.

Judges that are not staged (the heuristic judge, third-party backends) run as one
``label`` stage whose result is the whole judgment.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal, cast

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from labeler.judges.metrics import detection_score
from labeler.judges.requests import KeptReply
from labeler.judges.resampling import resampling
from labeler.judges.scorers import intruder_score, scorers_of
from labeler.run.schemas import (
    Classification,
    DetectionScore,
    IntruderScore,
    Judgment,
    Resampling,
    Usage,
)
from prompts import Category

StageName = Literal[
    "explain",
    "detect_top",
    "detect_random",
    "fuzz",
    "intruder",
    "classify",
    "resample",
    "label",
]
STAGE_GROUPS: dict[StageName, str] = {
    "explain": "explain",
    "detect_top": "score",
    "detect_random": "score",
    "fuzz": "score",
    "intruder": "score",
    "classify": "classify",
    "resample": "classify",
    "label": "label",
}
STAGED_PROVIDERS = {"openai": "openai", "anthropic": "anthropic", "hf": "local"}
# Classification waits for the explanation too: it does not lengthen a feature's path
# (detection waits for it anyway) and nothing is spent classifying a feature whose
# explanation failed.
DEPENDS_ON: dict[StageName, tuple[StageName, ...]] = {
    "detect_top": ("explain",),
    "detect_random": ("explain",),
    "fuzz": ("explain",),
    "classify": ("explain",),
    "resample": ("explain",),
}
SCORER_STAGES: dict[str, StageName] = {
    "fuzz": "fuzz",
    "intruder": "intruder",
    "resamples": "resample",
}
"""The judgment fields that stages beyond a label's own add, and their stages: a field
asked for on a feature labeled without it runs only its stage (``resamples`` is asked
for by ``label --resamples``, see :func:`carried`)."""
FIELD_OF_STAGE: dict[StageName, str] = {stage: name for name, stage in SCORER_STAGES.items()}
Scores = DetectionScore | IntruderScore | Resampling
STAGE_SCHEMA_VERSION = 1


class Detection(BaseModel):
    """Answers of one detection set: the truth, the model's answers and, where the
    backend yields them, its probabilities of 'activating'."""

    model_config = ConfigDict(extra="forbid")

    truth: list[bool]
    predicted: list[bool]
    probs: list[float] | None = None

    def score(self) -> DetectionScore:
        return detection_score(self.truth, self.predicted, self.probs)


class Intrusion(BaseModel):
    """Answers of the intruder trials: where each intruder was and which window the
    judge picked."""

    model_config = ConfigDict(extra="forbid")

    truth: list[int]
    picked: list[int]

    def score(self) -> IntruderScore:
        return intruder_score(self.truth, self.picked)


class StageOutcome(BaseModel):
    """What one stage of one (feature, judge) produced, or why it failed, and what its
    calls cost (failed attempts included)."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int = STAGE_SCHEMA_VERSION
    feature_id: str
    judge: str
    prompt_hash: str
    stage: StageName
    ok: bool
    reason: str | None = Field(None, description="'KIND: STAGE: detail' when not ok")
    usage: dict[str, Usage] = Field(default_factory=dict)
    cost_usd: float | None = 0.0
    explanation: str | None = None
    detection: Detection | None = Field(None, description="detect_* and fuzz stages")
    intrusion: Intrusion | None = None
    classification: Classification | None = None
    resampled: list[Category] | None = Field(
        None, description="resample stage: the category of each resampled classification"
    )
    judgment: Judgment | None = Field(None, description="the whole judgment ('label' stage)")
    kept: list[KeptReply] = Field(
        default_factory=list,
        description="replies the stage accepted, for the reply cache (not stored with it)",
    )
    _tickets: list[str] = PrivateAttr(default_factory=list)

    @property
    def tickets(self) -> list[str]:
        """The journal tickets of the calls whose usage this outcome holds (not stored):
        ended once the outcome is (``labeling.call_journal``)."""
        return self._tickets

    def hold(self, tickets: list[str]) -> None:
        self._tickets = tickets


def provider_of(judge: str) -> str:
    prefix = judge.split(":", 1)[0]
    return STAGED_PROVIDERS.get(prefix, prefix)


def is_staged(judge: str) -> bool:
    return judge.split(":", 1)[0] in STAGED_PROVIDERS


def carried(scorers: tuple[str, ...], resamples: int = 0) -> tuple[str, ...]:
    """What every judgment of a labeling is to carry, as the engine and the store take
    it: the scorers asked for, and ``resamples`` when the classifier is resampled."""
    return (*scorers, "resamples") if resamples > 0 else tuple(scorers)


def carried_by(judges: Iterable[object]) -> tuple[str, ...]:
    """What the judges were built to give every judgment: their scorers
    (``scorers_of``), and ``resamples`` if any resamples its classifier."""
    judges = list(judges)
    asked = max((int(getattr(j, "resamples", 0)) for j in judges), default=0)
    return carried(scorers_of(judges), asked)


def stages_for(
    judge: str, detection_sets: list[str], scorers: tuple[str, ...] = ("detection",)
) -> list[StageName]:
    """The stages of one (feature, judge); ``detection_sets`` are the example kinds the
    feature has positives of ('top', 'random'); ``scorers`` what is asked for beyond a
    label (:func:`carried`: detection is always part of a judgment)."""
    if not is_staged(judge):
        return ["label"]
    detect: list[StageName] = [
        s for s in ("detect_top", "detect_random") if s[7:] in detection_sets
    ]
    more = [SCORER_STAGES[s] for s in scorers if s in SCORER_STAGES]
    return ["explain", *detect, *more, "classify"]


def has_scorers(judgment: Judgment, scorers: tuple[str, ...]) -> bool:
    """Whether a judgment carries every scorer's result asked for (and its resamples,
    where ``scorers`` names them)."""
    return all(getattr(judgment, s) is not None for s in scorers if s in SCORER_STAGES)


def queue_for(judge: str, stage: StageName) -> str:
    return f"{STAGE_GROUPS[stage]}.{provider_of(judge)}"


def ready(stages: list[StageName], done: set[StageName]) -> list[StageName]:
    """Stages not done whose dependencies are."""
    return [s for s in stages if s not in done and all(d in done for d in DEPENDS_ON.get(s, ()))]


def add_usage(*parts: dict[str, Usage]) -> dict[str, Usage]:
    out: dict[str, Usage] = {}
    for part in parts:
        for stage, usage in part.items():
            out[stage] = out.get(stage, Usage()) + usage
    return out


def add_costs(costs: list[float | None]) -> float | None:
    """The sum, or None once any part has no price."""
    return None if any(c is None for c in costs) else sum(c for c in costs if c is not None)


def scorer_results(outcomes: list[StageOutcome], category: str) -> dict[str, Scores]:
    """The results of the fuzz, intruder and resample stages among ``outcomes`` (those
    present), by judgment field; ``category`` is the label's (what the resampled answers
    are compared with)."""
    out: dict[str, Scores] = {}
    for outcome in outcomes:
        if outcome.stage == "fuzz" and outcome.detection is not None:
            out["fuzz"] = outcome.detection.score()
        elif outcome.stage == "intruder" and outcome.intrusion is not None:
            out["intruder"] = outcome.intrusion.score()
        elif outcome.stage == "resample" and outcome.resampled is not None:
            out["resamples"] = resampling(list(outcome.resampled), category)
    return out


def extend(judgment: Judgment, outcomes: list[StageOutcome]) -> Judgment:
    """A stored judgment with the results of stages run for it later (a scorer, the
    resamples), compared with the label it has."""
    return judgment.model_copy(update=scorer_results(outcomes, judgment.classification.category))


def assemble(outcomes: list[StageOutcome]) -> Judgment:
    """The judgment from every stage of one (feature, judge), all ok."""
    by_stage = {o.stage: o for o in outcomes}
    if "label" in by_stage:
        judgment = by_stage["label"].judgment
        assert judgment is not None
        return judgment
    first = outcomes[0]
    explanation = by_stage["explain"].explanation
    classification = by_stage["classify"].classification
    assert explanation is not None and classification is not None
    by_set: dict[str, DetectionScore] = {}
    pooled = Detection(truth=[], predicted=[], probs=[])
    for stage in ("detect_top", "detect_random"):
        part = by_stage.get(stage)  # type: ignore[call-overload]
        if part is None or part.detection is None:
            continue
        by_set[stage[7:]] = part.detection.score()
        pooled.truth += part.detection.truth
        pooled.predicted += part.detection.predicted
        pooled.probs = (
            None
            if pooled.probs is None or part.detection.probs is None
            else pooled.probs + part.detection.probs
        )
    scores = scorer_results(outcomes, classification.category)
    return Judgment(
        feature_id=first.feature_id,
        judge=first.judge,
        prompt_hash=first.prompt_hash,
        explanation=explanation,
        detection=pooled.score(),
        detection_by_set=by_set,
        classification=classification,
        fuzz=cast("DetectionScore | None", scores.get("fuzz")),
        intruder=cast("IntruderScore | None", scores.get("intruder")),
        resamples=cast("Resampling | None", scores.get("resamples")),
        usage=add_usage(*(o.usage for o in outcomes)),
        cost_usd=add_costs([o.cost_usd for o in outcomes]),
    )
