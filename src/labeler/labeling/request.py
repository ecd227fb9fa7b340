"""One labeling as asked for, whatever carries it out: :class:`LabelingRequest`.

``labeler label`` (or a notebook) makes one request and hands it to a transport picked
by name (``labeling.transports.registry``): the in-process loop, the Celery fleet or the
providers' batch APIs. A new option of a labeling is a field here and its use in the
engine or the judges, not a new argument threaded through three call chains.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from labeler.errors import UserError
from labeler.judges.base import JudgeOptions

if TYPE_CHECKING:
    from labeler.judges.ratelimit import RateLimits
    from labeler.labeling.interrupts import Interrupts

TransportName = Literal["local", "celery", "batch"]


@dataclass(frozen=True)
class LabelingRequest:
    judges: tuple[str, ...]
    """Judge names ('heuristic', 'openai:MODEL', ...); several make an ensemble."""
    options: JudgeOptions = field(default_factory=JudgeOptions)
    """How the judges are built (base URL, timeouts, retries, prices, ...)."""
    sample_per_layer: int | None = None
    """Features per layer, drawn from the run's plan or extending it; None: all alive."""
    seed: int = 0
    budget_usd: float | None = None
    """Start no new feature once this labeling has spent this much."""
    wait: bool = False
    """Wait for another labeler of the run to finish instead of refusing."""
    limits: Mapping[str, RateLimits] = field(default_factory=dict)
    """Requests and tokens per minute, per judge."""
    concurrency: int = 8
    """local: model requests in flight per judge."""
    max_inflight: int | None = None
    """celery: (feature, judge) pairs in flight; batch: features in flight."""
    poll_s: float | None = None
    """batch: seconds between looks at the batches in flight."""
    requeue: bool = False
    """celery: send again the stages recorded as queued."""

    def check(self, transport: TransportName) -> None:
        """Refuse what ``transport`` cannot do with this request, before anything runs:
        one line naming the option (as ``labeler label`` spells it). Every caller, the
        command line or Python, goes through here (``transports.registry.prepare``)."""
        for problem in self._problems(transport):
            raise UserError(problem)

    def _problems(self, transport: TransportName) -> list[str]:
        batch, uses_rates = (
            transport == "batch",
            any(limit.rpm or limit.tpm for limit in self.limits.values()),
        )
        checks = [
            (not self.judges, "--judge: name at least one judge"),
            (self.concurrency < 1, "--concurrency: must be at least 1"),
            (self.budget_usd is not None and self.budget_usd <= 0,
             "--budget-usd: must be positive"),
            (self.sample_per_layer is not None and self.sample_per_layer < 1,
             "--sample-per-layer: must be at least 1"),
            (self.max_inflight is not None and self.max_inflight < 1,
             "--max-inflight: must be at least 1"),
            (self.requeue and transport != "celery",
             "--requeue applies to --executor celery only"),
            (self.max_inflight is not None and transport == "local",
             "--max-inflight applies to --executor celery and batch"),
            (self.poll_s is not None and (not batch or self.poll_s <= 0),
             "--poll-s: a positive number of seconds, with --executor batch"),
            (batch and self.budget_usd is not None,
             "--budget-usd: not with --executor batch (a batch's cost is known only when it "
             "ends); --dry-run gives the batch cost and --sample-per-layer bounds it"),
            (batch and (self.options.service_tier == "flex" or uses_rates),
             "--executor batch: --service-tier flex, --rpm and --tpm are for synchronous "
             "calls (batches have their own limits)"),
        ]  # fmt: skip
        return [message for failed, message in checks if failed]


@dataclass(frozen=True)
class Hooks:
    """What a transport tells its caller as it goes."""

    on_start: Callable[[int], None] | None = None
    """Once planned, under the run's lock: how many (feature, judge) pairs are to do."""
    on_result: Callable[[str, bool], None] | None = None
    """Each (feature, judge) finished: the judge, and whether it was labeled."""
    interrupts: Interrupts | None = None
