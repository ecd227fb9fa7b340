"""The transports by name: each takes a :class:`~labeler.labeling.request.LabelingRequest`.

``prepare`` refuses what the transport cannot do and builds what it needs before the
run's lock is taken (judges checked, keys looked up: nothing is sent); ``label`` then
labels under the lock and returns a report per judge.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable
from typing import Protocol

from labeler.errors import UserError
from labeler.judges import Judge, make_judge
from labeler.judges.pricing import PriceTable, load_prices
from labeler.labeling.engine import LabelReport
from labeler.labeling.request import Hooks, LabelingRequest, TransportName
from labeler.labeling.store import LabelStore
from labeler.run.data import RunData

log = logging.getLogger(__name__)


class Prepared(Protocol):
    title: str
    """What the progress bar says."""
    notice: str | None
    """A line for the user before the labeling starts (where the fleet is), or None."""
    prices: PriceTable

    def label(self, run: RunData, store: LabelStore, hooks: Hooks) -> dict[str, LabelReport]: ...

    def after(self) -> str | None:
        """A line for the user once the labeling ended (what it left in flight)."""
        ...


def build_judges(request: LabelingRequest) -> list[Judge]:
    """The request's judges, built (an unknown name fails before any work)."""
    return [make_judge(name, request.options) for name in request.judges]


def _names(judges: list[Judge]) -> str:
    return " + ".join(j.name for j in judges)


def _preflight(judges: list[Judge], request: LabelingRequest, prices: PriceTable) -> None:
    for judge in judges:
        judge.preflight()
        if (
            request.budget_usd is not None
            and judge.calls_per_feature
            and prices.lookup(judge.name) is None
        ):
            raise UserError(
                f"--budget-usd: no price for {judge.name}; add one with --prices FILE "
                '({"prices": {"' + judge.name + '": {"input": ..., "cached_input": ..., '
                '"output": ...}}}, dollars per million tokens)'
            )


class _Local:
    def __init__(self, request: LabelingRequest) -> None:
        from labeler.judges.llm_judge import LLMJudge
        from labeler.judges.ratelimit import LocalRateLimiter

        self.request = request
        self.judges = build_judges(request)
        self.prices = load_prices(request.options.prices)
        for judge in self.judges:
            if judge.name in request.limits and isinstance(judge, LLMJudge):
                judge.limiter = LocalRateLimiter(request.limits[judge.name])
        _preflight(self.judges, request, self.prices)
        self.title = f"labeling ({_names(self.judges)})"
        self.notice: str | None = None

    def label(self, run: RunData, store: LabelStore, hooks: Hooks) -> dict[str, LabelReport]:
        from labeler.labeling.transports.local import label_judges

        r = self.request
        return label_judges(
            run, store, self.judges, sample_per_layer=r.sample_per_layer,
            concurrency=r.concurrency, seed=r.seed, budget_usd=r.budget_usd,
            on_start=hooks.on_start, on_result=hooks.on_result, interrupts=hooks.interrupts,
            wait=r.wait, scorers=r.options.carried,
        )  # fmt: skip

    def after(self) -> str | None:
        return None


class _Batch:
    def __init__(self, request: LabelingRequest) -> None:
        from labeler.labeling.transports.batch import BatchSettings, batch_apis

        self.request = request
        self.judges = build_judges(request)
        self.prices = load_prices(request.options.prices)
        batch_apis(self.judges)  # a judge without a batch API is refused before the lock
        _preflight(self.judges, request, self.prices)
        self.settings = BatchSettings(
            poll_s=request.poll_s or BatchSettings.poll_s,
            max_attempts=request.options.max_attempts,
            max_active=request.max_inflight or BatchSettings.max_active,
        )
        self.title = f"labeling in batches ({_names(self.judges)})"
        self.notice: str | None = None
        self.in_flight = 0

    def label(self, run: RunData, store: LabelStore, hooks: Hooks) -> dict[str, LabelReport]:
        from labeler.labeling.transports.batch import label_in_batches

        r = self.request
        reports, report = label_in_batches(
            run, store, self.judges, self.settings, sample_per_layer=r.sample_per_layer,
            seed=r.seed, budget_usd=r.budget_usd, on_start=hooks.on_start,
            on_result=hooks.on_result, interrupts=hooks.interrupts, wait=r.wait,
            scorers=r.options.carried,
        )  # fmt: skip
        self.in_flight = report.in_flight
        return reports

    def after(self) -> str | None:
        if not self.in_flight:
            return None
        return (
            f"{self.in_flight:,} {'batch' if self.in_flight == 1 else 'batches'} still in "
            "flight at the provider (they run and are paid either way); run the same "
            "command again to collect them"
        )


class _Fleet:
    def __init__(self, request: LabelingRequest) -> None:
        if importlib.util.find_spec("celery") is None:
            raise UserError(
                "--executor celery needs the fleet extra: pip install 'transcoder-labeler[fleet]'"
            )
        from workers.settings import FleetSettings, redacted

        self.request = request
        _check_judge_names(request.judges)
        self.settings = FleetSettings.from_env()
        self.prices = load_prices(request.options.prices)
        self.title = "labeling (fleet)"
        self.notice: str | None = f"fleet: {redacted(self.settings.redis_url)}"

    def label(self, run: RunData, store: LabelStore, hooks: Hooks) -> dict[str, LabelReport]:
        from workers.driver import FleetLabeling, label_with_fleet

        r = self.request
        job = FleetLabeling(
            judges=list(r.judges), options=r.options, limits=dict(r.limits),
            sample_per_layer=r.sample_per_layer, seed=r.seed,
            max_inflight=r.max_inflight or 256, budget_usd=r.budget_usd, requeue=r.requeue,
        )  # fmt: skip
        return label_with_fleet(
            run, store, job, self.settings, on_start=hooks.on_start,
            on_result=hooks.on_result, interrupts=hooks.interrupts, wait=r.wait,
        )  # fmt: skip

    def after(self) -> str | None:
        return None


def _check_judge_names(judges: tuple[str, ...]) -> None:
    """Judge names the fleet's driver can check without building a model or a key."""
    from labeler.judges.stages import is_staged

    for name in judges:
        if is_staged(name):
            if not name.partition(":")[2].strip():
                raise UserError(
                    f"judge {name!r} names no model; write {name.partition(':')[0]}:MODEL"
                )
        else:
            make_judge(name)


TRANSPORTS: dict[TransportName, Callable[[LabelingRequest], Prepared]] = {
    "local": _Local,
    "celery": _Fleet,
    "batch": _Batch,
}


def prepare(name: TransportName, request: LabelingRequest) -> Prepared:
    """The transport ``name`` made ready for ``request`` (refusing what it cannot do)."""
    request.check(name)
    return TRANSPORTS[name](request)
