"""What a reviewer sees of a disputed feature and how a decision is recorded; shared by
the terminal review and the browser review."""

from __future__ import annotations

import polars as pl
from pydantic import BaseModel, Field, ValidationError

from adapters.errors import UserError, first_error
from labeler.labeling.store import LabelStore
from labeler.reporting.disputes import DisputeRules, find_disputes
from labeler.reporting.label_table import judge_names, judgment_frame, review_frame
from labeler.run.data import RunData
from labeler.run.schemas import Example, ReviewDecision


class QueueItem(BaseModel):
    feature_id: str
    reasons: list[str]
    score: float
    categories: str = Field(description="the judges' votes, judge=category joined by '; '")
    min_detection: float | None
    decided_by: list[str] = Field(description="reviewers who decided it")


class JudgeAnswer(BaseModel):
    judge: str
    status: str
    failure_reason: str | None
    explanation: str | None
    category: str | None
    subcategory: str | None
    mechanism: str | None
    domain_type: str | None
    confidence: str | None
    rationale: str | None
    detection: float | None


class FeatureView(BaseModel):
    feature_id: str
    layer: int
    index: int
    frequency: float
    count: int
    top_logits: list[str]
    top_logit_values: list[float]
    bottom_logits: list[str]
    examples: list[Example]
    reasons: list[str] = Field(description="why it is disputed (empty if it is not)")
    judges: list[JudgeAnswer]
    reviews: list[ReviewDecision]


class UnknownFeature(UserError):
    """A feature id that is not among the run's planned features."""


def review_queue(
    store: LabelStore, rules: DisputeRules, include_decided: bool = False
) -> list[QueueItem]:
    """Disputed features, most informative first; without ``include_decided`` only those
    nobody has decided yet."""
    disputes = find_disputes(judgment_frame(store), rules)
    decided = (
        review_frame(store)
        .filter(pl.col("action") == "decide")
        .group_by("feature_id")
        .agg(pl.col("reviewer").unique().sort().alias("decided_by"))
    )
    rows = disputes.join(decided, on="feature_id", how="left", maintain_order="left")
    items = [
        QueueItem(**row | {"decided_by": row["decided_by"] or []})
        for row in rows.iter_rows(named=True)
    ]
    return items if include_decided else [i for i in items if not i.decided_by]


def feature_view(
    run: RunData, store: LabelStore, feature_id: str, rules: DisputeRules
) -> FeatureView:
    """Everything about one planned feature; UnknownFeature if it is not planned."""
    if not store.is_planned(feature_id):
        raise UnknownFeature(
            f"{feature_id!r} is not a feature planned for labeling in {run.folder}"
        )
    record = run.records([feature_id])[0]
    judgments = judgment_frame(store, full=True, feature_id=feature_id)
    order = {name: i for i, name in enumerate(judge_names(judgments))}
    answers = sorted(
        (
            JudgeAnswer(
                failure_reason=row["reason"],
                **{k: row[k] for k in JudgeAnswer.model_fields if k in row},
            )
            for row in judgments.iter_rows(named=True)
        ),
        key=lambda a: order[a.judge],
    )
    disputes = find_disputes(judgments, rules)
    return FeatureView(
        feature_id=feature_id,
        layer=record.layer,
        index=record.index,
        frequency=record.frequency,
        count=record.count,
        top_logits=record.top_logits,
        top_logit_values=record.top_logit_values,
        bottom_logits=record.bottom_logits,
        examples=record.examples,
        reasons=disputes["reasons"].to_list()[0] if disputes.height else [],
        judges=answers,
        reviews=store.reviews(feature_id),
    )


def record_decision(store: LabelStore, fields: dict[str, object]) -> ReviewDecision:
    """Validate and append a decision; UserError naming the field when it is not valid,
    UnknownFeature when the feature is not planned."""
    try:
        decision = ReviewDecision.model_validate(fields)
    except ValidationError as exc:
        field, message = first_error(exc)
        raise UserError(f"review decision: {field + ': ' if field else ''}{message}") from None
    if not store.is_planned(decision.feature_id):
        raise UnknownFeature(
            f"{decision.feature_id!r} is not a feature planned for labeling in {store.path.parent}"
        )
    return store.add_review(decision)
