"""The Celery executor's driver: sends the missing stages to the fleet and brings their
outcomes back into the run's label store.

It keeps at most ``max_inflight`` (feature, judge) pairs in flight, so that a run of
hundreds of thousands of features never floods Redis. Outcomes arrive on the
labeling's Redis stream; the driver applies a batch of them and records how far it has
read in one SQLite transaction, so a driver killed at any point resumes exactly where
its store says and applies no outcome twice. A stage already sent (its id is in the
labeling's ``queued`` hash) is not sent again by a restarted driver; a duplicate that
slips through anyway does nothing on the worker.

A stage sent but found nowhere (not queued, not held by a worker, not running, not
done) was lost by the broker: the Redis transport keeps a message only in a worker's
memory between taking it off its queue and recording it as unacknowledged, and a
connection that breaks then loses it. The driver looks for such stages whenever no
outcome has arrived for a while, and sends them again.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import redis
from celery import Celery
from pydantic import ValidationError

from adapters.errors import UserError
from labeler.judges.base import JudgeOptions, make_judge
from labeler.labeling import LabelReport, negatives_for, plan_features
from labeler.ratelimit import RateLimits
from labeler.run_data import RunData
from labeler.schemas import FeatureRecord, Snippet
from labeler.staging import (
    StageName,
    StageOutcome,
    add_costs,
    add_usage,
    assemble,
    is_staged,
    queue_for,
    ready,
    stages_for,
)
from labeler.store import LabelStore
from prompts import prompt_hash as llm_prompt_hash
from workers import keys
from workers.broker import tasks_in_broker
from workers.payloads import StageTask, trimmed
from workers.redis_retry import retrying
from workers.settings import FleetSettings, redacted

log = logging.getLogger(__name__)
T = TypeVar("T")

RECORD_CHUNK = 128
READ_BATCH = 500
READ_BLOCK_MS = 500
LOCK_TTL_MS = 10_000
STALL_WARNING_S = 300.0
RECONCILE_IDLE_S = 15.0
RECONCILE_EVERY_S = 300.0
CONNECT_WAIT_S = 10.0
KEYS_TTL_S = 7 * 24 * 3600


# the lock stays this driver's (taken again if it lapsed), or the holder is answered
_KEEP_LOCK = """
local held = redis.call('GET', KEYS[1])
if held and held ~= ARGV[1] then return held end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""


@dataclass
class Unit:
    """One (feature, judge) in flight."""

    feature_id: str
    judge: str
    prompt_hash: str
    attempt: int
    record: FeatureRecord
    negatives: dict[str, list[Snippet]]
    stages: list[StageName]
    outcomes: dict[StageName, StageOutcome] = field(default_factory=dict)
    sent: set[StageName] = field(default_factory=set)

    def complete(self) -> bool:
        return all(s in self.outcomes for s in self.stages)


@dataclass
class Tally:
    planned: int = 0
    skipped: int = 0
    labeled: int = 0
    failed: int = 0
    started: int = 0


@dataclass
class FleetLabeling:
    """What to label and how; everything the driver needs besides the run and store."""

    judges: list[str]
    options: JudgeOptions = field(default_factory=JudgeOptions)
    limits: dict[str, RateLimits] = field(default_factory=dict)
    sample_per_layer: int | None = None
    seed: int = 0
    max_inflight: int = 256
    budget_usd: float | None = None
    requeue: bool = False


class Driver:
    def __init__(
        self,
        run: RunData,
        store: LabelStore,
        job: FleetLabeling,
        app: Celery,
        settings: FleetSettings,
        on_start: Callable[[int], None] | None = None,
        on_result: Callable[[str, bool], None] | None = None,
    ) -> None:
        self.run = run
        self.store = store
        self.job = job
        self.app = app
        self.settings = settings
        self.on_start = on_start
        self.on_result = on_result
        self.redis = redis.Redis.from_url(settings.redis_url, socket_timeout=10)
        self._keep_lock = self.redis.register_script(_KEEP_LOCK)
        self._missing: set[str] = set()
        self.key = store.store_id()
        self.me = f"{socket.gethostname()}:{os.getpid()}"
        self.hashes = {judge: _prompt_hash(judge) for judge in job.judges}
        self.active: dict[tuple[str, str], Unit] = {}
        self.finished: set[tuple[str, str]] = set()
        self.tally = {judge: Tally() for judge in job.judges}
        self.spent: float | None = 0.0
        self.budget_reached = False

    # -- the loop ----------------------------------------------------------------------

    def label(self) -> dict[str, LabelReport]:
        self._connect()
        self.store.add_planned(plan_features(self.run, self.job.sample_per_layer, self.job.seed))
        planned = [fid for fid, _, _ in self.store.planned()]
        done = {judge: self.store.done(judge) for judge in self.job.judges}
        todo = [(fid, j) for fid in planned for j in self.job.judges if fid not in done[j]]
        for judge, tally in self.tally.items():
            tally.planned, tally.skipped = len(planned), len(done[judge])
        self.store.set_meta("executor", "celery")
        if self.on_start is not None:
            self.on_start(len(todo))
        _ = self.run.negative_pool
        self._take_lock()
        try:
            self._redis("keeping the labeling's keys", lambda: self._keep_keys(None))
            if self.job.requeue:
                self._redis("forgetting what was queued", lambda: self.redis.delete(self._queued))
            self._loop(iter(self._units(todo)))
            # done marks outlive any copy of a task still queued, then go
            self._redis("letting the labeling's keys expire", lambda: self._keep_keys(KEYS_TTL_S))
        finally:
            self._release_lock()
        return {judge: self._report(t) for judge, t in self.tally.items()}

    def _report(self, t: Tally) -> LabelReport:
        return LabelReport(
            planned=t.planned, skipped=t.skipped, labeled=t.labeled, failed=t.failed,
            pending=t.planned - t.skipped - t.started, spent_usd=self.spent,
            budget_reached=self.budget_reached,
        )  # fmt: skip

    def _loop(self, waiting: Iterator[tuple[str, str, FeatureRecord]]) -> None:
        offset = self.store.get_meta(self._offset_meta) or "0-0"
        self._redis("clearing applied outcomes", lambda: self._drop_applied(offset))
        # outcomes that arrived while no driver ran go into the store before any unit
        # starts, so a unit starts with every stage already paid for
        while batch := self._read(offset, block=False):
            offset = self._apply(batch)
        exhausted = False
        last_progress = last_warning = last_look = time.monotonic()
        while True:
            exhausted = exhausted or self._fill(waiting)
            if exhausted and not self.active:
                break
            batch = self._read(offset)
            now = time.monotonic()
            if batch:
                offset = self._apply(batch)
                last_progress = last_warning = now
            elif now - last_warning > STALL_WARNING_S:
                log.warning(
                    "no outcome for %.0f s with %d features in flight: are workers serving "
                    "the queues %s?", now - last_progress, len(self.active),
                    ", ".join(sorted(self._queues())),
                )  # fmt: skip
                last_warning = now
            idle = now - max(last_progress, last_look) > RECONCILE_IDLE_S
            if idle or now - last_look > RECONCILE_EVERY_S:
                self._resend_lost()
                last_look = time.monotonic()
            self._refresh_lock()

    def _read(self, offset: str, block: bool = True) -> list[tuple[bytes, dict[bytes, bytes]]]:
        def read() -> list[tuple[bytes, dict[bytes, bytes]]]:
            found: Any = self.redis.xread(
                {self._results: offset}, count=READ_BATCH, block=READ_BLOCK_MS if block else None
            )
            return list(found[0][1]) if found else []

        return retrying(read, "reading outcomes")

    def _units(self, todo: list[tuple[str, str]]) -> Iterator[tuple[str, str, FeatureRecord]]:
        for start in range(0, len(todo), RECORD_CHUNK * len(self.job.judges)):
            chunk = todo[start : start + RECORD_CHUNK * len(self.job.judges)]
            fids = list(dict.fromkeys(f for f, _ in chunk))
            records = {r.feature_id: r for r in self.run.records(fids)}
            for fid, judge in chunk:
                yield fid, judge, records[fid]

    def _fill(self, waiting: Iterator[tuple[str, str, FeatureRecord]]) -> bool:
        """Start units until ``max_inflight`` are in flight; True once none is left."""
        while len(self.active) < self.job.max_inflight:
            if self._over_budget():
                self.budget_reached = True
                return True
            item = next(waiting, None)
            if item is None:
                return True
            self._start(*item)
        return False

    def _over_budget(self) -> bool:
        budget = self.job.budget_usd
        return budget is not None and self.spent is not None and self.spent >= budget

    # -- units -------------------------------------------------------------------------

    def _start(self, feature_id: str, judge: str, record: FeatureRecord) -> None:
        if (feature_id, judge) in self.finished:
            return
        self.tally[judge].started += 1
        hashed = self.hashes[judge]
        sets = [kind for kind in ("top", "random") if record.of_kind(kind)]
        unit = Unit(
            feature_id=feature_id, judge=judge, prompt_hash=hashed,
            attempt=self.store.failed_attempts(feature_id, judge), record=record,
            negatives=negatives_for(self.run, record, self.job.seed),
            stages=stages_for(judge, sets),
        )  # fmt: skip
        for outcome in self.store.stage_outcomes(feature_id, judge, hashed):
            unit.outcomes[outcome.stage] = outcome
        self.active[(feature_id, judge)] = unit
        if unit.complete():
            with self.store.transaction():
                self._finish_ok(unit)
            return
        self._send_ready(unit)

    def _task_id(self, unit: Unit, stage: StageName) -> str:
        return keys.task_id(
            self.key, unit.feature_id, unit.judge, unit.prompt_hash, stage, unit.attempt
        )

    def _send_ready(self, unit: Unit) -> None:
        for stage in ready(unit.stages, set(unit.outcomes)):
            if stage not in unit.sent:
                self._send(unit, stage)
                unit.sent.add(stage)

    def _send(self, unit: Unit, stage: StageName, again: bool = False) -> None:
        task_id = self._task_id(unit, stage)
        already = not again and self._redis(
            "checking the queue",
            lambda: (
                self.redis.hexists(self._queued, task_id)
                or self.redis.hexists(keys.done(self.key), task_id)
            ),
        )
        if already:  # sent by an earlier driver: queued, running, or its outcome is waiting
            return
        explain = unit.outcomes.get("explain")
        payload = StageTask(
            run=self.key, feature_id=unit.feature_id, judge=unit.judge, stage=stage,
            prompt_hash=unit.prompt_hash, options=self.job.options,
            limits=self.job.limits.get(unit.judge),
            record=trimmed(unit.record, stage, self.job.options.n_examples),
            negatives=unit.negatives,
            explanation=explain.explanation if explain is not None else None,
        )  # fmt: skip
        queue = queue_for(unit.judge, stage)
        body = {"payload": payload.model_dump(mode="json")}
        self._redis(
            f"sending {unit.feature_id} {unit.judge} {stage}",
            lambda: self.app.send_task(keys.STAGE_TASK, kwargs=body, task_id=task_id, queue=queue),
        )
        self._redis(
            "recording the send", lambda: self.redis.hset(self._queued, task_id, unit.judge)
        )

    def _resend_lost(self) -> None:
        """Send again the stages sent but found nowhere in Redis by this look and the one
        before.

        The places are looked at in the order a task passes through them (its queue,
        a worker's unacknowledged messages, a worker's claim, the done marks), so a task
        moving on meanwhile is still seen. Should a copy be sent of a task that was in
        fact on its way, the second copy finds the first's claim or done mark and does
        nothing."""
        sent = {
            self._task_id(unit, stage): (unit, stage)
            for unit in self.active.values()
            for stage in unit.sent
            if stage not in unit.outcomes
        }
        if not sent:
            return
        ids = list(sent)

        def present() -> set[str]:
            found = tasks_in_broker(self.redis, self._queues())
            with self.redis.pipeline(transaction=False) as pipe:
                for task_id in ids:
                    pipe.exists(keys.claim(task_id))
                claimed = pipe.execute()
            done = self.redis.hmget(keys.done(self.key), ids)
            found.update(i for i, c, d in zip(ids, claimed, done, strict=True) if c or d)
            return found

        found = self._redis("looking for the stages in flight", present)
        missing = {task_id for task_id in ids if task_id not in found}
        # only what two looks in a row missed: a task between two places (taken off its
        # queue, being rescheduled) is seen in one of them by the next look
        lost = [task_id for task_id in ids if task_id in missing & self._missing]
        self._missing = missing - set(lost)
        for task_id in lost:
            unit, stage = sent[task_id]
            log.warning("%s %s %s: sent but no longer in Redis (lost by the broker); "
                        "sending it again", unit.feature_id, unit.judge, stage)  # fmt: skip
            self._send(unit, stage, again=True)

    # -- outcomes ----------------------------------------------------------------------

    def _apply(self, batch: list[tuple[bytes, dict[bytes, bytes]]]) -> str:
        """Apply a batch of outcomes and record the stream offset, in one transaction."""
        applied: list[str] = []
        follow_up: list[Unit] = []
        results: list[tuple[str, bool]] = []
        with self.store.transaction():
            for _, fields in batch:
                task_id = fields[b"task_id"].decode()
                applied.append(task_id)
                outcome = self._read_outcome(task_id, fields[b"outcome"])
                if outcome is None:
                    continue
                unit = self.active.get((outcome.feature_id, outcome.judge))
                if unit is not None and self._task_id(unit, outcome.stage) != task_id:
                    unit = unit if self._adoptable(unit, outcome) else None
                if unit is None:
                    self._apply_late(outcome, task_id)
                    continue
                if not outcome.ok:
                    self._finish_failed(unit, outcome)
                    results.append((unit.judge, False))
                    continue
                self.store.put_stage(outcome, task_id)
                unit.outcomes[outcome.stage] = outcome
                if unit.complete():
                    self._finish_ok(unit)
                    results.append((unit.judge, True))
                else:
                    follow_up.append(unit)
            offset = batch[-1][0].decode()
            self.store.set_meta(self._offset_meta, offset)
        ids = [entry_id for entry_id, _ in batch]
        self._redis("clearing applied outcomes", lambda: self._forget(applied, ids))
        for unit in follow_up:
            if (unit.feature_id, unit.judge) in self.active:
                self._send_ready(unit)
        if self.on_result is not None:
            for judge, ok in results:
                self.on_result(judge, ok)
        return offset

    def _read_outcome(self, task_id: str, raw: bytes) -> StageOutcome | None:
        """The outcome, or for one this driver cannot read (a worker of another labeler
        version) a failure of the stage it belongs to, so that nothing waits for it."""
        try:
            return StageOutcome.model_validate_json(raw)
        except ValidationError as exc:
            problem = "; ".join(e["msg"] for e in exc.errors()[:3])
        for unit in self.active.values():
            for stage in unit.stages:
                if self._task_id(unit, stage) == task_id:
                    reason = (
                        f"version_mismatch: {stage}: a worker's outcome is unreadable here "
                        f"({problem}); run the same labeler version everywhere"
                    )
                    return StageOutcome(feature_id=unit.feature_id, judge=unit.judge,
                                        prompt_hash=unit.prompt_hash, stage=stage, ok=False,
                                        reason=reason)  # fmt: skip
        log.error("task %s: unreadable outcome of no feature in flight, skipped: %s", task_id,
                  problem)  # fmt: skip
        return None

    @staticmethod
    def _adoptable(unit: Unit, outcome: StageOutcome) -> bool:
        """An earlier attempt's successful stage that the unit still lacks: it was paid for
        and is as good as the new attempt's."""
        return (
            outcome.ok
            and outcome.prompt_hash == unit.prompt_hash
            and outcome.stage in unit.stages
            and outcome.stage not in unit.outcomes
        )

    def _keep_keys(self, ttl_s: int | None) -> None:
        """The labeling's keys kept for good (``None``) or for ``ttl_s`` more seconds."""
        with self.redis.pipeline(transaction=False) as pipe:
            for key in keys.run_keys(self.key):
                if key == keys.driver(self.key):
                    continue
                if ttl_s is None:
                    pipe.persist(key)
                else:
                    pipe.expire(key, ttl_s)
            pipe.execute()

    def _drop_applied(self, offset: str) -> None:
        """Outcomes the store already holds (a driver stopped between storing them and
        deleting them)."""
        if offset == "0-0":
            return
        entries: Any = self.redis.xrange(self._results, "-", offset)
        if entries:
            self.redis.xdel(self._results, *[entry_id for entry_id, _ in entries])

    def _forget(self, task_ids: list[str], entry_ids: list[bytes]) -> None:
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.hdel(self._queued, *task_ids)
            pipe.xdel(self._results, *entry_ids)
            pipe.execute()

    def _apply_late(self, outcome: StageOutcome, task_id: str) -> None:
        """An outcome of no unit in flight: a stage of a (feature, judge) already finished
        (its cost still counts), or one not started yet by this driver (kept for later)."""
        fid, judge = outcome.feature_id, outcome.judge
        row = self.store.status_of(fid, judge)
        if outcome.ok:
            if self.store.put_stage(outcome, task_id) and row is not None:
                usage, cost = self.store.charge_stages(fid, judge, outcome.prompt_hash)
                self.store.add_cost(fid, judge, usage, cost)
        elif row is not None:
            self.store.add_cost(fid, judge, outcome.usage, outcome.cost_usd)
        else:
            self.store.put_failure(fid, judge, outcome.reason or "unknown", outcome.prompt_hash,
                                   outcome.usage, outcome.cost_usd)  # fmt: skip
            self.finished.add((fid, judge))

    def _finish_ok(self, unit: Unit) -> None:
        judgment = assemble([unit.outcomes[s] for s in unit.stages])
        charge = self.store.charge_stages(unit.feature_id, unit.judge, unit.prompt_hash)
        self.store.put_ok(judgment, charge)
        self._close(unit, charge[1], ok=True)

    def _finish_failed(self, unit: Unit, outcome: StageOutcome) -> None:
        usage, cost = self.store.charge_stages(unit.feature_id, unit.judge, unit.prompt_hash)
        total_cost = add_costs([cost, outcome.cost_usd])
        self.store.put_failure(
            unit.feature_id, unit.judge, outcome.reason or "unknown", unit.prompt_hash,
            add_usage(usage, outcome.usage), total_cost,
        )  # fmt: skip
        self._close(unit, total_cost, ok=False)

    def _close(self, unit: Unit, cost: float | None, ok: bool) -> None:
        key = (unit.feature_id, unit.judge)
        self.active.pop(key, None)
        self.finished.add(key)
        tally = self.tally[unit.judge]
        if ok:
            tally.labeled += 1
        else:
            tally.failed += 1
        self.spent = None if self.spent is None or cost is None else self.spent + cost

    # -- Redis -------------------------------------------------------------------------

    @property
    def _queued(self) -> str:
        return keys.queued(self.key)

    @property
    def _results(self) -> str:
        return keys.results(self.key)

    @property
    def _offset_meta(self) -> str:
        return "fleet_offset"

    def _queues(self) -> set[str]:
        return {queue_for(j, s) for j in self.job.judges for s in _all_stages(j)}

    def _redis(self, what: str, op: Callable[[], T]) -> T:
        return retrying(op, what)

    def _connect(self) -> None:
        try:
            retrying(self.redis.ping, "connecting", retry_for=CONNECT_WAIT_S)
        except redis.RedisError as exc:
            raise UserError(
                f"cannot reach Redis at {redacted(self.settings.redis_url)} (set "
                f"LABELER_REDIS_URL): {exc}"
            ) from None

    def _take_lock(self) -> None:
        deadline = time.monotonic() + LOCK_TTL_MS / 1000 + 2
        lock = keys.driver(self.key)
        while True:
            taken = self._redis(
                "taking the driver lock",
                lambda: self.redis.set(lock, self.me, nx=True, px=LOCK_TTL_MS),
            )
            if taken:
                return
            holder = self._redis("reading the driver lock", lambda: self.redis.get(lock))
            if time.monotonic() > deadline:
                who = holder.decode() if isinstance(holder, bytes) else holder
                raise UserError(
                    f"{self.store.path}: another driver ({who}) is labeling this run; stop it "
                    "first (a killed driver's lock lapses within 10 s)"
                )
            time.sleep(0.5)

    def _refresh_lock(self) -> None:
        lock = keys.driver(self.key)
        held = self._redis(
            "keeping the driver lock",
            lambda: self._keep_lock(keys=[lock], args=[self.me, LOCK_TTL_MS]),
        )
        if held != 1:
            who = held.decode() if isinstance(held, bytes) else held
            raise UserError(
                f"{self.store.path}: another driver ({who}) took over this labeling while this "
                "one was stalled; this one stops (nothing is lost: the other goes on)"
            )

    def _release_lock(self) -> None:
        lock = keys.driver(self.key)
        try:
            if self.redis.get(lock) == self.me.encode():
                self.redis.delete(lock)
        except redis.RedisError:
            pass  # it lapses by itself


def _all_stages(judge: str) -> list[StageName]:
    return stages_for(judge, ["top", "random"])


def _prompt_hash(judge: str) -> str:
    """The prompt hash a worker's judge will report: the LLM prompts' for staged judges;
    other judges are asked (building them is cheap: they run in one 'label' stage)."""
    if is_staged(judge):
        return llm_prompt_hash()
    return make_judge(judge).prompt_hash


def label_with_fleet(
    run: RunData,
    store: LabelStore,
    job: FleetLabeling,
    settings: FleetSettings | None = None,
    app: Celery | None = None,
    on_start: Callable[[int], None] | None = None,
    on_result: Callable[[str, bool], None] | None = None,
) -> dict[str, LabelReport]:
    """Label ``job.judges`` on the run with the Celery fleet; returns a report per judge."""
    settings = settings or FleetSettings.from_env()
    if app is None:
        from workers.app import make_app

        app = make_app(settings)
    driver = Driver(run, store, job, app, settings, on_start, on_result)
    return driver.label()


def fleet_counts(store: LabelStore, settings: FleetSettings) -> dict[str, dict[str, int]]:
    """Stage tasks queued and running per judge, from Redis, for ``labeler status``
    (finished tasks whose outcomes the driver has not read yet are neither)."""
    client = redis.Redis.from_url(settings.redis_url, socket_timeout=5)
    key = store.store_id()
    try:
        queued = client.hgetall(keys.queued(key))
        running = client.hgetall(keys.running(key))
        entries: Any = client.xrange(keys.results(key))
        waiting = {bytes(fields[b"task_id"]) for _, fields in entries}
    finally:
        client.close()
    now = time.time()
    counts: dict[str, dict[str, int]] = {}
    live: set[Any] = set(waiting)
    for task_id, raw in running.items():
        info = json.loads(raw)
        if info.get("until", 0) > now:
            live.add(task_id)
            counts.setdefault(info["judge"], {"queued": 0, "running": 0})["running"] += 1
    for task_id, judge in queued.items():
        if task_id not in live:
            name = judge.decode() if isinstance(judge, bytes) else str(judge)
            counts.setdefault(name, {"queued": 0, "running": 0})["queued"] += 1
    return counts
