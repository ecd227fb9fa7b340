"""The Celery transport's driver: sends the stages the engine asks for to the fleet and
gives their outcomes back to the engine.

The engine (``labeler.labeling.engine``) plans, keeps stage results, applies outcomes,
counts the budget and holds the run's lock; this driver only moves stages. It keeps at
most ``max_inflight`` (feature, judge) pairs in flight, so that a run of hundreds of
thousands of features never floods Redis. Outcomes arrive on the labeling's Redis
stream; the driver applies a batch of them and records how far it has read in one
SQLite transaction, so a driver killed at any point resumes exactly where its store says
and applies no outcome twice. A stage already sent (its id is in the labeling's
``queued`` hash) is not sent again by a restarted driver; a duplicate that slips through
anyway does nothing on the worker.

A stage sent but found nowhere (not queued, not claimed by a live worker, not waiting
out a rate limit, not done) is sent again: the broker lost it (the Redis transport keeps
a message only in a worker's memory between taking it off its queue and recording it as
unacknowledged), or its worker died. A worker's claim on a stage is a lease its worker
renews every few seconds (``workers.leases``), so a stage of a worker that died is found
within ``LOOK_EVERY_S`` plus the lease, and runs elsewhere; the visibility timeout stays
the last resort. The driver looks every ``LOOK_EVERY_S`` while stages are in flight.

A driver that stops (a judge that cannot work, an interrupt) sets the labeling's stop in
Redis, which every worker reads before each provider call, and takes its messages still
queued off the queues, so that nothing queued is paid for after the stop; what it took
back, or what workers gave back, is sent again by the next run. A stop set by a worker
(its call met a rejected key) stops the driver too. The next driver clears the stop.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import redis
from celery import Celery
from pydantic import ValidationError

from labeler.errors import UserError
from labeler.judges.base import JudgeOptions, make_judge
from labeler.judges.ratelimit import RateLimits
from labeler.judges.stages import StageName, StageOutcome, is_staged, queue_for, stages_for
from labeler.labeling.engine import Engine, LabelReport, Unit
from labeler.labeling.interrupts import Interrupts
from labeler.labeling.lock import RunLock
from labeler.labeling.store import LabelStore
from labeler.run.data import RunData
from prompts import prompt_hash as llm_prompt_hash
from workers import keys
from workers.broker import revoke_queued, tasks_in_broker
from workers.payloads import StageTask, trimmed
from workers.redis_retry import retrying
from workers.settings import FleetSettings, redacted

log = logging.getLogger(__name__)
T = TypeVar("T")

READ_BATCH = 500
READ_BLOCK_MS = 500
STALL_WARNING_S = 300.0
LOOK_EVERY_S = 10.0
CONNECT_WAIT_S = 10.0
KEYS_TTL_S = 7 * 24 * 3600


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
        interrupts: Interrupts | None = None,
        lock: RunLock | None = None,
    ) -> None:
        self.run = run
        self.store = store
        self.job = job
        self.app = app
        self.settings = settings
        self.on_start = on_start
        self.on_result = on_result
        self.interrupts = interrupts
        self.lock = lock
        self.redis = redis.Redis.from_url(settings.redis_url, socket_timeout=10)
        self._missing: set[str] = set()
        self._again: dict[tuple[str, str, StageName], int] = {}
        self.key = store.store_id()
        hashes = {judge: _prompt_hash(judge) for judge in job.judges}
        self.engine = Engine(run, store, hashes, job.sample_per_layer, job.seed, job.budget_usd,
                             executor="celery", scorers=job.options.carried)  # fmt: skip

    @property
    def active(self) -> dict[tuple[str, str], Unit]:
        return self.engine.active

    # -- the loop ----------------------------------------------------------------------

    def label(self) -> dict[str, LabelReport]:
        self._connect()
        # this labeling starts again: what an earlier driver stopped may be sent anew
        self._redis("clearing the labeling's stop", lambda: self.redis.delete(self._stop_key))
        todo = self.engine.plan()
        if self.on_start is not None:
            self.on_start(len(todo))
        self._redis("keeping the labeling's keys", lambda: self._keep_keys(None))
        if self.job.requeue:
            self._redis("forgetting what was queued", lambda: self.redis.delete(self._queued))
        self._loop(self.engine.units(todo))
        if self.engine.stopped is None:
            # done marks outlive any copy of a task still queued, then go
            self._redis("letting the labeling's keys expire", lambda: self._keep_keys(KEYS_TTL_S))
        self.engine.abandon_active()
        return self.engine.reports()

    def _stopping(self) -> bool:
        if self.interrupts is not None and self.interrupts.requested.is_set():
            self.engine.stop("interrupted")
        if self.lock is not None:
            self.lock.check()
        if self.engine.stopped is None:
            reason: Any = self._redis("reading the labeling's stop",
                                      lambda: self.redis.get(self._stop_key))  # fmt: skip
            if reason is not None:  # a worker's call met a judge that cannot work
                self.engine.stop(reason.decode())
        return self.engine.stopped is not None

    def _halt_fleet(self) -> None:
        """Stop the workers spending on this labeling: set its stop (a worker's reason, set
        first, is kept), then take its messages still queued off the queues. A message a
        worker takes meanwhile meets the stop and is given back."""
        why = self.engine.stopped or "stopped"
        self._redis("stopping the workers", lambda: self.redis.set(
            self._stop_key, why, nx=True, ex=keys.STOP_TTL_S))  # fmt: skip
        queues = self._queues()
        taken = self._redis("taking back queued stages",
                            lambda: revoke_queued(self.redis, queues, self._queued))  # fmt: skip
        forgot = self._redis("forgetting stages nobody runs", self._forget_unstarted)
        log.info("stopped (%s): took back %d queued stages, %d more were given back; the next "
                 "run sends them", why, taken, forgot)  # fmt: skip

    def _forget_unstarted(self) -> int:
        """Forget the sends of the stages no worker holds or waits to run and none finished,
        so that the next run sends them instead of waiting for them: a worker may give a
        stage back (the stop set by another worker) before this driver recorded sending it.
        One that a worker takes meanwhile meets the stop: it will not run either."""
        ids = [raw.decode() for raw in self.redis.hkeys(self._queued)]  # type: ignore[union-attr]
        if not ids:
            return 0
        with self.redis.pipeline(transaction=False) as pipe:
            for task_id in ids:
                pipe.exists(keys.claim(task_id), keys.waiting(task_id))
            held = pipe.execute()
        done = self.redis.hmget(keys.done(self.key), ids)
        idle = [i for i, h, d in zip(ids, held, done, strict=True) if not h and not d]
        if idle:
            self.redis.hdel(self._queued, *idle)
        return len(idle)

    def _loop(self, waiting: Iterator[Unit]) -> None:
        offset = self.store.get_meta(self._offset_meta) or "0-0"
        self._redis("clearing applied outcomes", lambda: self._drop_applied(offset))
        # outcomes that arrived while no driver ran go into the store before any unit
        # starts, so a unit starts with every stage already paid for
        while batch := self._read(offset, block=False):
            offset = self._apply(batch)
        exhausted = False
        last_progress = last_warning = last_look = time.monotonic()
        while True:
            if self._stopping():
                self._halt_fleet()
                # calls already made finish on the workers; their outcomes wait on the
                # stream for the next run, which applies them before anything else
                while batch := self._read(offset, block=False):
                    offset = self._apply(batch)
                return
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
            if now - last_look > LOOK_EVERY_S:
                self._resend_lost()
                last_look = time.monotonic()

    def _read(self, offset: str, block: bool = True) -> list[tuple[bytes, dict[bytes, bytes]]]:
        def read() -> list[tuple[bytes, dict[bytes, bytes]]]:
            found: Any = self.redis.xread(
                {self._results: offset}, count=READ_BATCH, block=READ_BLOCK_MS if block else None
            )
            return list(found[0][1]) if found else []

        return retrying(read, "reading outcomes")

    def _fill(self, waiting: Iterator[Unit]) -> bool:
        """Start units until ``max_inflight`` are in flight; True once none is left."""
        while len(self.active) < self.job.max_inflight:
            unit = next(waiting, None)
            if unit is None:
                return True
            self._send_ready(unit)
        return False

    # -- units -------------------------------------------------------------------------

    def _task_id(self, unit: Unit, stage: StageName) -> str:
        attempt = unit.attempt + self._again.get((unit.feature_id, unit.judge, stage), 0)
        return keys.task_id(self.key, unit.feature_id, unit.judge, unit.prompt_hash, stage,
                            attempt)  # fmt: skip

    def _send_ready(self, unit: Unit) -> None:
        if self.engine.stopped is not None:
            return
        for stage in unit.to_send():
            self._send(unit, stage)
            unit.sent.add(stage)

    def _send(self, unit: Unit, stage: StageName, again: bool = False) -> None:
        task_id = self._task_id(unit, stage)
        while not again:
            queued, done = self._redis(
                "checking the queue",
                lambda task_id=task_id: (  # type: ignore[misc]
                    self.redis.hexists(self._queued, task_id),
                    self.redis.hexists(keys.done(self.key), task_id),
                ),
            )
            if queued:  # sent by an earlier driver: queued, running, or its outcome waits
                return
            if not done:
                break
            if self._outcome_waits(task_id):
                # run for a driver that stopped between sending it and recording the send:
                # its outcome is on the stream, to be applied, not paid for again
                return
            # run and applied by an earlier labeling without completing the stage (a judge
            # that could not work, a failure that came late): this is a new attempt
            step = (unit.feature_id, unit.judge, stage)
            self._again[step] = self._again.get(step, 0) + 1
            task_id = self._task_id(unit, stage)
        payload = StageTask(
            run=self.key, feature_id=unit.feature_id, judge=unit.judge, stage=stage,
            prompt_hash=unit.prompt_hash, options=self.job.options,
            limits=self.job.limits.get(unit.judge),
            record=trimmed(unit.feature(), stage, self.job.options.n_examples),
            negatives=unit.negatives,
            explanation=unit.explanation(),
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

    def _outcome_waits(self, task_id: str) -> bool:
        """Whether an outcome of ``task_id`` is on the stream, not yet applied (the stream
        holds only those, so it is short)."""
        wanted = task_id.encode()
        entries: Any = self._redis("reading outcomes", lambda: self.redis.xrange(self._results))
        return any(fields.get(b"task_id") == wanted for _, fields in entries)

    def _resend_lost(self) -> None:
        """Send again the stages sent but found nowhere in Redis by this look and the one
        before.

        The places are looked at in the order a task passes through them (its queue, a
        live worker's claim, the wait of a rescheduled stage, the done marks), so a task
        moving on meanwhile is still seen. A message held by a worker that died is in
        none of them once the worker's lease on it lapses. Should a copy be sent of a task
        that was in fact on its way, the second copy finds the first's claim or done mark
        and does nothing."""
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
            found = tasks_in_broker(self.redis, self._queues(), unacked=False)
            with self.redis.pipeline(transaction=False) as pipe:
                for task_id in ids:
                    pipe.exists(keys.claim(task_id), keys.waiting(task_id))
                held = pipe.execute()
            done = self.redis.hmget(keys.done(self.key), ids)
            found.update(i for i, h, d in zip(ids, held, done, strict=True) if h or d)
            return found

        found = self._redis("looking for the stages in flight", present)
        missing = {task_id for task_id in ids if task_id not in found}
        # only what two looks in a row missed: a task between two places (taken off its
        # queue, being rescheduled) is seen in one of them by the next look
        lost = [task_id for task_id in ids if task_id in missing & self._missing]
        self._missing = missing - set(lost)
        for task_id in lost:
            unit, stage = sent[task_id]
            log.warning("%s %s %s: sent, but neither queued nor held by a live worker (its "
                        "worker died, or the broker lost it); sending it again",
                        unit.feature_id, unit.judge, stage)  # fmt: skip
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
                    unit = None  # an earlier attempt's: the engine decides what it is worth
                done = self.engine.apply(outcome, task_id, unit)
                if done.unit is None:
                    continue
                if done.finished is None:
                    follow_up.append(done.unit)
                else:
                    results.append((done.unit.judge, done.finished))
            offset = batch[-1][0].decode()
            self.store.set_meta(self._offset_meta, offset)
        ids = [entry_id for entry_id, _ in batch]
        self._redis("clearing applied outcomes", lambda: self._forget(applied, ids))
        for unit in follow_up:
            if unit.key in self.active:
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

    def _keep_keys(self, ttl_s: int | None) -> None:
        """The labeling's keys kept for good (``None``) or for ``ttl_s`` more seconds."""
        with self.redis.pipeline(transaction=False) as pipe:
            for key in keys.run_keys(self.key):
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

    # -- Redis -------------------------------------------------------------------------

    @property
    def _queued(self) -> str:
        return keys.queued(self.key)

    @property
    def _results(self) -> str:
        return keys.results(self.key)

    @property
    def _stop_key(self) -> str:
        return keys.stop(self.key)

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


def _all_stages(judge: str) -> list[StageName]:
    return stages_for(judge, ["top", "random"], ("detection", "fuzz", "intruder"))


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
    interrupts: Interrupts | None = None,
    wait: bool = False,
) -> dict[str, LabelReport]:
    """Label ``job.judges`` on the run with the Celery fleet, holding the run's lock;
    returns a report per judge."""
    settings = settings or FleetSettings.from_env()
    if app is None:
        from workers.app import make_app

        app = make_app(settings)
    cancelled = None if interrupts is None else interrupts.requested.is_set
    with RunLock(store.path, "labeler label --executor celery", wait=wait,
                 cancelled=cancelled) as lock:  # fmt: skip
        driver = Driver(run, store, job, app, settings, on_start, on_result, interrupts, lock)
        return driver.label()


def fleet_counts(store: LabelStore, settings: FleetSettings) -> dict[str, dict[str, int]]:
    """Stage tasks queued and running per judge, from Redis, for ``labeler status``
    (finished tasks whose outcomes the driver has not read yet are neither)."""
    key = store.get_meta("store_id")  # read only: status never changes the identity
    if key is None:
        return {}
    client = redis.Redis.from_url(settings.redis_url, socket_timeout=5)
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
