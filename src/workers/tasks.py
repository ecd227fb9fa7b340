"""The one task type: run one stage of one (feature, judge) and publish its outcome.

A task whose outcome is already published (a redelivery after its worker died between
publishing and acknowledging) or that another worker is running now (a duplicate
message) does nothing. A provider's 429 reschedules the task after the server's
Retry-After, freeing the worker slot meanwhile.

Nothing of a labeling that stopped is sent to the provider: a task that starts after the
stop, or reaches a provider call after it (``runtime.StopGate``), is given back to its
driver unsent. A stage that fails because its judge cannot work (a rejected key, an
unknown model) stops its labeling itself, as it publishes: the other slots, on every
worker, send nothing after it, without waiting for the driver to read it.
"""

from __future__ import annotations

import json
import logging
import random
import socket
import time
import uuid
from typing import Any

from celery import Task
from celery.exceptions import Retry
from pydantic import ValidationError

from labeler.errors import USER_ERRORS, Reschedule
from labeler.judges.stages import STAGE_GROUPS, StageOutcome, add_usage
from labeler.labeling.engine import FATAL_KINDS
from labeler.labeling.stages import ERRORS, run_stage_safely
from labeler.redaction import redact
from workers import keys
from workers.app import app
from workers.payloads import StageTask
from workers.redis_retry import retrying
from workers.runtime import StageTimeout, WorkerRuntime, runtime
from workers.settings import FleetSettings

log = logging.getLogger("workers.tasks")

RESCHEDULE_BASE_S = 5.0
RESCHEDULE_MAX_S = 300.0


@app.task(name=keys.STAGE_TASK, bind=True, max_retries=None)  # type: ignore[untyped-decorator]
def stage(self: Task, payload: dict[str, Any]) -> str:
    settings: FleetSettings = app.conf.labeler_settings
    task_id = str(self.request.id)
    rt = runtime(settings)
    try:
        task = StageTask.model_validate(payload)
    except ValidationError as exc:
        return _refuse(rt, task_id, payload, exc)
    what = f"{task.feature_id} {task.judge} {task.stage}"
    worker = self.request.hostname or socket.gethostname()
    until = time.time() + settings.claim_ttl
    running = json.dumps({"worker": worker, "feature": task.feature_id, "judge": task.judge,
                          "stage": task.stage, "until": until})  # fmt: skip
    # this execution's own claim, leased: a retry after a lost reply finds it and goes on,
    # and it lapses soon after this worker dies
    claim = f"{worker}/{uuid.uuid4().hex}"
    rt.leases.hold(keys.claim(task_id), claim)
    try:
        begun = retrying(
            lambda: rt.state.begin(task.run, task_id, claim, rt.leases.lease_s, running), what
        )
    except BaseException:
        rt.leases.drop(keys.claim(task_id))
        raise
    if begun != "ok":
        rt.leases.drop(keys.claim(task_id))
    if begun == "done":
        log.info("%s: already done (task %s), nothing to do", what, task_id)
        return "duplicate"
    if begun == "claimed":
        log.info("%s: another worker is running task %s", what, task_id)
        return "claimed"
    if begun == "stopped":
        log.info("%s: its labeling stopped; given back unsent (task %s)", what, task_id)
        return "stopped"
    started = time.monotonic()
    try:
        try:
            outcome = _execute(task, rt, settings)
        except Reschedule as exc:
            if retrying(lambda: rt.state.give_back(task.run, task_id), what):
                log.info("%s: its labeling stopped before its call; given back (%s)", what, exc)
                return "stopped"
            if task.reschedules >= settings.max_reschedules:
                outcome = _failed(task, f"rate_limited: {task.stage}: gave up after "
                                        f"{task.reschedules} reschedules ({exc})")  # fmt: skip
            else:
                raise _reschedule(self, rt, task, task_id, exc, what, settings) from None
        outcome.usage = add_usage(task.carried_usage, outcome.usage)
        _publish(rt, task, task_id, outcome, what)
    finally:
        rt.leases.drop(keys.claim(task_id))
    status = "ok" if outcome.ok else f"failed: {outcome.reason}"
    log.info("%s: %s (%.2f s)", what, status, time.monotonic() - started)
    return "ok" if outcome.ok else "failed"


def _refuse(rt: WorkerRuntime, task_id: str, payload: Any, exc: ValidationError) -> str:
    """A payload this worker cannot read (a driver of another labeler version): published
    as the stage's failure, so the driver stores it instead of waiting for it."""
    problem = "; ".join(
        f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:3]
    )
    fields = payload if isinstance(payload, dict) else {}
    names = ("run", "feature_id", "judge", "stage", "prompt_hash")
    if (
        not all(isinstance(fields.get(n), str) for n in names)
        or fields["stage"] not in STAGE_GROUPS
    ):
        log.error("task %s: unreadable payload, dropped: %s", task_id, problem)
        return "invalid"
    outcome = StageOutcome(
        feature_id=fields["feature_id"], judge=fields["judge"],
        prompt_hash=fields["prompt_hash"], stage=fields["stage"], ok=False, cost_usd=0.0,
        reason=f"version_mismatch: {fields['stage']}: this worker cannot read the task "
               f"({problem}); run the same labeler version everywhere",
    )  # fmt: skip
    what = f"{outcome.feature_id} {outcome.judge} {outcome.stage}"
    log.error("%s: unreadable payload (%s)", what, problem)
    body = redact(outcome.model_dump_json())
    retrying(lambda: rt.state.publish(fields["run"], task_id, body), what)
    return "invalid"


def _execute(task: StageTask, rt: WorkerRuntime, settings: FleetSettings) -> StageOutcome:
    try:
        judge = rt.judge(task.judge, task.options, task.limits)
    except USER_ERRORS as exc:
        return _failed(task, f"config: {task.stage}: on {socket.gethostname()}: {exc}")
    except Exception as exc:  # the judge cannot be built here: the labeling stops
        ERRORS.once(f"building {task.judge}", exc)
        return _failed(task, f"unusable: {task.stage}: on {socket.gethostname()}: "
                             f"{type(exc).__name__}: {exc}")  # fmt: skip
    if judge.prompt_hash != task.prompt_hash:
        return _failed(task, f"version_mismatch: {task.stage}: this worker's prompts hash to "
                             f"{judge.prompt_hash}, the driver's to {task.prompt_hash}; run "
                             "the same labeler version everywhere")  # fmt: skip
    coro = run_stage_safely(judge, task.stage, task.record, task.negatives, task.explanation)
    try:
        return rt.run(coro, settings.task_time_limit_s, run=task.run)
    except StageTimeout as exc:
        return _failed(task, f"timeout: {task.stage}: {exc}")
    except Reschedule:
        raise
    except Exception as exc:  # recorded with its reason, never dropped
        ERRORS.once(f"{task.feature_id} {task.judge} {task.stage}", exc)
        return _failed(task, f"error: {task.stage}: {type(exc).__name__}: {exc}")


def _failed(task: StageTask, reason: str) -> StageOutcome:
    return StageOutcome(feature_id=task.feature_id, judge=task.judge,
                        prompt_hash=task.prompt_hash, stage=task.stage, ok=False, reason=reason,
                        cost_usd=0.0)  # fmt: skip


def _publish(
    rt: WorkerRuntime, task: StageTask, task_id: str, outcome: StageOutcome, what: str
) -> None:
    """Outcome, done mark and release at once (and the labeling's stop, for a judge that
    cannot work); a retry after a lost reply finds the done mark and writes nothing twice."""
    body = redact(outcome.model_dump_json())
    stop = _stop_reason(outcome)
    if stop is not None:
        log.warning("%s: %s; stopping the labeling", what, stop)
    retrying(lambda: rt.state.publish(task.run, task_id, body, stop), what)


def _stop_reason(outcome: StageOutcome) -> str | None:
    """The labeling's stop reason, worded as its driver words it, for a failure that says
    the judge cannot work at all; None for any other outcome."""
    reason = outcome.reason or ""
    if outcome.ok or reason.split(":", 1)[0] not in FATAL_KINDS:
        return None
    return redact(f"{outcome.judge}: {reason}")


def _release(rt: WorkerRuntime, task: StageTask, task_id: str, what: str) -> None:
    retrying(lambda: rt.state.release(task.run, task_id), what)


def _reschedule(
    self: Task, rt: WorkerRuntime, task: StageTask, task_id: str, exc: Reschedule, what: str,
    settings: FleetSettings,
) -> Retry:  # fmt: skip
    if exc.retry_after is not None:
        delay = exc.retry_after + random.uniform(0, 0.1 * max(exc.retry_after, 1.0))
    else:
        delay = random.uniform(0, min(RESCHEDULE_MAX_S, RESCHEDULE_BASE_S * 2**task.reschedules))
    # a worker holds a task it waits for among its unacknowledged messages; past the
    # visibility timeout the sweep would hand it to a second worker as well
    delay = min(delay, settings.visibility_timeout / 2)
    again = task.model_copy(update={
        "carried_usage": add_usage(task.carried_usage, exc.usage),
        "reschedules": task.reschedules + 1,
    })  # fmt: skip
    log.info("%s: rate limited (%s); rescheduled in %.1f s", what, exc, delay)
    # the stage is held by nobody while it waits: this mark tells the driver it is not
    # lost, for as long as the wait and a lease more
    wait_s = int(delay) + rt.leases.lease_s + 1
    retrying(lambda: rt.redis.set(keys.waiting(task_id), "1", ex=wait_s), what)
    _release(rt, task, task_id, what)
    retry: Retry = self.retry(
        kwargs={"payload": again.model_dump(mode="json")}, countdown=delay, max_retries=None
    )
    return retry
