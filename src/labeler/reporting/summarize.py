"""What a run's labels say about the whole adapter: the share of reasoning features with
its uncertainty, the category breakdown, for the final labels and for each judge side
by side, the judges' agreement and what the labeling cost.

Features are labeled per layer (all alive ones, or a uniform sample of each layer), so a
population share is the stratified estimate ``sum_h W_h p_h``, each layer weighted by
its share ``W_h`` of the alive features, with the variance
``sum_h W_h^2 p_h (1 - p_h) / (n_h - 1)``. There is no finite-population correction: the
interval speaks of features like these (what another training run or another sample of
the same kind would give), not only of this adapter's fixed set, so a census still has
the usual binomial uncertainty. The 95% interval is Wilson's at the effective sample size
``p (1 - p) / variance``, which keeps it inside [0, 1] and sensible near 0 (with no
variance, as when every sampled feature has the same label, at the labeled count).
Failed and unlabeled features are left out of ``n_h`` (missing at random); the range
the share would take if all of them went one way or the other is reported beside it.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from collections import Counter

import polars as pl
from pydantic import BaseModel, Field

from collectors.run_format import RunInfo, package_versions
from labeler.errors import UserError
from labeler.judges.scorers import wilson_bounds
from labeler.labeling.store import LabelStore
from labeler.reporting.agreement import AgreementReport, PairAgreement, agreement
from labeler.reporting.audit_summary import NO_AUDIT_NOTE, AuditSummary, audit_summary
from labeler.reporting.baseline_compare import BaselineComparison
from labeler.reporting.disputes import DisputeRules, find_disputes
from labeler.reporting.final_labels import SOURCES, final_labels, human_labels
from labeler.reporting.label_table import judge_names, judgment_frame, planned_frame, review_frame
from labeler.reporting.score_distributions import (
    DetectionDistribution,
    detection_scores,
    distribution,
)
from labeler.run.feature_ids import feature_order
from prompts import CATEGORIES, DOMAIN_TYPES, MECHANISMS, SUBCATEGORIES

SUMMARY_SCHEMA_VERSION = 2
"""The version of ``summary.json``'s layout (docs/review.md), raised when it changes."""
DISTRIBUTION = "transcoder-labeler"
Z95 = 1.959963984540054
FINAL = "final"
HUMAN = "human"


class Share(BaseModel):
    """A share of the labeled sample, with its Wilson 95% interval."""

    count: int
    n: int
    share: float
    ci_low: float
    ci_high: float


def wilson(count: int, n: int, z: float = Z95) -> Share:
    """A share with its Wilson score interval (95% by default)."""
    if n == 0:
        return Share(count=0, n=0, share=0.0, ci_low=0.0, ci_high=1.0)
    low, high = wilson_bounds(count / n, n, z)
    return Share(count=count, n=n, share=count / n, ci_low=low, ci_high=high)


class Estimate(BaseModel):
    """A population share: each layer's sample share weighted by its alive features."""

    count: int = Field(description="labeled features with the label, over all layers")
    n: int = Field(description="labeled features, over all layers")
    share: float = Field(description="estimated share of all alive features")
    ci_low: float
    ci_high: float
    std_error: float
    sample_share: float = Field(description="count / n, unweighted")


def stratified(counts: dict[int, int], labeled: dict[int, int], alive: dict[int, int]) -> Estimate:
    """The stratified share over the layers with labels (see the module's docstring)."""
    layers = [h for h, n in labeled.items() if n > 0 and alive.get(h, 0) > 0]
    total = sum(alive[h] for h in layers)
    count = sum(counts.get(h, 0) for h in layers)
    n = sum(labeled[h] for h in layers)
    if total == 0 or n == 0:
        return Estimate(
            count=0, n=0, share=0.0, ci_low=0.0, ci_high=1.0, std_error=0.0, sample_share=0.0
        )
    share, variance = 0.0, 0.0
    for h in layers:
        weight, n_h = alive[h] / total, labeled[h]
        p_h = counts.get(h, 0) / n_h
        share += weight * p_h
        # One labeled feature says nothing of the spread: count the largest variance.
        spread = p_h * (1 - p_h) if n_h > 1 else 0.25
        variance += weight * weight * spread / max(n_h - 1, 1)
    has_spread = variance > 0 and 0.0 < share < 1.0
    effective = share * (1 - share) / variance if has_spread else float(n)
    low, high = wilson_bounds(share, effective)
    return Estimate(
        count=count,
        n=n,
        share=share,
        ci_low=low,
        ci_high=high,
        std_error=math.sqrt(variance),
        sample_share=count / n,
    )


class LabelSummary(BaseModel):
    """The shares by one rater: a judge, or the final labels."""

    rater: str
    n_planned: int
    n_labeled: int
    n_failed: int
    n_unlabeled: int
    failures_by_reason: dict[str, int]
    reasoning: Estimate
    reasoning_if_missing_counted: tuple[float, float] = Field(
        description="the sample's reasoning share if every failed or unlabeled feature were "
        "non-reasoning, and if every one were reasoning"
    )
    by_category: dict[str, Estimate]
    by_subcategory: dict[str, Estimate] = Field(description="shares of all alive features")
    by_mechanism: dict[str, Estimate]
    by_domain_type: dict[str, Estimate]
    by_layer: dict[str, dict[str, int]] = Field(description="labeled features per category")
    layers_without_labels: list[str] = Field(
        description="planned layers none of whose features this rater labeled: the shares "
        "are of the other layers' alive features"
    )
    n_alive_covered: int = Field(description="alive features of the layers with labels")
    by_source: dict[str, int] = Field(default_factory=dict, description="final labels only")
    cost_usd: float | None = None
    n_detection_undefined: int = Field(
        0,
        description="labeled features whose detection score is undefined (missing): no "
        "non-activating, or no activating, examples to test the explanation on",
    )
    detection_distribution: DetectionDistribution | None = Field(
        None,
        description="judges only: the median and interquartile range (with n) of the "
        "detection F1 and balanced accuracy by final category and by layer; scores that "
        "pass the sanity checks of Oikarinen et al. (ICML 2025), where accuracy does not",
    )


class DisputeCounts(BaseModel):
    rules: DisputeRules
    n_disputed: int
    by_reason: dict[str, int]
    n_reviewed: int = Field(description="disputed features with a human decision")


class ReviewCounts(BaseModel):
    n_decisions: int
    n_skips: int
    n_features: int
    reviewers: list[str]
    n_reviewers_disagree: int


class SteeringShare(BaseModel):
    n_scored: int
    n_significant: int
    share: float | None


class SteeringSummary(BaseModel):
    """Output scores (``labeler score-outputs``) by the final label's mechanism: how many
    features of each kind steer the model toward the tokens they point at more than
    random directions of their size do."""

    n_scored: int
    by_mechanism: dict[str, SteeringShare] = Field(
        description="output, input_simple, input_abstract (reasoning features), and "
        "'other' (every feature without a mechanism)"
    )


def steering_summary(final: pl.DataFrame, payloads: dict[str, str]) -> SteeringSummary | None:
    if not payloads:
        return None
    significant = {fid: bool(json.loads(p)["significant"]) for fid, p in payloads.items()}
    groups: dict[str, list[bool]] = {}
    for fid, mechanism in final.select("feature_id", "mechanism").iter_rows():
        if fid in significant:
            groups.setdefault(mechanism or "other", []).append(significant[fid])
    return SteeringSummary(
        n_scored=len(significant),
        by_mechanism={
            m: SteeringShare(n_scored=len(v), n_significant=sum(v),
                             share=sum(v) / len(v) if v else None)
            for m, v in sorted(groups.items())
        },
    )  # fmt: skip


class RunSummary(BaseModel):
    """What ``labeler summarize`` reports, written as ``summary.json``."""

    schema_version: int = Field(
        SUMMARY_SCHEMA_VERSION, description="the layout of this record (docs/review.md)"
    )
    tool_version: str = Field(description=f"the installed {DISTRIBUTION} that made it")
    created_at: str = Field(description="when it was made, UTC, ISO 8601")
    run: str
    unit: str
    n_alive: int
    n_alive_by_layer: dict[str, int]
    n_planned: int
    final: LabelSummary
    judges: list[LabelSummary]
    agreement: AgreementReport | None = Field(
        description="on the category, between every judge and every reviewer"
    )
    judges_vs_humans: list[PairAgreement] = Field(
        description="each judge against the human decision (all reviewers as one rater)"
    )
    disputes: DisputeCounts
    reviews: ReviewCounts
    cost_usd: float | None
    cost_per_labeled_usd: float | None
    prices: str | None = Field(
        None, description="the price table the costs were counted with, and its date"
    )
    steering: SteeringSummary | None = Field(
        None, description="output scores by mechanism, when `labeler score-outputs` ran"
    )
    baseline: BaselineComparison | None = Field(
        None, description="the scores against a control run (`summarize --baseline`)"
    )
    audit: AuditSummary | None = Field(
        None,
        description="the shares corrected by people's audit labels, with intervals that "
        "include the judges' error (`labeler audit`; docs/audit.md); null without an audit",
    )
    judge_error: str | None = Field(
        None, description="what the intervals leave out: set when no audit corrects them"
    )


def reason_group(reason: str | None) -> str:
    """A failure's kind and stage ("invalid_reply: classify"), without the detail."""
    return ":".join((reason or "unknown").split(":")[:2]).strip()


def _label_summary(
    rater: str,
    labels: pl.DataFrame,
    planned: pl.DataFrame,
    alive: dict[int, int],
    failures: list[str | None],
    cost: float | None = None,
) -> LabelSummary:
    """``labels``: feature_id, layer and the label fields of the features this rater
    labeled (one row each)."""
    labeled = _per_layer(labels)
    n_labeled, n_failed = labels.height, len(failures)
    n_planned = planned.height

    def estimate(mask: pl.Expr) -> Estimate:
        return stratified(_per_layer(labels.filter(mask)), labeled, alive)

    def breakdown(column: str, values: tuple[str, ...]) -> dict[str, Estimate]:
        return {v: estimate(pl.col(column) == v) for v in values}

    n_reasoning = labels.filter(pl.col("category") == "reasoning").height
    layer_counts = labels.group_by("layer", "category").len()
    by_layer: dict[str, dict[str, int]] = {}
    for layer in sorted(set(planned["layer"].to_list())):
        by_layer[str(layer)] = {c: 0 for c in CATEGORIES}
    for layer, category, n in layer_counts.iter_rows():
        by_layer.setdefault(str(layer), {c: 0 for c in CATEGORIES})[category] = n
    return LabelSummary(
        rater=rater,
        n_planned=n_planned,
        n_labeled=n_labeled,
        n_failed=n_failed,
        n_unlabeled=n_planned - n_labeled - n_failed,
        failures_by_reason=dict(Counter(reason_group(r) for r in failures).most_common()),
        reasoning=estimate(pl.col("category") == "reasoning"),
        reasoning_if_missing_counted=(
            n_reasoning / n_planned if n_planned else 0.0,
            (n_reasoning + n_planned - n_labeled) / n_planned if n_planned else 0.0,
        ),
        by_category=breakdown("category", CATEGORIES),
        by_subcategory=breakdown("subcategory", SUBCATEGORIES),
        by_mechanism=breakdown("mechanism", MECHANISMS),
        by_domain_type=breakdown("domain_type", DOMAIN_TYPES),
        by_layer=by_layer,
        layers_without_labels=[la for la in by_layer if int(la) not in labeled],
        n_alive_covered=sum(n for h, n in alive.items() if labeled.get(h, 0) > 0),
        cost_usd=cost,
    )


def _per_layer(frame: pl.DataFrame) -> dict[int, int]:
    return {int(layer): int(n) for layer, n in frame.group_by("layer").len().iter_rows()}


def no_labels(store: LabelStore) -> UserError:
    folder = store.path.parent
    return UserError(f"{folder}: no labels yet; run `labeler label {folder}` first")


def summarize(
    store: LabelStore, info: RunInfo, run_name: str, rules: DisputeRules | None = None
) -> RunSummary:
    rules = rules or DisputeRules()
    planned = planned_frame(store)
    judgments = judgment_frame(store)
    if planned.is_empty() or judgments.is_empty():
        raise no_labels(store)
    judgments = judgments.join(planned.select("feature_id", "layer"), on="feature_id")
    reviews = review_frame(store)
    alive = {int(layer): n for layer, n in info.n_alive.items()}
    final = final_labels(planned, judgments, reviews)
    labeled_final = final.filter(pl.col("source") != "none")
    final_failed = (
        judgments.filter(pl.col("status") == "failed")
        .join(labeled_final.select("feature_id"), on="feature_id", how="anti")
        .sort("judge")
        .group_by("feature_id")
        .agg(pl.col("reason").str.join("; "))
    )
    final_summary = _label_summary(
        FINAL, labeled_final, planned, alive, final_failed["reason"].to_list()
    )
    sources = dict(final.group_by("source").len().iter_rows())
    final_summary.by_source = {s: int(sources.get(s, 0)) for s in SOURCES}
    costs = judgments.group_by("judge").agg(
        pl.col("cost_usd").sum().alias("cost"),
        pl.col("cost_usd").is_not_null().any().alias("priced"),
    )
    # A judge is unpriced when none of its rows has a cost (a failure may carry none).
    cost_of = {j: (float(c) if priced else None) for j, c, priced in costs.iter_rows()}
    per_judge = []
    scores = detection_scores(store)
    layers = [str(layer) for layer in sorted(set(planned["layer"].to_list()))]
    for judge in judge_names(judgments):
        mine = judgments.filter(pl.col("judge") == judge)
        ok = mine.filter(pl.col("status") == "ok")
        failed = mine.filter(pl.col("status") == "failed")["reason"].to_list()
        summary = _label_summary(judge, ok, planned, alive, failed, cost_of.get(judge))
        summary.n_detection_undefined = ok["detection"].null_count()
        summary.detection_distribution = distribution(
            scores.filter(pl.col("judge") == judge), labeled_final, CATEGORIES, layers
        )
        per_judge.append(summary)
    disputes = find_disputes(judgments, rules)
    human = final.filter(pl.col("source") == "human").select("feature_id")
    decided = reviews.filter(pl.col("action") == "decide")
    reasons = Counter(r for rs in disputes["reasons"].to_list() for r in rs)
    audited = audit_summary(store, planned, judgments, reviews, alive)
    known_costs = [c for c in cost_of.values() if c is not None]
    total_cost = sum(known_costs) if known_costs else None
    return RunSummary(
        tool_version=package_versions((DISTRIBUTION,))[DISTRIBUTION],
        created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        run=run_name,
        unit=info.unit,
        n_alive=sum(alive.values()),
        n_alive_by_layer={str(k): v for k, v in sorted(alive.items())},
        n_planned=planned.height,
        final=final_summary,
        judges=per_judge,
        agreement=_agreement(judgments, reviews),
        judges_vs_humans=_judges_vs_humans(judgments, reviews),
        disputes=DisputeCounts(
            rules=rules,
            n_disputed=disputes.height,
            by_reason={r: reasons[r] for r in sorted(reasons)},
            n_reviewed=disputes.join(human, on="feature_id").height,
        ),
        reviews=ReviewCounts(
            n_decisions=decided.height,
            n_skips=reviews.height - decided.height,
            n_features=decided["feature_id"].n_unique(),
            reviewers=sorted(set(reviews["reviewer"].to_list())),
            n_reviewers_disagree=int(final["reviewers_disagree"].sum()),
        ),
        cost_usd=total_cost,
        prices=store.get_meta("prices"),
        steering=steering_summary(final, store.output_scores()),
        audit=audited,
        judge_error=NO_AUDIT_NOTE if audited is None or audited.reasoning is None else None,
        cost_per_labeled_usd=(
            total_cost / labeled_final.height
            if total_cost is not None and labeled_final.height
            else None
        ),
    )


def _agreement(judgments: pl.DataFrame, reviews: pl.DataFrame) -> AgreementReport | None:
    """Agreement on the category among the judges and the reviewers (each reviewer's
    latest decision); None with fewer than two raters."""
    decided = reviews.filter(pl.col("action") == "decide").sort("review_id")
    people = (
        decided.group_by("feature_id", "reviewer")
        .last()
        .select("feature_id", (pl.lit(f"{HUMAN}:") + pl.col("reviewer")).alias("rater"), "category")
    )
    long = _in_rater_order(pl.concat([_judge_ratings(judgments), people]))
    return agreement(long) if long["rater"].n_unique() >= 2 else None


def _judges_vs_humans(judgments: pl.DataFrame, reviews: pl.DataFrame) -> list[PairAgreement]:
    human = human_labels(reviews).select("feature_id", pl.lit(HUMAN).alias("rater"), "category")
    if human.is_empty():
        return []
    report = agreement(_in_rater_order(pl.concat([_judge_ratings(judgments), human])))
    return [p for p in report.pairs if HUMAN in (p.rater_a, p.rater_b)]


def _judge_ratings(judgments: pl.DataFrame) -> pl.DataFrame:
    return judgments.filter(pl.col("status") == "ok").select(
        "feature_id", pl.col("judge").alias("rater"), "category"
    )


class Difference(BaseModel):
    label: str
    share: float
    other_share: float
    difference: float = Field(description="share - other_share")
    ci_low: float
    ci_high: float


class Comparison(BaseModel):
    """The final labels of this run against another's (say the neuron baseline)."""

    run: str
    other_run: str
    differences: list[Difference]


def compare(this: RunSummary, other: RunSummary) -> Comparison:
    """Differences of population shares, with Newcombe's 95% interval built from each
    share's own interval (the two runs independent): it stays sensible where a share
    is 0 or 1 and its standard error says nothing."""
    rows = []
    for label, mine in (
        ("reasoning", this.final.reasoning),
        *((f"category: {c}", e) for c, e in this.final.by_category.items()),
        *((f"subcategory: {c}", e) for c, e in this.final.by_subcategory.items()),
    ):
        theirs = _find(other.final, label)
        diff = mine.share - theirs.share
        below = math.hypot(mine.share - mine.ci_low, theirs.ci_high - theirs.share)
        above = math.hypot(mine.ci_high - mine.share, theirs.share - theirs.ci_low)
        rows.append(
            Difference(
                label=label,
                share=mine.share,
                other_share=theirs.share,
                difference=diff,
                ci_low=diff - below,
                ci_high=diff + above,
            )
        )
    return Comparison(run=this.run, other_run=other.run, differences=rows)


def _find(summary: LabelSummary, label: str) -> Estimate:
    if label == "reasoning":
        return summary.reasoning
    kind, _, value = label.partition(": ")
    return (summary.by_category if kind == "category" else summary.by_subcategory)[value]


def _in_rater_order(long: pl.DataFrame) -> pl.DataFrame:
    """Judges first (model judges by name, the heuristic last), then people by name."""
    names = judge_names(
        long.filter(~pl.col("rater").str.starts_with(HUMAN)).rename({"rater": "judge"})
    )
    rank = {name: i for i, name in enumerate(names)}
    people = sorted(set(long["rater"].to_list()) - set(names))
    rank |= {name: len(names) + i for i, name in enumerate(people)}
    return long.sort(pl.col("rater").replace_strict(rank), *feature_order())
