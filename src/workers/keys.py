"""Names of the fleet's Redis keys and of its tasks.

Per labeling (``run`` is the label store's id, so two copies of a run never mix):
``results`` a stream of stage outcomes, ``done`` the finished task ids (a redelivered
task finds its id there and does nothing), ``queued`` the ids the driver has sent
(with their judge), ``running`` the ids a worker is running now, ``stop`` set (to the
reason) once the labeling stopped, so that workers send nothing more of it. Per task:
``claim``, the lease of the worker running it, and ``waiting``, set while it waits out a
rate limit. The run's lock is in its label store, not here.
"""

from __future__ import annotations

import uuid

from labeler.judges.stages import StageName

PREFIX = "labeler"
TASK_NAMESPACE = uuid.UUID("6f1c2a6e-9d7b-4c1e-8a53-2b0f4e5d7c91")
STAGE_TASK = "labeler.stage"
STOP_TTL_S = 7 * 24 * 3600  # a stop outlives any message of the labeling still around


def results(run: str) -> str:
    return f"{PREFIX}:run:{run}:results"


def done(run: str) -> str:
    return f"{PREFIX}:run:{run}:done"


def queued(run: str) -> str:
    return f"{PREFIX}:run:{run}:queued"


def running(run: str) -> str:
    return f"{PREFIX}:run:{run}:running"


def stop(run: str) -> str:
    """Set by a driver that stops, or by a worker whose provider refused the judge."""
    return f"{PREFIX}:run:{run}:stop"


def claim(task_id: str) -> str:
    return f"{PREFIX}:claim:{task_id}"


def waiting(task_id: str) -> str:
    """Set while a rescheduled stage waits out a rate limit on some worker."""
    return f"{PREFIX}:wait:{task_id}"


def run_keys(run: str) -> list[str]:
    return [results(run), done(run), queued(run), running(run), stop(run)]


def task_id(
    run: str, feature_id: str, judge: str, prompt_hash: str, stage: StageName, attempt: int
) -> str:
    """The same work always gets the same id; a new attempt after a failure a new one."""
    name = f"{run}/{feature_id}/{judge}/{prompt_hash}/{stage}/{attempt}"
    return str(uuid.uuid5(TASK_NAMESPACE, name))
