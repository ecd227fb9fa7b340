"""Running one stage of one (feature, judge) in this process, as every transport's
executing side does (the in-process loop, a fleet worker)."""

from __future__ import annotations

import logging
import threading

from labeler.errors import JudgeFailure, Reschedule
from labeler.judges import Judge
from labeler.judges.halting import Halted
from labeler.judges.requests import AwaitingReply
from labeler.judges.stages import StageName, StageOutcome
from labeler.redaction import redact
from labeler.run.schemas import FeatureRecord, Snippet

log = logging.getLogger(__name__)

HALTED = "halted"
"""The failure kind of a stage that sent nothing because the labeling stopped."""


async def run_stage(
    judge: Judge,
    stage: StageName,
    record: FeatureRecord,
    negatives: dict[str, list[Snippet]],
    explanation: str | None = None,
) -> StageOutcome:
    """One stage. Failures come back as an outcome with the reason; only a rate limit to
    reschedule raises (and, for an error no judge expects, see :func:`run_stage_safely`)."""
    if stage != "label":
        staged = getattr(judge, "run_stage", None)
        if staged is None:
            raise ValueError(f"judge {judge.name} has no stage {stage!r}; it runs as 'label'")
        outcome: StageOutcome = await staged(stage, record, negatives, explanation)
        return outcome
    base = {"feature_id": record.feature_id, "judge": judge.name,
            "prompt_hash": judge.prompt_hash, "stage": stage}  # fmt: skip
    try:
        judgment = await judge.judge(record, negatives)
    except JudgeFailure as exc:
        return StageOutcome(**base, ok=False, reason=exc.reason, usage=exc.usage,
                            cost_usd=failure_cost(judge, exc))  # fmt: skip
    return StageOutcome(**base, ok=True, judgment=judgment, usage=judgment.usage,
                        cost_usd=judgment.cost_usd)  # fmt: skip


async def run_stage_safely(
    judge: Judge,
    stage: StageName,
    record: FeatureRecord,
    negatives: dict[str, list[Snippet]],
    explanation: str | None = None,
    errors: ErrorLog | None = None,
) -> StageOutcome:
    """:func:`run_stage`, with an unexpected error turned into the stage's failure with
    its reason (its traceback logged once per distinct error, at INFO: with ``-v``)."""
    try:
        return await run_stage(judge, stage, record, negatives, explanation)
    except (Reschedule, AwaitingReply):  # for the transport to handle
        raise
    except Halted as exc:  # nothing sent: the engine leaves the feature pending
        return StageOutcome(
            feature_id=record.feature_id, judge=judge.name, prompt_hash=judge.prompt_hash,
            stage=stage, ok=False, reason=f"{HALTED}: {exc.reason}", cost_usd=0.0,
        )  # fmt: skip
    except Exception as exc:  # recorded with its reason, never dropped
        (errors or ERRORS).once(f"{record.feature_id} {judge.name} {stage}", exc)
        return StageOutcome(
            feature_id=record.feature_id, judge=judge.name, prompt_hash=judge.prompt_hash,
            stage=stage, ok=False, reason=f"error: {stage}: {type(exc).__name__}: {exc}",
            cost_usd=0.0,
        )  # fmt: skip


class ErrorLog:
    """Logs each distinct unexpected error once: a warning line, and its traceback at
    INFO level (shown with ``-v``); later occurrences only count."""

    def __init__(self) -> None:
        self.seen: dict[str, int] = {}
        self._lock = threading.Lock()

    def once(self, where: str, exc: BaseException) -> None:
        key = redact(f"{type(exc).__name__}: {exc}")
        with self._lock:
            first = key not in self.seen
            self.seen[key] = self.seen.get(key, 0) + 1
        if first:
            log.warning("%s raised %s (shown once; -v for the traceback)", where, key)
            log.info("traceback of %s", key, exc_info=exc)


ERRORS = ErrorLog()


def failure_cost(judge: Judge, failure: JudgeFailure) -> float | None:
    cost = getattr(judge, "cost", None)
    return cost(failure.usage) if cost is not None else 0.0
