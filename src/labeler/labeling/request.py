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


@dataclass(frozen=True)
class Hooks:
    """What a transport tells its caller as it goes."""

    on_start: Callable[[int], None] | None = None
    """Once planned, under the run's lock: how many (feature, judge) pairs are to do."""
    on_result: Callable[[str, bool], None] | None = None
    """Each (feature, judge) finished: the judge, and whether it was labeled."""
    interrupts: Interrupts | None = None
