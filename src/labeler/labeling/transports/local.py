"""The in-process transport: one asyncio loop runs every stage in this process.

Judges' model calls overlap up to ``concurrency`` requests per judge; each stage's
outcome goes to the engine as it arrives (and so into the store), so an interrupted or
killed labeling keeps every finished stage and a re-run pays only for the rest.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Sequence

from labeler.judges import Judge
from labeler.judges.stages import StageName, StageOutcome, carried_by
from labeler.labeling.accounting import count_unanswered
from labeler.labeling.call_journal import CallJournal
from labeler.labeling.engine import Engine, LabelReport, Unit
from labeler.labeling.guard import LabelingGuard
from labeler.labeling.interrupts import Interrupts
from labeler.labeling.lock import RunLock
from labeler.labeling.stages import ErrorLog, run_stage_safely
from labeler.labeling.store import LabelStore
from labeler.run.data import RunData

OnStart = Callable[[int], None]
OnResult = Callable[[str, bool], None]


def label_run(
    run: RunData,
    store: LabelStore,
    judge: Judge,
    sample_per_layer: int | None = None,
    concurrency: int = 8,
    seed: int = 0,
    budget_usd: float | None = None,
    on_start: OnStart | None = None,
    on_result: Callable[[bool], None] | None = None,
) -> LabelReport:
    """Label every planned feature that ``judge`` has not labeled successfully yet, with
    at most ``concurrency`` model requests in flight; with ``budget_usd``, start no new
    feature once this labeling has spent that much (the rest stays pending)."""
    reports = label_judges(
        run, store, [judge], sample_per_layer, concurrency, seed, budget_usd, on_start,
        None if on_result is None else lambda _judge, ok: on_result(ok),
    )  # fmt: skip
    return reports[judge.name]


def label_judges(
    run: RunData,
    store: LabelStore,
    judges: Sequence[Judge],
    sample_per_layer: int | None = None,
    concurrency: int = 8,
    seed: int = 0,
    budget_usd: float | None = None,
    on_start: OnStart | None = None,
    on_result: OnResult | None = None,
    interrupts: Interrupts | None = None,
    wait: bool = False,
    scorers: tuple[str, ...] | None = None,
) -> dict[str, LabelReport]:
    """Every judge on the planned features, holding the run's lock throughout; a report
    per judge. With ``interrupts``, a signal stops new work and the stages in flight are
    let finish (the reports then say ``stopped='interrupted'``)."""
    cancelled = None if interrupts is None else interrupts.requested.is_set
    with RunLock(store.path, "labeler label (local)", wait=wait, cancelled=cancelled) as lock:
        engine = Engine(run, store, {j.name: j.prompt_hash for j in judges}, sample_per_layer,
                        seed, budget_usd, executor="local",
                        scorers=scorers or carried_by(judges))  # fmt: skip
        labeling = _Local(engine, judges, concurrency, on_start, on_result, interrupts, lock)
        asyncio.run(labeling.run())
        lock.check()  # taken over meanwhile: say so rather than report a partial labeling
        return engine.reports()


class _Local:
    def __init__(
        self, engine: Engine, judges: Sequence[Judge], concurrency: int,
        on_start: OnStart | None, on_result: OnResult | None, interrupts: Interrupts | None,
        lock: RunLock,
    ) -> None:  # fmt: skip
        self.engine = engine
        self.judges = {j.name: j for j in judges}
        self.concurrency = concurrency
        self.on_start = on_start
        self.on_result = on_result
        self.interrupts = interrupts
        self.lock = lock
        self.errors = ErrorLog()
        self.beat = Heartbeat(engine.store)
        self.failure: BaseException | None = None  # the first error of a feature's task

    def _stopping(self) -> bool:
        return self.engine.heed(self.interrupts, self.lock) or self.failure is not None

    def _settled(self, task: asyncio.Task[None], tasks: set[asyncio.Task[None]]) -> None:
        """A feature's task ended; an error of its own (the store unwritable, a bug) is
        kept, to stop the run and be raised once, rather than left unretrieved."""
        tasks.discard(task)
        if not task.cancelled() and task.exception() is not None and self.failure is None:
            self.failure = task.exception()

    async def run(self) -> None:
        todo = self.engine.plan()
        if self.on_start is not None:
            self.on_start(len(todo))
        count_unanswered(self.engine.store, list(self.judges.values()))
        journal = CallJournal(self.engine.store.path.parent)
        try:
            await self._run(todo, journal)
        finally:
            journal.close()

    async def _run(self, todo: list[tuple[str, str]], journal: CallJournal) -> None:
        for judge in self.judges.values():
            if hasattr(judge, "calls"):
                judge.calls = journal
            judge.limit_requests(self.concurrency)
            if hasattr(judge, "replies"):
                judge.replies = self.engine.reply_cache()
            if hasattr(judge, "keep_now"):
                judge.keep_now = self.engine.keep_replies
            if hasattr(judge, "guard"):
                judge.guard = LabelingGuard(self.lock, self.interrupts)
        # as many features as requests per judge: a feature has up to three calls in flight
        # at once, so the request limit stays the binding one
        slots = asyncio.Semaphore(self.concurrency * len(self.judges))
        tasks: set[asyncio.Task[None]] = set()
        units = self.engine.units(todo)
        try:
            while True:
                await slots.acquire()
                unit = None if self._stopping() else next(units, None)
                if unit is None:
                    slots.release()
                    break
                task = asyncio.create_task(self._unit(unit, slots))
                tasks.add(task)
                task.add_done_callback(lambda t: self._settled(t, tasks))
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
            if self.failure is not None:
                raise self.failure
        except BaseException:
            # an error of the labeler's own (the store unwritable, a bug): calls in flight
            # are cancelled before their clients close, so none ends as a false failure
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        finally:
            self.engine.abandon_active()
            self.beat.update({}, force=True)
            for judge in self.judges.values():  # only once no call is in flight
                await judge.aclose()

    async def _unit(self, unit: Unit, slots: asyncio.Semaphore) -> None:
        judge = self.judges[unit.judge]
        pending: set[asyncio.Task[StageOutcome]] = set()

        def launch() -> None:
            if unit.key not in self.engine.active or self._stopping():
                return
            for stage in unit.to_send():
                unit.sent.add(stage)
                pending.add(asyncio.create_task(self._stage(judge, unit, stage)))

        try:
            launch()
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for finished in done:
                    outcome = finished.result()
                    applied = self.engine.apply(outcome, unit=unit)
                    self._calls_accounted(judge, outcome)
                    if applied.finished is not None and self.on_result is not None:
                        self.on_result(unit.judge, applied.finished)
                launch()
        except asyncio.CancelledError:
            for stage in pending:  # asyncio.wait does not cancel what it waits for
                stage.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            raise
        finally:
            slots.release()
            self.beat.update(self._running())

    @staticmethod
    def _calls_accounted(judge: Judge, outcome: StageOutcome) -> None:
        """The outcome is stored, and with it what its calls used: their journal lines
        end (a labeler killed before this leaves them to be counted as unanswered)."""
        calls = getattr(judge, "calls", None)
        if calls is not None:
            for ticket in outcome.tickets:
                calls.end(ticket)

    def _running(self) -> dict[str, int]:
        running = dict.fromkeys(self.judges, 0)
        for _, judge in self.engine.active:
            running[judge] += 1
        return running

    async def _stage(self, judge: Judge, unit: Unit, stage: StageName) -> StageOutcome:
        return await run_stage_safely(judge, stage, unit.feature(), unit.negatives,
                                      unit.explanation(), self.errors)  # fmt: skip


class Heartbeat:
    """How many features the local transport has in flight per judge, written to the store at most
    once a second so that ``labeler status`` can show them."""

    def __init__(self, store: LabelStore) -> None:
        self.store = store
        self.last = 0.0

    def update(self, running: dict[str, int], force: bool = False) -> None:
        now = time.time()
        if force or now - self.last >= 1.0:
            self.last = now
            beat = {"running": running, "at": now}
            self.store.set_meta("local_running", json.dumps(beat))
