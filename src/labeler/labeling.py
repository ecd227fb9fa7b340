"""Planning which features to label and labeling them with a local concurrent executor.

``label_feature`` is the pure unit of work (one feature, one judge); executors only decide
where it runs. The driver alone writes to the store, as each result arrives, so an
interrupted labeling keeps every finished judgment and a re-run does only what is missing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

import numpy as np

from labeler.errors import JudgeFailure
from labeler.judges import Judge
from labeler.run_data import RunData
from labeler.schemas import FeatureRecord, Judgment
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


def label_feature(run: RunData, judge: Judge, record: FeatureRecord, seed: int) -> Judgment:
    """One judgment: negatives checked to be non-activating, then the judge."""
    negatives = {
        kind: run.negative_snippets(record, N_NEGATIVES, seed + offset)
        for offset, kind in enumerate(("top", "random"))
    }
    return judge.judge(record, negatives)


@dataclass(frozen=True)
class LabelReport:
    planned: int
    skipped: int
    labeled: int
    failed: int


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
    on_start: Callable[[int], None] | None = None,
    on_result: Callable[[bool], None] | None = None,
) -> LabelReport:
    """Label every planned feature that ``judge`` has not labeled successfully yet."""
    store.add_planned(plan_features(run, sample_per_layer, seed))
    planned = [fid for fid, _, _ in store.planned()]
    done = store.done(judge.name)
    todo = [fid for fid in planned if fid not in done]
    if on_start is not None:
        on_start(len(todo))
    _ = run.negatives  # read once here, not concurrently by the workers
    labeled = failed = 0

    def finish(future: Future[Judgment], record: FeatureRecord) -> None:
        nonlocal labeled, failed
        try:
            store.put_ok(future.result())
            labeled += 1
        except JudgeFailure as exc:
            store.put_failure(record.feature_id, judge.name, exc.reason, judge.prompt_hash)
            failed += 1
        except Exception as exc:  # recorded with its reason, never dropped
            log.exception("%s: judge %s raised", record.feature_id, judge.name)
            reason = f"{type(exc).__name__}: {exc}"
            store.put_failure(record.feature_id, judge.name, reason, judge.prompt_hash)
            failed += 1
        if on_result is not None:
            on_result(future.exception() is None)

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        pending: dict[Future[Judgment], FeatureRecord] = {}
        for record in _records(run, todo):
            pending[pool.submit(label_feature, run, judge, record, seed)] = record
            if len(pending) >= 4 * concurrency:
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    finish(future, pending.pop(future))
        for future in list(pending):
            wait([future])
            finish(future, pending.pop(future))
    return LabelReport(len(planned), len(done), labeled, failed)
