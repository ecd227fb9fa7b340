"""What a reviewer sees of a disputed feature and how a decision is recorded; shared by
the terminal review and the browser review."""

from __future__ import annotations

import json

import polars as pl
from pydantic import BaseModel, Field, ValidationError

from collectors.run_format import EXAMPLES
from labeler.errors import UserError, first_error
from labeler.labeling.store import LabelStore
from labeler.reporting.disputes import DisputeRules, find_disputes
from labeler.reporting.label_table import HEURISTIC, judge_names, judgment_frame, review_frame
from labeler.review.tokens import REPLACEMENT, Pieces, shown_tokens
from labeler.run.data import RunData
from labeler.run.schemas import Example, ReviewDecision


class QueueItem(BaseModel):
    feature_id: str
    reasons: list[str]
    score: float
    categories: list[str] = Field(description="the judges' votes, judge=category, by judge")
    min_detection: float | None
    decided_by: list[str] = Field(description="reviewers who decided it")
    explanation: str | None = Field(
        None, description="what the preferred judge (a model judge before the heuristic) "
        "says the feature does",
    )  # fmt: skip


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


class ShownExample(Example):
    shown: list[str] = Field(description="each token as a reviewer reads it (review.tokens)")


class OutputScoreView(BaseModel):
    """A feature's output score (``labeler score-outputs``), as the page shows it."""

    size: float
    tokens: list[str]
    logprob_change: float
    kl: float
    p_value: float
    significant: bool
    promoted: list[str]


class FeatureView(BaseModel):
    feature_id: str
    layer: int
    index: int
    frequency: float
    count: int
    top_logits: list[str]
    top_logits_shown: list[str]
    top_logit_values: list[float]
    bottom_logits: list[str]
    bottom_logits_shown: list[str]
    examples: list[ShownExample]
    reasons: list[str] = Field(description="why it is disputed (empty if it is not)")
    judges: list[JudgeAnswer]
    reviews: list[ReviewDecision]
    output_score: OutputScoreView | None = None


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
    explanations = _explanations(store, rows["feature_id"].to_list())
    items = [
        QueueItem(**row | {"decided_by": row["decided_by"] or []},
                  explanation=explanations.get(row["feature_id"]))
        for row in rows.iter_rows(named=True)
    ]  # fmt: skip
    return items if include_decided else [i for i in items if not i.decided_by]


def _explanations(store: LabelStore, feature_ids: list[str]) -> dict[str, str]:
    """Each of these features' explanation by its preferred judge: a model judge (by
    name) before the heuristic."""
    rows = store.conn.execute(
        "SELECT feature_id, judge, payload ->> '$.explanation' FROM judgments "
        "WHERE status = 'ok' AND feature_id IN (SELECT value FROM json_each(?)) "
        "ORDER BY feature_id, judge = ?, judge",
        (json.dumps(feature_ids), HEURISTIC),
    )
    chosen: dict[str, str] = {}
    for feature_id, _, explanation in rows:
        if explanation and feature_id not in chosen:
            chosen[feature_id] = str(explanation)
    return chosen


def _shown_examples(
    run: RunData, feature_id: str, layer: int, index: int, examples: list[Example]
) -> list[ShownExample]:
    """The examples with their tokens as shown; a token kept only as ``�`` gets its bytes
    from the tokenizer's pieces, when the adapter's tokenizer is at hand."""
    ids: dict[tuple[str, int, int | None], list[int]] = {}
    pieces = Pieces({})
    if any(REPLACEMENT in t for e in examples for t in e.tokens):
        pieces = Pieces.near(run.info.adapter_path)
        if pieces:
            rows = (
                pl.scan_parquet(run.folder / EXAMPLES)
                .filter(  # layer and index first: the file is in their order
                    pl.col("layer") == layer,
                    pl.col("index") == index,
                    pl.col("feature_id") == feature_id,
                )
                .select("kind", "rank", "quantile", "token_ids")
                .collect()
            )
            ids = {(k, r, q): t for k, r, q, t in rows.iter_rows()}
    shown = []
    for example in examples:
        token_ids = ids.get((example.kind, example.rank, example.quantile))
        known = pieces.of(token_ids) if token_ids is not None else None
        shown.append(
            ShownExample(**example.model_dump(), shown=shown_tokens(example.tokens, known))
        )
    return shown


def _shown_lens(run: RunData, feature_id: str, side: str, tokens: list[str]) -> list[str]:
    """One side of the logit lens as shown (``side``: top or bottom)."""
    known = None
    if any(REPLACEMENT in t for t in tokens) and (pieces := Pieces.near(run.info.adapter_path)):
        column = f"{side}_logit_ids"
        if column in run.features.columns:
            row = run.features.filter(pl.col("feature_id") == feature_id)
            if row.height:
                known = pieces.of(row[column][0].to_list())
    return shown_tokens(tokens, known)


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
        top_logits_shown=_shown_lens(run, feature_id, "top", record.top_logits),
        top_logit_values=record.top_logit_values,
        bottom_logits=record.bottom_logits,
        bottom_logits_shown=_shown_lens(run, feature_id, "bottom", record.bottom_logits),
        examples=_shown_examples(run, feature_id, record.layer, record.index, record.examples),
        reasons=disputes["reasons"].to_list()[0] if disputes.height else [],
        judges=answers,
        reviews=store.reviews(feature_id),
        output_score=_output_score(store, feature_id),
    )


def _output_score(store: LabelStore, feature_id: str) -> OutputScoreView | None:
    payload = store.output_score(feature_id)
    return None if payload is None else OutputScoreView.model_validate_json(payload)


def record_decision(store: LabelStore, fields: dict[str, object]) -> ReviewDecision:
    """Validate and append a decision; UserError naming the field when it is not valid,
    UnknownFeature when the feature is not planned."""
    return record_decision_once(store, fields, None)[0]


def record_decision_once(
    store: LabelStore, fields: dict[str, object], request_key: str | None
) -> tuple[ReviewDecision, bool]:
    """:func:`record_decision` for a request the sender names ``request_key``: a request
    sent again with the same key stores nothing and gets the decision stored the first
    time (and False: not stored now)."""
    try:
        decision = ReviewDecision.model_validate(fields)
    except ValidationError as exc:
        field, message = first_error(exc)
        raise UserError(f"review decision: {field + ': ' if field else ''}{message}") from None
    if not store.is_planned(decision.feature_id):
        raise UnknownFeature(
            f"{decision.feature_id!r} is not a feature planned for labeling in {store.path.parent}"
        )
    return store.add_review(decision, request_key)
