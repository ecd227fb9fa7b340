"""The labeling engine: what every transport shares.

A transport (in-process, the Celery fleet, provider batches) only decides where a stage
runs. Everything that must hold whatever the transport lives here:

- the plan: the planned features, what each judge still lacks, in a fixed order;
- units: one (feature, judge) in flight with its stages, starting from the stage
  results already stored, so a re-run after any interruption pays only for stages not
  yet stored;
- outcomes applied exactly once: a stage result is stored as it arrives, a judgment when
  its last stage is in, a failure with its reason; a successful judgment is never
  rewritten, and a stage of a (feature, judge) already finished still has its cost
  counted;
- the budget and the accounting of what this labeling spent;
- stopping: an interrupt, or a judge that cannot work at all (a rejected key, an
  unknown model, a model that does not load), stops new work; such an outcome is not
  stored as the feature's failure (the feature is not at fault) and the labeling ends
  with that one reason.

The run's lock (``labeling.lock``) is taken by :func:`locked` around all of it.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from labeler.errors import UserError
from labeler.judges.requests import KeptReply, Layered, ReplyCache, folder_cache_from_env
from labeler.judges.stages import (
    FIELD_OF_STAGE,
    StageName,
    StageOutcome,
    add_costs,
    add_usage,
    assemble,
    extend,
    has_scorers,
    ready,
    stages_for,
)
from labeler.labeling.plan import negatives_for, records_of, select_features, work_order
from labeler.labeling.stages import HALTED
from labeler.labeling.store import LabelStore
from labeler.redaction import redact
from labeler.run.data import RunData
from labeler.run.schemas import FeatureRecord, Judgment, Snippet

if TYPE_CHECKING:
    from labeler.labeling.interrupts import Interrupts
    from labeler.labeling.lock import RunLock

log = logging.getLogger(__name__)

# failure kinds that say the judge cannot work at all, not that a feature failed
FATAL_KINDS = frozenset({"auth", "not_found", "unusable", "config"})
# stage failures of these kinds, before the judge's server answered anything, say that
# it cannot be reached; until it answers they are held back, not stored
UNREACHABLE_KINDS = frozenset({"connection"})
UNREACHABLE_IN_A_ROW = 3
# failures that say nothing of the feature: once the labeling stops (Ctrl-C, its lock
# lost), such a failure is not stored and the feature stays pending
TRANSIENT_KINDS = frozenset({"rate_limited", "timeout", "server_error", "connection", "transient"})


class BatchesInFlight(UserError):
    """Another transport asked to label requests that wait in a provider batch."""


@dataclass(frozen=True)
class LabelReport:
    planned: int
    skipped: int
    labeled: int
    failed: int
    pending: int = 0
    spent_usd: float | None = 0.0
    """What this labeling spent on this judge's calls (None: a cost is unknown)."""
    budget_reached: bool = False
    stopped: str | None = None
    """Why the labeling stopped before the end: 'interrupted', or the reason a judge
    cannot work."""


@dataclass
class Tally:
    planned: int = 0
    skipped: int = 0
    labeled: int = 0
    failed: int = 0


@dataclass
class Unit:
    """One (feature, judge) in flight."""

    feature_id: str
    judge: str
    prompt_hash: str
    attempt: int
    record: FeatureRecord | None
    """None while parked by a transport that waits long (batches): reloaded before use."""
    negatives: dict[str, list[Snippet]]
    stages: list[StageName]
    outcomes: dict[StageName, StageOutcome] = field(default_factory=dict)
    sent: set[StageName] = field(default_factory=set)
    extends: Judgment | None = None
    """A judgment stored already that this unit only adds scorers to: its stages are the
    missing scorers', its explanation stands in for the explain stage."""

    @property
    def key(self) -> tuple[str, str]:
        return (self.feature_id, self.judge)

    def feature(self) -> FeatureRecord:
        if self.record is None:
            raise RuntimeError(f"{self.feature_id}: its record is parked; reload it first")
        return self.record

    def complete(self) -> bool:
        return all(s in self.outcomes for s in self.stages)

    def to_send(self) -> list[StageName]:
        """Stages whose dependencies are done and that were not sent yet."""
        return [s for s in ready(self.stages, set(self.outcomes)) if s not in self.sent]

    def explanation(self) -> str | None:
        explain = self.outcomes.get("explain")
        return explain.explanation if explain is not None else None


@dataclass(frozen=True)
class Applied:
    """What applying one outcome did: ``unit`` is still in flight and may have stages to
    send (``finished`` None), or it ended (``finished`` True: labeled, False: failed);
    ``unit`` None: the outcome belonged to no unit in flight."""

    unit: Unit | None
    finished: bool | None = None


class Engine:
    def __init__(
        self,
        run: RunData,
        store: LabelStore,
        judges: dict[str, str],
        sample_per_layer: int | None = None,
        seed: int = 0,
        budget_usd: float | None = None,
        executor: str = "local",
        scorers: tuple[str, ...] = ("detection",),
    ) -> None:
        """``judges`` maps each judge's name to the prompt hash its stages report;
        ``scorers`` are those every judgment is to carry (``judges.scorers``), and
        ``resamples`` where the classifier is resampled (``judges.stages.carried``)."""
        self.run = run
        self.store = store
        self.hashes = dict(judges)
        self.sample_per_layer = sample_per_layer
        self.seed = seed
        self.budget_usd = budget_usd
        self.executor = executor
        self.scorers = tuple(scorers)
        self.active: dict[tuple[str, str], Unit] = {}
        self.finished: set[tuple[str, str]] = set()
        self.tally = {judge: Tally() for judge in judges}
        self.spent: float | None = 0.0
        self.spent_by_judge: dict[str, float | None] = {judge: 0.0 for judge in judges}
        self.budget_reached = False
        self.stopped: str | None = None
        self.fatal: str | None = None
        self._reached: set[str] = set()
        self._unreachable: dict[str, int] = {}
        self._held: dict[str, list[tuple[Unit, StageOutcome]]] = {}
        self.shared = folder_cache_from_env()
        self.steering: dict[str, list[str]] = {}
        """Per feature, the tokens steering it promotes (``score-outputs``), shown to an
        explainer asked to explain from outputs."""

    # -- the plan ------------------------------------------------------------------------

    def plan(self) -> list[tuple[str, str]]:
        """(feature, judge) pairs still to label: of the features this labeling asked
        for (``select_features``), not of every feature an earlier labeling planned; the
        stored plan is extended by what it adds. Features come in ``work_order``, layers
        interleaved, so a labeling stopped early has labeled some of every layer."""
        self._check_batches()
        stored = self.store.planned()
        selection = select_features(self.run, stored, self.sample_per_layer, self.seed)
        if selection.added and stored:
            grown = ", ".join(f"layer {la} +{n}" for la, n in selection.added_by_layer().items())
            log.warning("extending the run's plan: %s", grown)
        self.store.add_planned(selection.added)
        planned = work_order(selection.features, self.seed)
        done = {judge: self.store.done(judge, self.scorers) for judge in self.hashes}
        for judge, tally in self.tally.items():
            tally.planned = len(planned)
            tally.skipped = sum(1 for fid in planned if fid in done[judge])
        self.store.set_meta("executor", self.executor)
        _ = self.run.negative_pool  # read once here
        self.steering = steering_promotes(self.store)
        return [(fid, j) for fid in planned for j in self.hashes if fid not in done[j]]

    def _check_batches(self) -> None:
        """Requests of these judges submitted to a provider batch that has not ended are
        in flight at the provider, paid whether or not anyone collects them: only the
        batch transport (which collects them, and counts their cost as they come in)
        labels past them; any other transport stops before sending anything."""
        if self.executor == "batch":
            return
        from labeler.labeling.batch_records import BatchRecords

        open_ = [s for s in BatchRecords(self.store).open() if s.judge in self.hashes]
        if not open_:
            return
        judges = sorted({s.judge for s in open_})
        requests = sum(s.n_requests for s in open_)
        made = dt.datetime.fromtimestamp(min(s.made_at for s in open_), dt.UTC)
        folder = self.store.path.parent
        raise BatchesInFlight(
            f"{folder}: {len(open_)} provider {'batch' if len(open_) == 1 else 'batches'} of "
            f"{', '.join(judges)} ({requests:,} requests, submitted from "
            f"{made:%Y-%m-%d %H:%M} UTC) not collected yet; they are paid either way, so "
            f"this labeling would pay for them twice: collect them first with `labeler label "
            f"{folder} --executor batch` and the same --judge (it waits for them), then "
            "label the rest on any executor"
        )

    def units(self, todo: list[tuple[str, str]]) -> Iterator[Unit]:
        """Units to work on, one at a time as asked for; none once the labeling stops or
        the budget is spent. A unit whose stages are all stored already is finished here
        and not yielded."""
        for fid, judge, record in records_of(self.run, todo):
            if not self.may_start():
                return
            unit = self.start(fid, judge, record)
            if unit is not None:
                yield unit

    def may_start(self) -> bool:
        if self.stopped is not None:
            return False
        if self.budget_usd is not None and self.spent is not None and self.spent >= self.budget_usd:
            self.budget_reached = True
            return False
        return True

    def start(self, feature_id: str, judge: str, record: FeatureRecord) -> Unit | None:
        key = (feature_id, judge)
        if key in self.finished or key in self.active:
            return None
        if feature_id in self.steering:
            record = record.model_copy(update={"steering_promotes": self.steering[feature_id]})
        hashed = self.hashes[judge]
        sets = [kind for kind in ("top", "random") if record.of_kind(kind)]
        unit = Unit(
            feature_id=feature_id, judge=judge, prompt_hash=hashed,
            attempt=self.store.failed_attempts(feature_id, judge), record=record,
            negatives=negatives_for(self.run, record, self.seed, self.scorers),
            stages=stages_for(judge, sets, self.scorers),
        )  # fmt: skip
        if unit.stages != ["label"]:
            self._only_missing_scorers(unit)
        for outcome in self.store.stage_outcomes(feature_id, judge, hashed):
            if outcome.stage == "label" and (
                outcome.judgment is None or not has_scorers(outcome.judgment, self.scorers)
            ):
                continue  # a whole judgment made without a scorer now asked for
            if outcome.stage in unit.stages:
                unit.outcomes[outcome.stage] = outcome
        self.active[key] = unit
        if unit.complete():
            with self.store.transaction():
                self._finish_ok(unit)
            return None
        return unit

    def _only_missing_scorers(self, unit: Unit) -> None:
        """A feature this judge labeled already, asked for scorers (or resamples) it
        lacks, runs only those: nothing it was labeled with is asked again (whatever
        prompts it was made under), and the scorers see the explanation it was labeled
        with; resamples are compared with the label it has."""
        stored = self.store.ok_judgment(unit.feature_id, unit.judge)
        if stored is None:
            return
        unit.extends = stored
        unit.stages = [s for s in unit.stages if s in FIELD_OF_STAGE
                       and getattr(stored, FIELD_OF_STAGE[s]) is None]  # fmt: skip
        unit.outcomes["explain"] = StageOutcome(
            feature_id=unit.feature_id, judge=unit.judge, prompt_hash=unit.prompt_hash,
            stage="explain", ok=True, explanation=stored.explanation, cost_usd=0.0,
        )  # fmt: skip

    def reply_cache(self) -> ReplyCache:
        """What answers a request before any call: the run's store, then the shared
        cache folder (``$LABELER_CACHE_DIR``) if one is set."""
        return Layered([self.store] if self.shared is None else [self.store, self.shared])

    # -- stopping ------------------------------------------------------------------------

    def heed(self, interrupts: Interrupts | None, lock: RunLock) -> bool:
        """Stop on an interrupt or on the run's lock lost; whether the labeling stops."""
        if interrupts is not None and interrupts.requested.is_set():
            self.stop("interrupted")
        if lock.lost.is_set():
            self.stop("lock_lost")
        return self.stopped is not None

    def stop(self, why: str) -> None:
        """Start nothing new from now on (the first reason given is kept)."""
        if self.stopped is None:
            self.stopped = why

    def _judge_unusable(self, outcome: StageOutcome) -> bool:
        """Whether a failed stage of a unit in flight says its judge cannot work (then the
        labeling stops)."""
        kind = _kind(outcome)
        judge = outcome.judge
        if kind in UNREACHABLE_KINDS and judge not in self._reached:
            self._unreachable[judge] = self._unreachable.get(judge, 0) + 1
            if self._unreachable[judge] < UNREACHABLE_IN_A_ROW:
                return False
        elif kind not in FATAL_KINDS:
            return False
        if self.fatal is None:
            self.fatal = f"{judge}: {redact(outcome.reason or kind)}"
            log.info("stopping: %s", self.fatal)
        self.stop(self.fatal)
        return True

    # -- outcomes ------------------------------------------------------------------------

    def apply(self, outcome: StageOutcome, task_id: str | None = None,
              unit: Unit | None = None) -> Applied:  # fmt: skip
        """Apply one stage's outcome (in one store transaction, nested in the caller's if
        it holds one). ``unit``: the unit the transport sent the stage for; without it, a
        successful stage joins the (feature, judge)'s unit in flight, if any, and anything
        else counts as late."""
        if outcome.reason is not None:
            outcome = outcome.model_copy(update={"reason": redact(outcome.reason)})
        with self.store.transaction():
            if unit is None:  # an earlier attempt's successful stage is as good as a new one
                found = self.active.get((outcome.feature_id, outcome.judge))
                unit = found if found is not None and outcome.ok else None
            if unit is not None and (
                unit.key not in self.active
                or outcome.prompt_hash != unit.prompt_hash
                or outcome.stage not in unit.stages
                or outcome.stage in unit.outcomes
            ):
                unit = None  # finished meanwhile, or a duplicate
            if unit is None:
                self._apply_late(outcome, task_id)
                return Applied(None)
            if outcome.ok or _kind(outcome) not in UNREACHABLE_KINDS | {"timeout"}:
                self._reached_judge(outcome.judge)  # it answered, if only with an error
            if not outcome.ok:
                # replies a failed stage accepted (a resample stage's other calls) are
                # kept: a rerun does not pay for them again
                self.store.put_replies(outcome.kept)
                self._share(outcome)
                return self._apply_failure(unit, outcome)
            self.store.put_stage(outcome, task_id)
            self._share(outcome)
            unit.outcomes[outcome.stage] = outcome
            if unit.complete():
                return Applied(unit, finished=self._finish_ok(unit))
            return Applied(unit)

    def _apply_failure(self, unit: Unit, outcome: StageOutcome) -> Applied:
        if _kind(outcome) == HALTED or (
            self.stopped is not None and _kind(outcome) in TRANSIENT_KINDS
        ):
            # the labeling stopped: the feature is not at fault, it stays pending (what
            # the stage's calls used is still counted)
            self._drop(unit)
            self._charge(unit.judge, outcome.cost_usd)
            return Applied(None)
        if self._judge_unusable(outcome):
            self._drop(unit)
            for held, _ in self._held.pop(unit.judge, []):
                self._drop(held)  # not the features' fault either: they stay pending
            return Applied(None)
        if _kind(outcome) in UNREACHABLE_KINDS and unit.judge not in self._reached:
            # not stored yet: if the judge's server turns out unreachable, the feature is
            # not at fault; stored once a call of the judge succeeds, or at the end
            self.active.pop(unit.key, None)
            self.finished.add(unit.key)
            self._held.setdefault(unit.judge, []).append((unit, outcome))
            return Applied(None)
        self._finish_failed(unit, outcome)
        return Applied(unit, finished=False)

    def _reached_judge(self, judge: str) -> None:
        if judge not in self._reached:
            self._reached.add(judge)
            self._unreachable.pop(judge, None)
            self._flush_held(judge)

    def _flush_held(self, judge: str | None = None) -> None:
        """Store the failures held back (of ``judge``, or of every judge)."""
        for name in [judge] if judge is not None else list(self._held):
            for unit, outcome in self._held.pop(name, []):
                self._finish_failed(unit, outcome)

    def _apply_late(self, outcome: StageOutcome, task_id: str | None) -> None:
        """An outcome of no unit in flight: a stage of a (feature, judge) already finished,
        a duplicate, or one of an earlier run's stages that finished while no labeler ran.
        A success is kept (for when the feature starts) and its cost counted; a failure of
        a feature with no row yet is stored as its failure (a judge that could not work
        stores nothing); any other failure only adds its cost."""
        fid, judge = outcome.feature_id, outcome.judge
        row = self.store.status_of(fid, judge)
        if outcome.ok:
            inserted = self.store.put_stage(outcome, task_id)
            self._share(outcome)
            if row is not None:
                usage, cost = (
                    self.store.charge_stages(fid, judge, outcome.prompt_hash)
                    if inserted
                    else (outcome.usage, outcome.cost_usd)  # a stage paid twice
                )
                self.store.add_cost(fid, judge, usage, cost)
                self._charge(judge, cost)
            return
        held = any(u.feature_id == fid for u, _ in self._held.get(judge, []))
        if row is not None:
            self.store.add_cost(fid, judge, outcome.usage, outcome.cost_usd)
            self._charge(judge, outcome.cost_usd)
        elif not held and _kind(outcome) not in FATAL_KINDS | UNREACHABLE_KINDS:
            self.store.put_failure(fid, judge, outcome.reason or "unknown", outcome.prompt_hash,
                                   outcome.usage, outcome.cost_usd)  # fmt: skip
            self.finished.add((fid, judge))
            self.tally[judge].failed += 1
            self._charge(judge, outcome.cost_usd)

    def keep_replies(self, kept: list[KeptReply]) -> None:
        """Keep accepted replies in the reply cache before their stage ends (a stage of
        several calls), so that no reply is paid for twice."""
        self.store.put_replies(kept)
        if self.shared is not None:
            for reply in kept:
                self.shared.put(reply)

    def _share(self, outcome: StageOutcome) -> None:
        """Put the replies a stage accepted in the shared cache folder, if one is set
        (the run's store keeps them with the stage)."""
        if self.shared is not None:
            for kept in outcome.kept:
                self.shared.put(kept)

    def _finish_ok(self, unit: Unit) -> bool:
        """Store the unit's judgment; False (and the unit failed) if its stages do not
        make a valid one."""
        try:
            outcomes = [unit.outcomes[s] for s in unit.stages]
            judgment = (
                assemble(outcomes) if unit.extends is None else extend(unit.extends, outcomes)
            )
        except (ValueError, AssertionError) as exc:  # a validation error is a ValueError
            failure = StageOutcome(
                feature_id=unit.feature_id, judge=unit.judge, prompt_hash=unit.prompt_hash,
                stage=unit.stages[-1], ok=False, cost_usd=0.0,
                reason=f"invalid_reply: assemble: {type(exc).__name__}: {exc}"[:500],
            )  # fmt: skip
            self._finish_failed(unit, failure)
            return False
        charge = self.store.charge_stages(unit.feature_id, unit.judge, unit.prompt_hash)
        self.store.put_ok(judgment, charge)
        self._close(unit, charge[1], ok=True)
        return True

    def _finish_failed(self, unit: Unit, outcome: StageOutcome) -> None:
        if unit.extends is not None:
            log.warning(
                "%s %s: %s (its label stays; a rerun asks this scorer again)",
                unit.feature_id, unit.judge, redact(outcome.reason or "unknown"),
            )  # fmt: skip
        usage, cost = self.store.charge_stages(unit.feature_id, unit.judge, unit.prompt_hash)
        total_cost = add_costs([cost, outcome.cost_usd])
        self.store.put_failure(
            unit.feature_id, unit.judge, outcome.reason or "unknown", unit.prompt_hash,
            add_usage(usage, outcome.usage), total_cost,
        )  # fmt: skip
        self._close(unit, total_cost, ok=False)

    def _drop(self, unit: Unit) -> None:
        """A unit given up without a row: it stays pending for the next run, with the
        stages it stored."""
        self.active.pop(unit.key, None)
        self.finished.add(unit.key)

    def _close(self, unit: Unit, cost: float | None, ok: bool) -> None:
        self.active.pop(unit.key, None)
        self.finished.add(unit.key)
        tally = self.tally[unit.judge]
        if ok:
            tally.labeled += 1
        else:
            tally.failed += 1
        self._charge(unit.judge, cost)

    def _charge(self, judge: str, cost: float | None) -> None:
        """Add to the labeling's spend (what the budget counts) and the judge's; each is
        None once any of its costs is unknown (a model without a price)."""
        self.spent = _plus(self.spent, cost)
        self.spent_by_judge[judge] = _plus(self.spent_by_judge.get(judge, 0.0), cost)

    # -- the end ---------------------------------------------------------------------------

    def abandon_active(self) -> None:
        """At the end: units still in flight stay pending (what they stored stays for the
        next run); failures held back are stored, unless the judge could not work."""
        for unit in list(self.active.values()):
            self._drop(unit)
        if self.fatal is None and self._held:
            with self.store.transaction():
                self._flush_held()

    def reports(self) -> dict[str, LabelReport]:
        """Per judge: what it did and what this labeling spent on it."""
        return {judge: self._report(judge, t) for judge, t in self.tally.items()}

    def _report(self, judge: str, t: Tally) -> LabelReport:
        return LabelReport(
            planned=t.planned, skipped=t.skipped, labeled=t.labeled, failed=t.failed,
            pending=t.planned - t.skipped - t.labeled - t.failed,
            spent_usd=self.spent_by_judge.get(judge, 0.0),
            budget_reached=self.budget_reached, stopped=self.stopped,
        )  # fmt: skip


def steering_promotes(store: LabelStore) -> dict[str, list[str]]:
    """The tokens each feature scored by ``labeler score-outputs`` promotes."""
    out: dict[str, list[str]] = {}
    for fid, payload in store.output_scores().items():
        promoted = json.loads(payload).get("promoted")
        if isinstance(promoted, list):
            out[fid] = [str(t) for t in promoted]
    return out


def _plus(total: float | None, cost: float | None) -> float | None:
    return None if total is None or cost is None else total + cost


def _kind(outcome: StageOutcome) -> str:
    return (outcome.reason or "").split(":", 1)[0]
