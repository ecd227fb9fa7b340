"""Fleet settings, read from the environment of the driver and of every worker.

``LABELER_REDIS_URL``            broker and fleet state (default redis://localhost:6379/0)
``LABELER_TASK_TIME_LIMIT``      seconds one stage may take before it is failed (900)
``LABELER_VISIBILITY_TIMEOUT``   seconds before a task taken by a worker that died is
                                 handed to another (default: twice the time limit, at least
                                 an hour); must exceed the time limit, so that no task
                                 still running is ever handed out twice
``LABELER_MAX_RESCHEDULES``      times a stage may be rescheduled for a 429 (50)
"""

from __future__ import annotations

import os

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from labeler.errors import UserError

DEFAULT_REDIS_URL = "redis://localhost:6379/0"
_ENV = {
    "redis_url": "LABELER_REDIS_URL",
    "task_time_limit_s": "LABELER_TASK_TIME_LIMIT",
    "visibility_timeout_s": "LABELER_VISIBILITY_TIMEOUT",
    "max_reschedules": "LABELER_MAX_RESCHEDULES",
}


class FleetSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    redis_url: str = DEFAULT_REDIS_URL
    task_time_limit_s: float = Field(900.0, gt=0)
    visibility_timeout_s: float | None = Field(None, gt=0)
    max_reschedules: int = Field(50, ge=0)

    @model_validator(mode="after")
    def _visibility_exceeds_time_limit(self) -> FleetSettings:
        if self.visibility_timeout_s is not None and (
            self.visibility_timeout_s <= self.task_time_limit_s
        ):
            raise ValueError(
                f"{_ENV['visibility_timeout_s']} ({self.visibility_timeout_s:g} s) must exceed "
                f"{_ENV['task_time_limit_s']} ({self.task_time_limit_s:g} s), so that no task "
                "still running is handed out twice"
            )
        return self

    @property
    def visibility_timeout(self) -> float:
        return self.visibility_timeout_s or max(2 * self.task_time_limit_s, 3600.0)

    @property
    def restore_sweep_s(self) -> int:
        """Seconds between workers' sweeps for messages of dead workers: a tenth of the
        visibility timeout, between 1 and 10."""
        return int(min(10, max(1, self.visibility_timeout // 10)))

    @property
    def restore_lock_s(self) -> int:
        """Seconds a worker's lock on that sweep lives. Kombu's default is 300: a worker
        killed while holding it would stop every sweep for five minutes. A sweep takes
        milliseconds; two at once could only put a message back twice, which the done
        marks make harmless."""
        return int(min(30, max(2, self.visibility_timeout // 10)))

    @property
    def claim_ttl(self) -> int:
        """Seconds a worker's claim on a task lives: the time limit plus a margin, and
        still shorter than the visibility timeout."""
        margin = min(30.0, (self.visibility_timeout - self.task_time_limit_s) / 2)
        return max(1, int(self.task_time_limit_s + margin))

    @classmethod
    def from_env(cls) -> FleetSettings:
        values = {field: os.environ[var] for field, var in _ENV.items() if os.environ.get(var)}
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            problems = "; ".join(_problem(e["loc"], e["msg"]) for e in exc.errors())
            raise UserError(f"fleet settings from the environment: {problems}") from None


def _problem(loc: tuple[int | str, ...], message: str) -> str:
    message = message.removeprefix("Value error, ")
    return f"{_ENV.get(str(loc[0]), str(loc[0]))}: {message}" if loc else message


def redacted(url: str) -> str:
    """A Redis URL without its password, for logs and messages."""
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"
