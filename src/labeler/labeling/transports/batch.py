"""The batch transport: stages answered by the providers' batch APIs, at batch prices.

The engine plans, starts units from their stored stages and applies outcomes as on
every transport; here a stage runs in this process against the batch results instead
of calling the provider. A stage whose request has no result yet raises
``AwaitingReply``; the request is queued, and every queued request goes out in one
submission per judge (split to the provider's limits) once the units in flight have
queued theirs. Rounds follow: the explanations, then the detection and classification
stages that needed them, then re-asks of replies that failed validation and new tries of
requests that failed transiently, expired or were cancelled. When a batch ends, its
results are stored first (``labeling.batch_records``), then the stages waiting on them
run again.

A submission is recorded before anything is sent and its batch id as soon as the
provider gives it, so a labeler stopped at any moment resumes polling; one cut off
between the two is looked for at the provider before its requests are sent again.
Batches in flight when the labeling stops keep running at the provider and are
collected by the next run.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from labeler.errors import UserError
from labeler.judges import Judge
from labeler.judges.backend import BackendError
from labeler.judges.batch_api import BatchApi, LineResult, batch_api
from labeler.judges.halting import Halted
from labeler.judges.llm_judge import LLMJudge
from labeler.judges.requests import AwaitingReply
from labeler.judges.stages import StageName, StageOutcome, carried_by
from labeler.labeling.batch_records import (
    Awaiting,
    BatchRecords,
    StoredBatchReplies,
    Submission,
    Waiting,
)
from labeler.labeling.engine import FATAL_KINDS, Engine, LabelReport, Unit
from labeler.labeling.guard import LabelingGuard
from labeler.labeling.interrupts import Interrupts
from labeler.labeling.lock import RunLock
from labeler.labeling.stages import ErrorLog, run_stage_safely
from labeler.labeling.store import LabelStore
from labeler.run.data import RunData

log = logging.getLogger(__name__)

OnStart = Callable[[int], None]
OnResult = Callable[[str, bool], None]
DEFAULT_POLL_S = 30.0
DEFAULT_MAX_ACTIVE = 50_000
APPLY_PER_TRANSACTION = 256
CUT_OFF_GRACE_S = 60.0
RELOAD_CHUNK = 1024  # records read back at once when a batch's results are in


@dataclass(frozen=True)
class BatchSettings:
    poll_s: float = DEFAULT_POLL_S
    """Seconds between looks at the batches in flight."""
    max_active: int = DEFAULT_MAX_ACTIVE
    """Features in flight at once (each holds its examples in memory)."""
    max_attempts: int = 6
    """Submissions of a request that fails transiently (429, 5xx) before it fails."""


@dataclass(frozen=True)
class BatchReport:
    """What a batch labeling left at the provider."""

    in_flight: int
    submitted: int


def batch_apis(judges: Sequence[Judge]) -> dict[str, BatchApi]:
    """Each judge's batch API; a judge without one is refused with what to use."""
    apis: dict[str, BatchApi] = {}
    for judge in judges:
        api = batch_api(judge.backend) if isinstance(judge, LLMJudge) else None
        if api is None:
            raise UserError(
                f"judge {judge.name!r} has no batch API: --executor batch takes openai: and "
                "anthropic: judges (use --executor local for the others)"
            )
        apis[judge.name] = api
    return apis


def label_in_batches(
    run: RunData,
    store: LabelStore,
    judges: Sequence[Judge],
    settings: BatchSettings | None = None,
    sample_per_layer: int | None = None,
    seed: int = 0,
    budget_usd: float | None = None,
    on_start: OnStart | None = None,
    on_result: OnResult | None = None,
    interrupts: Interrupts | None = None,
    wait: bool = False,
    scorers: tuple[str, ...] | None = None,
) -> tuple[dict[str, LabelReport], BatchReport]:
    """Every judge on the planned features through provider batches, holding the run's
    lock throughout; a report per judge, and what is still in flight at the provider."""
    apis = batch_apis(judges)
    cancelled = None if interrupts is None else interrupts.requested.is_set
    with RunLock(store.path, "labeler label (batch)", wait=wait, cancelled=cancelled) as lock:
        engine = Engine(run, store, {j.name: j.prompt_hash for j in judges}, sample_per_layer,
                        seed, budget_usd, executor="batch",
                        scorers=scorers or carried_by(judges))  # fmt: skip
        labeling = _Batches(engine, judges, apis, settings or BatchSettings(), on_start,
                            on_result, interrupts, lock)  # fmt: skip
        asyncio.run(labeling.run())
        lock.check()
        return engine.reports(), labeling.report()


class _Batches:
    def __init__(
        self, engine: Engine, judges: Sequence[Judge], apis: dict[str, BatchApi],
        settings: BatchSettings, on_start: OnStart | None, on_result: OnResult | None,
        interrupts: Interrupts | None, lock: RunLock,
    ) -> None:  # fmt: skip
        self.engine = engine
        self.judges = {j.name: j for j in judges}
        self.apis = apis
        self.settings = settings
        self.on_start = on_start
        self.on_result = on_result
        self.interrupts = interrupts
        self.lock = lock
        self.guard = LabelingGuard(lock, interrupts)
        self.records = BatchRecords(engine.store)
        self.replies = StoredBatchReplies(engine.store, settings.max_attempts)
        self.errors = ErrorLog()
        self.waiting: dict[str, list[tuple[Unit, StageName]]] = {}
        self.queued: dict[str, dict[str, Waiting]] = {name: {} for name in self.judges}
        self.spent: set[str] = set()
        self.submitted = 0

    def report(self) -> BatchReport:
        return BatchReport(in_flight=len(self._open()), submitted=self.submitted)

    def _open(self) -> list[Submission]:
        """This labeling's submissions not ended (another judge's are left to a labeling
        with that judge)."""
        return [s for s in self.records.open() if s.judge in self.apis]

    def _stopping(self) -> bool:
        return self.engine.heed(self.interrupts, self.lock)

    async def run(self) -> None:
        todo = self.engine.plan()
        if self.on_start is not None:
            self.on_start(len(todo))
        for judge in self.judges.values():
            assert isinstance(judge, LLMJudge)
            judge.batch = self.replies
            judge.replies = self.engine.reply_cache()
        units = self.engine.units(todo)
        try:
            await self._resolve_cut_off()
            exhausted = False
            while True:
                while not self._stopping() and len(self.engine.active) < self.settings.max_active:
                    unit = next(units, None)
                    if unit is None:
                        exhausted = True
                        break
                    await self._advance(unit)
                    self._park([unit])
                if not self._stopping():
                    await self._submit_queued()
                self._forget_spent()
                open_ = self._open()
                if self._stopping() or (not open_ and exhausted and not self._any_queued()):
                    break
                if not open_:
                    if len(self.engine.active) >= self.settings.max_active and not exhausted:
                        # every unit in flight waits, yet nothing is queued or in flight
                        raise RuntimeError("batch labeling stalled: units wait on nothing")
                    continue  # more units to start, or queued requests to submit
                if not await self._poll(open_):
                    await self._sleep(self.settings.poll_s)
        finally:
            self._forget_spent()
            self.engine.abandon_active()
            for judge in self.judges.values():
                await judge.aclose()

    def _grace(self) -> float:
        """How long a cut-off submission is left to the provider before it is looked for."""
        return min(CUT_OFF_GRACE_S, 2 * self.settings.poll_s)

    def _any_queued(self) -> bool:
        return any(self.queued.values())

    async def _sleep(self, seconds: float) -> None:
        """A pause that ends early on an interrupt."""
        waited = 0.0
        while waited < seconds and not self._stopping():
            step = min(0.2, seconds - waited)
            await asyncio.sleep(step)
            waited += step

    # -- stages ------------------------------------------------------------------------

    def _park(self, units: list[Unit]) -> None:
        """Drop the records of units that now only wait on batches (most of a feature's
        memory); :meth:`_rerun` reloads them, many at a time, when results are in."""
        for unit in units:
            if unit.key in self.engine.active:
                unit.record = None

    async def _rerun(self, waiters: list[tuple[Unit, StageName]]) -> None:
        """Run again the stages waiting on results now stored, their records reloaded a
        chunk at a time and the outcomes applied a few hundred per transaction (short
        transactions leave the run's lock free to be renewed)."""
        for start in range(0, len(waiters), RELOAD_CHUNK):
            part = waiters[start : start + RELOAD_CHUNK]
            parked = list(dict.fromkeys(u.feature_id for u, _ in part if u.record is None))
            records = {r.feature_id: r for r in self.engine.run.records(parked)} if parked else {}
            for unit, _ in part:
                if unit.record is None:
                    unit.record = records[unit.feature_id]
            for first in range(0, len(part), APPLY_PER_TRANSACTION):
                with self.engine.store.transaction():
                    for unit, stage in part[first : first + APPLY_PER_TRANSACTION]:
                        # a unit that ended meanwhile still gets the result: the engine
                        # keeps a late stage and counts what it cost
                        await self._run(unit, stage)
            self._park([u for u, _ in part])
        self._forget_spent()

    def _forget_spent(self) -> None:
        """Mark the results that ended stages' failures as used up, once every stage
        waiting on them has read them (two features may share a request)."""
        if self.spent:
            self.replies.used_up(self.spent)
            self.spent = set()

    async def _advance(self, unit: Unit) -> None:
        for stage in unit.to_send():
            if unit.key not in self.engine.active:
                return
            unit.sent.add(stage)
            await self._run(unit, stage)

    async def _run(self, unit: Unit, stage: StageName) -> None:
        judge = self.judges[unit.judge]
        self.replies.consulted.clear()
        try:
            outcome = await run_stage_safely(judge, stage, unit.feature(), unit.negatives,
                                             unit.explanation(), self.errors)  # fmt: skip
        except AwaitingReply as wait:
            assert isinstance(wait, Awaiting)
            if unit.key not in self.engine.active:
                # the unit ended meanwhile (another stage failed): ask nothing more, but
                # count what its replies in so far cost on the feature's row
                if wait.usage and self.engine.store.status_of(*unit.key) is not None:
                    self.engine.apply(StageOutcome(
                        feature_id=unit.feature_id, judge=unit.judge,
                        prompt_hash=unit.prompt_hash, stage=stage, ok=False,
                        reason=f"abandoned: {stage}: its feature ended first",
                        usage=wait.usage, cost_usd=wait.cost_usd,
                    ))  # fmt: skip
                return
            # the stage runs again once this request's batch ended; requests it made at
            # once with it (a resample stage's) go out in the same round
            self.waiting.setdefault(wait.custom_id, []).append((unit, stage))
            for each in [wait, *wait.others]:
                assert isinstance(each, Awaiting)
                if not self.records.has(each.custom_id):
                    self.queued[unit.judge][each.custom_id] = each.waiting
            return
        if not outcome.ok:  # asked afresh by a later labeling, once this round is done
            self.spent |= self.replies.consulted
        applied = self.engine.apply(outcome, unit=unit)
        if applied.finished is not None and self.on_result is not None:
            self.on_result(unit.judge, applied.finished)
        elif applied.unit is not None:
            await self._advance(applied.unit)

    # -- submitting --------------------------------------------------------------------

    async def _submit_queued(self) -> None:
        for name, queued in self.queued.items():
            while queued and not self._stopping():
                try:  # a submission is a send like any call: fenced by the run's lock
                    await self.guard.clear()
                except Halted as exc:
                    self.engine.stop(exc.reason)
                    return
                api = self.apis[name]
                chunk = _chunk(api, list(queued.values()))
                for w in chunk:
                    del queued[w.custom_id]
                await self._submit(name, api, chunk)

    async def _submit(self, judge: str, api: BatchApi, chunk: list[Waiting]) -> None:
        local_id = uuid.uuid4().hex
        endpoint = chunk[0].request.endpoint
        self.records.begin(local_id, judge, api.provider, endpoint, chunk)
        try:
            batch_id = await api.submit(
                local_id, endpoint, [(w.custom_id, w.request.body) for w in chunk],
                lambda file_id: self.records.file_uploaded(local_id, file_id),
            )  # fmt: skip
        except BackendError as exc:
            if exc.kind in FATAL_KINDS:
                self.records.never_made(local_id)  # refused: nothing was made
                self._judge_cannot(judge, f"submitting a batch: {exc.reason}")
                return
            if exc.kind == "rejected":  # the batch refused (a 400): its requests fail with it
                refused = LineResult("*", "error", status=400, message=f"batch refused: "
                                     f"{exc.reason}")  # fmt: skip
                answered = self.records.ended(local_id, "refused", [refused])
                await self._rerun([w for c in answered for w in self.waiting.pop(c, [])])
                return
            # cut off (a timeout, a broken connection, a 5xx): the batch may exist; it is
            # looked for before its requests go out again
            log.warning("%s: submitting a batch of %d: %s; looking for it before sending "
                        "again", judge, len(chunk), exc.reason)  # fmt: skip
            return
        self.records.submitted(local_id, batch_id)
        self.submitted += 1
        log.info("%s: batch %s of %d requests submitted", judge, batch_id, len(chunk))

    def _judge_cannot(self, judge: str, why: str) -> None:
        self.engine.fatal = self.engine.fatal or f"{judge}: {why}"
        self.engine.stop(self.engine.fatal)

    async def _resolve_cut_off(self) -> None:
        """Submissions recorded but never given a batch id (their labeler stopped, or the
        call was cut off, in between): adopt the batch the provider made, or send the
        requests again if it made none."""
        known = self.records.known_batch_ids()
        for sub in self._open():
            if sub.state != "submitting" or time.time() - sub.made_at < self._grace():
                continue  # the provider may still be making it
            api = self.apis[sub.judge]
            ids = set(self.records.custom_ids(sub.local_id))
            try:
                found = await api.find(sub.local_id, sub.made_at, ids, known)
            except BackendError as exc:
                if exc.kind in FATAL_KINDS:
                    self._judge_cannot(sub.judge, f"looking for a batch: {exc.reason}")
                    return
                log.warning("%s: looking for a cut-off batch: %s", sub.judge, exc.reason)
                continue
            if found == "wait":
                continue
            if found is None:
                # asked again, the waiting stages queue their requests anew
                forgotten = self.records.never_made(sub.local_id)
                await self._rerun([w for c in forgotten for w in self.waiting.pop(c, [])])
                log.info("%s: a cut-off submission of %d never reached the provider; "
                         "sending it again", sub.judge, sub.n_requests)  # fmt: skip
            else:
                self.records.submitted(sub.local_id, found)
                known.add(found)
                log.info("%s: found the cut-off submission as batch %s", sub.judge, found)

    # -- polling -----------------------------------------------------------------------

    async def _poll(self, open_: list[Submission]) -> bool:
        """Look at every batch in flight; True if one ended (its stages ran again)."""
        if any(s.state == "submitting" for s in open_):
            await self._resolve_cut_off()
        ended_any = False
        for sub in self._open():
            if sub.state != "submitted" or sub.batch_id is None or self._stopping():
                continue
            api = self.apis.get(sub.judge)
            if api is None:
                continue
            try:
                state = await api.state(sub.batch_id)
                if not state.ended:
                    self.records.seen(sub.local_id, state.status, state.counts)
                    continue
                results = await api.results(sub.batch_id)
            except BackendError as exc:
                if exc.kind in FATAL_KINDS:
                    self._judge_cannot(sub.judge, f"batch {sub.batch_id}: {exc.reason}")
                    return False
                log.warning("%s: batch %s: %s; looking again later", sub.judge, sub.batch_id,
                            exc.reason)  # fmt: skip
                continue
            answered = self.records.ended(sub.local_id, state.status, results)
            log.info("%s: batch %s %s: %d results", sub.judge, sub.batch_id, state.status,
                     len(results))  # fmt: skip
            ended_any = True
            # the results are stored: a labeler stopped while applying them applies the
            # rest next time
            await self._rerun([w for cid in answered for w in self.waiting.pop(cid, [])])
        return ended_any


def _chunk(api: BatchApi, queued: list[Waiting]) -> list[Waiting]:
    """The first requests that fit one submission: the provider's count and size limits,
    and one endpoint."""
    endpoint = queued[0].request.endpoint
    out: list[Waiting] = []
    size = 0
    for w in queued:
        if w.request.endpoint != endpoint:
            continue
        line = api.line_size(w.custom_id, endpoint, w.request.body)
        if out and (len(out) >= api.max_requests or size + line > api.max_bytes):
            break
        out.append(w)
        size += line
    return out
