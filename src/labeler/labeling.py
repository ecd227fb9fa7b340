"""Planning which features to label and labeling them with the local executor.

``label_feature`` is the unit of work (one feature, one judge); executors only decide
where it runs. The local executor is one asyncio loop: judges' model calls overlap up
to a request limit, and the loop alone writes to the store as each result arrives, so
an interrupted labeling keeps every finished judgment and a re-run does only what is
missing.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from labeler.errors import JudgeFailure
from labeler.judges import Judge
from labeler.run_data import RunData
from labeler.schemas import FeatureRecord, Judgment, Snippet
from labeler.staging import StageName, StageOutcome
from labeler.store import LabelStore

log = logging.getLogger(__name__)

N_NEGATIVES = 5
RECORD_CHUNK = 256


def plan_features(
    run: RunData, sample_per_layer: int | None, seed: int
) -> list[tuple[str, int, int]]:
    """All alive features, or ``sample_per_layer`` of them per layer uniformly at random
    (seeded, so a re-run plans the same sample)."""
    alive = run.alive().select("feature_id", "layer", "index").sort("layer", "index")
    planned: list[tuple[str, int, int]] = []
    for (layer,), group in alive.group_by("layer", maintain_order=True):
        rows = group.rows()
        if sample_per_layer is not None and sample_per_layer < len(rows):
            rng = np.random.default_rng([seed, int(str(layer))])
            pick = np.sort(rng.choice(len(rows), size=sample_per_layer, replace=False))
            rows = [rows[i] for i in pick]
        planned.extend((str(f), int(la), int(i)) for f, la, i in rows)
    return planned


def negatives_for(run: RunData, record: FeatureRecord, seed: int) -> dict[str, list[Snippet]]:
    """Corpus windows checked not to activate the feature, per detection set."""
    return {
        kind: run.negative_snippets(record, N_NEGATIVES, seed + offset)
        for offset, kind in enumerate(("top", "random"))
    }


async def label_feature(run: RunData, judge: Judge, record: FeatureRecord, seed: int) -> Judgment:
    """One judgment: negatives checked to be non-activating, then the judge."""
    return await judge.judge(record, negatives_for(run, record, seed))


async def run_stage(
    judge: Judge,
    stage: StageName,
    record: FeatureRecord,
    negatives: dict[str, list[Snippet]],
    explanation: str | None = None,
) -> StageOutcome:
    """One stage of one (feature, judge), as a fleet worker runs it. Failures come back
    as an outcome with the reason; only a rate limit to reschedule raises."""
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
                            cost_usd=_failure_cost(judge, exc))  # fmt: skip
    return StageOutcome(**base, ok=True, judgment=judgment, usage=judgment.usage,
                        cost_usd=judgment.cost_usd)  # fmt: skip


@dataclass(frozen=True)
class LabelReport:
    planned: int
    skipped: int
    labeled: int
    failed: int
    pending: int = 0
    spent_usd: float | None = 0.0
    budget_reached: bool = False


def _records(run: RunData, todo: list[str]) -> Iterator[FeatureRecord]:
    for start in range(0, len(todo), RECORD_CHUNK):
        yield from run.records(todo[start : start + RECORD_CHUNK])


def label_run(
    run: RunData,
    store: LabelStore,
    judge: Judge,
    sample_per_layer: int | None = None,
    concurrency: int = 8,
    seed: int = 0,
    budget_usd: float | None = None,
    on_start: Callable[[int], None] | None = None,
    on_result: Callable[[bool], None] | None = None,
) -> LabelReport:
    """Label every planned feature that ``judge`` has not labeled successfully yet, with
    at most ``concurrency`` model requests in flight; with ``budget_usd``, start no new
    feature once this labeling has spent that much (the rest stays pending)."""
    return asyncio.run(
        label_run_async(
            run, store, judge, sample_per_layer, concurrency, seed, budget_usd, on_start, on_result
        )
    )


async def label_run_async(
    run: RunData,
    store: LabelStore,
    judge: Judge,
    sample_per_layer: int | None = None,
    concurrency: int = 8,
    seed: int = 0,
    budget_usd: float | None = None,
    on_start: Callable[[int], None] | None = None,
    on_result: Callable[[bool], None] | None = None,
) -> LabelReport:
    store.add_planned(plan_features(run, sample_per_layer, seed))
    planned = [fid for fid, _, _ in store.planned()]
    done = store.done(judge.name)
    todo = [fid for fid in planned if fid not in done]
    if on_start is not None:
        on_start(len(todo))
    _ = run.negative_pool  # read once here
    judge.limit_requests(concurrency)
    store.set_meta("executor", "local")
    beat = Heartbeat(store, judge.name)
    # As many features as requests: a feature has up to three calls in flight at once, so
    # the request limit stays the binding one.
    slots = asyncio.Semaphore(concurrency)
    labeled = failed = started = 0
    spent: float | None = 0.0
    budget_reached = False

    def charge(cost: float | None) -> None:
        nonlocal spent  # None once any cost is unknown (a model without a price)
        spent = None if spent is None or cost is None else spent + cost

    async def one(record: FeatureRecord) -> None:
        nonlocal labeled, failed
        ok = False
        try:
            judgment = await label_feature(run, judge, record, seed)
            store.put_ok(judgment)
            charge(judgment.cost_usd)
            labeled += 1
            ok = True
        except JudgeFailure as exc:
            cost = _failure_cost(judge, exc)
            store.put_failure(record.feature_id, judge.name, exc.reason, judge.prompt_hash,
                              exc.usage, cost)  # fmt: skip
            charge(cost)
            failed += 1
        except Exception as exc:  # recorded with its reason, never dropped
            log.exception("%s: judge %s raised", record.feature_id, judge.name)
            reason = f"error: {type(exc).__name__}: {exc}"
            store.put_failure(record.feature_id, judge.name, reason, judge.prompt_hash)
            failed += 1
        finally:
            slots.release()
        beat.update(started - labeled - failed)
        if on_result is not None:
            on_result(ok)

    tasks: set[asyncio.Task[None]] = set()
    try:
        for record in _records(run, todo):
            await slots.acquire()
            if budget_usd is not None and spent is not None and spent >= budget_usd:
                slots.release()
                budget_reached = True
                break
            started += 1
            task = asyncio.create_task(one(record))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.gather(*tasks)
    finally:
        beat.update(0, force=True)
        await judge.aclose()
    return LabelReport(
        planned=len(planned), skipped=len(done), labeled=labeled, failed=failed,
        pending=len(todo) - started, spent_usd=spent, budget_reached=budget_reached,
    )  # fmt: skip


class Heartbeat:
    """How many features the local executor has in flight, written to the store at most
    once a second so that ``labeler status`` can show them."""

    def __init__(self, store: LabelStore, judge: str) -> None:
        self.store = store
        self.judge = judge
        self.last = 0.0

    def update(self, running: int, force: bool = False) -> None:
        now = time.time()
        if force or now - self.last >= 1.0:
            self.last = now
            beat = {"judge": self.judge, "running": running, "at": now}
            self.store.set_meta("local_running", json.dumps(beat))


def _failure_cost(judge: Judge, failure: JudgeFailure) -> float | None:
    cost = getattr(judge, "cost", None)
    return cost(failure.usage) if cost is not None else 0.0
