"""Seeded simulations of an audit on a labeled run: draw, a reviewer who answers the
planted truth decides the drawn features in order, and the audited estimate is read as
``summarize`` computes it; then the audit and its decisions are taken back out, so the
next simulation starts from the same labels. Shared by tests/test_audit.py and
benchmarks/bench_audit.py."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from labeler.audit.design import Weighting, draw_audit, signals_of
from labeler.labeling.store import LabelStore
from labeler.reporting.audit_summary import AuditSummary, audit_summary, judges_side
from labeler.reporting.label_table import judgment_frame, planned_frame, review_frame
from labeler.run.schemas import ReviewDecision

REVIEWER = "planted-truth"


def planted_categories(ground_truth: Path) -> dict[str, str]:
    return {t["feature_id"]: t["category"] for t in json.loads(ground_truth.read_text())}


def planted_share(store: LabelStore, truth: dict[str, str], category: str = "reasoning") -> float:
    """The planted share among the planted features (all alive ones, in a census)."""
    planned = [fid for fid, _, _ in store.planned()]
    return sum(truth[f] == category for f in planned) / len(planned)


@dataclass(frozen=True)
class Outcome:
    seed: int
    share: float
    ci_low: float
    ci_high: float
    judges_share: float
    judges_low: float
    judges_high: float
    n_used: int

    def covers(self, value: float) -> bool:
        return self.ci_low <= value <= self.ci_high

    @property
    def half_width(self) -> float:
        return (self.ci_high - self.ci_low) / 2


class AuditSimulator:
    """Runs audits on one labeled store and takes them back out."""

    def __init__(self, store: LabelStore, truth: dict[str, str], alive: dict[int, int]) -> None:
        self.store = store
        self.truth = truth
        self.alive = alive
        self.planned = planned_frame(store)
        self.judgments = judgment_frame(store).join(
            self.planned.select("feature_id", "layer"), on="feature_id"
        )
        self._judges_interval: tuple[float, float] | None = None
        # the judges' side is read once: audits and decisions do not change it
        self.signals = signals_of(store)
        self.judges = judges_side(store, self.planned, self.judgments)

    def decide(self, feature_ids: list[str]) -> None:
        with self.store.transaction():
            for fid in feature_ids:
                self.store.add_review(
                    ReviewDecision(feature_id=fid, reviewer=REVIEWER, category=self.truth[fid],
                                   **_details(self.truth[fid]))  # type: ignore[arg-type]
                )  # fmt: skip

    def summary(self) -> AuditSummary:
        reviews = review_frame(self.store)
        audited = audit_summary(
            self.store, self.planned, self.judgments, reviews, self.alive, self.judges
        )
        assert audited is not None
        return audited

    def run(
        self, n: int, seed: int, weighting: Weighting = "uncertainty", audits: int = 1
    ) -> Outcome:
        """``audits`` audits of ``n`` each (seeds ``seed``, ``seed + 100000``, ...), every
        drawn feature decided; the store is left as it was."""
        try:
            for k in range(audits):
                drawn = draw_audit(
                    self.store, n, seed + 100_000 * k, weighting, signals=self.signals
                )
                self.decide(drawn.feature_ids)
            audited = self.summary()
        finally:
            self.reset()
        share = audited.reasoning
        assert share is not None
        return Outcome(seed, share.share, share.ci_low, share.ci_high, share.judges_share,
                       *self.judges_interval(), audited.n_used)  # fmt: skip

    def judges_interval(self) -> tuple[float, float]:
        """The judges-only 95% interval of the reasoning share, as `summarize` gives it
        (the same in every simulation: the audit does not change the judges' labels)."""
        if self._judges_interval is None:
            self._judges_interval = self._judges_only()
        return self._judges_interval

    def _judges_only(self) -> tuple[float, float]:
        from labeler.reporting.final_labels import judge_labels
        from labeler.reporting.summarize import stratified

        labels = judge_labels(self.judgments).join(
            self.planned.select("feature_id", "layer"), on="feature_id"
        )
        per_layer = dict(labels.group_by("layer").len().iter_rows())
        reasoning = dict(
            labels.filter(pl.col("category") == "reasoning").group_by("layer").len().iter_rows()
        )
        estimate = stratified(reasoning, per_layer, self.alive)
        return estimate.ci_low, estimate.ci_high

    def reset(self) -> None:
        with self.store.transaction():
            self.store.conn.execute("DELETE FROM audit_frame")
            self.store.conn.execute("DELETE FROM audits")
            self.store.conn.execute("DELETE FROM sqlite_sequence WHERE name = 'audits'")
            self.store.conn.execute("DELETE FROM reviews WHERE reviewer = ?", (REVIEWER,))


def _details(category: str) -> dict[str, str]:
    """The least a valid decision of this category needs besides the category."""
    if category == "reasoning":
        return {"subcategory": "other", "mechanism": "input_simple"}
    if category == "domain":
        return {"domain_type": "math"}
    return {}
