"""What a reviewer sees of a feature in the review queue and how a decision is recorded;
shared by the terminal review and the browser review.

The queue is the audited features nobody has decided, in audit order (``labeler audit``:
audit id, then draw position), then the disputed features, most informative first. An
audit's estimate uses its decided features in draw order up to the first undecided one,
so the audit goes first and in order. An audited feature nobody has decided is *blind*:
the pages hide the judges' answers until asked, since an audit measures the judges and a
decision made after reading them would measure nothing."""

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

AUDIT = "audit"
"""The reason of an audited feature in the queue."""
BLIND_WHY = "an audit measures the judges; decide before looking"


class AuditPlace(BaseModel):
    """Where a feature stands in an audit's draw order (its first audit, when several
    drew it)."""

    audit_id: int
    position: int = Field(description="1 for the first feature drawn")
    n_drawn: int

    @property
    def text(self) -> str:
        return f"audit {self.audit_id}, {self.position} of {self.n_drawn}"


class QueueItem(BaseModel):
    feature_id: str
    reasons: list[str] = Field(description="'audit' first for an audited feature, then why "
                               "it is disputed")  # fmt: skip
    score: float
    categories: list[str] = Field(description="the judges' votes, judge=category, by judge")
    min_detection: float | None
    decided_by: list[str] = Field(description="reviewers who decided it")
    explanation: str | None = Field(
        None, description="what the preferred judge (a model judge before the heuristic) "
        "says the feature does",
    )  # fmt: skip
    audit: str | None = Field(None, description="its place in an audit, e.g. 'audit 1, 3 of 50'")


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
    resample_confidence: float | None = Field(
        None, description="share of resampled answers agreeing with its category (label "
        "--resamples); null unless asked",
    )  # fmt: skip
    resamples: int | None = Field(None, description="how many resampled answers there were")


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
    audit: AuditPlace | None = Field(None, description="its place in an audit, if drawn")
    blind: bool = Field(
        False, description="audited and nobody has decided it: the judges stay hidden until "
        "the reviewer asks",
    )  # fmt: skip


class UnknownFeature(UserError):
    """A feature id that is not among the run's planned features."""


def review_queue(
    store: LabelStore, rules: DisputeRules, include_decided: bool = False
) -> list[QueueItem]:
    """The audited features in audit order, then the disputed ones, most informative
    first (an audited feature that is disputed too comes once, in the audit part);
    without ``include_decided`` only those nobody has decided yet."""
    judgments = judgment_frame(store)
    disputes = find_disputes(judgments, rules)
    decided = (
        review_frame(store)
        .filter(pl.col("action") == "decide")
        .group_by("feature_id")
        .agg(pl.col("reviewer").unique().sort().alias("decided_by"))
    )
    places = audit_places(store)
    audited = pl.DataFrame({"feature_id": list(places)}, schema={"feature_id": pl.String}).join(
        _votes(judgments.filter(pl.col("feature_id").is_in(list(places)))),
        on="feature_id",
        how="left",
        maintain_order="left",
    )
    disputed = {row["feature_id"]: row for row in disputes.iter_rows(named=True)}
    rows = [
        row
        | {
            "reasons": [AUDIT, *disputed.get(row["feature_id"], {}).get("reasons", [])],
            "score": disputed.get(row["feature_id"], {}).get("score", 0.0),
            "categories": row["categories"] or [],
            "audit": places[row["feature_id"]].text,
        }
        for row in audited.iter_rows(named=True)
    ] + [row for row in disputes.iter_rows(named=True) if row["feature_id"] not in places]
    who = {f: list(r) for f, r in decided.iter_rows()}
    explanations = _explanations(store, [row["feature_id"] for row in rows])
    items = [
        QueueItem(**row | {"decided_by": who.get(row["feature_id"], [])},
                  explanation=explanations.get(row["feature_id"]))
        for row in rows
    ]  # fmt: skip
    return items if include_decided else [i for i in items if not i.decided_by]


def audit_places(store: LabelStore) -> dict[str, AuditPlace]:
    """Every drawn feature's place in the first audit that drew it, in audit order."""
    drawn = store.audits.drawn()
    sizes: dict[int, int] = {}
    for audit_id, _, _ in drawn:
        sizes[audit_id] = sizes.get(audit_id, 0) + 1
    places: dict[str, AuditPlace] = {}
    for audit_id, feature_id, position in drawn:
        places.setdefault(feature_id, AuditPlace(
            audit_id=audit_id, position=position, n_drawn=sizes[audit_id]))  # fmt: skip
    return places


def _votes(judgments: pl.DataFrame) -> pl.DataFrame:
    """Each judged feature's votes (``judge=category``, by judge) and lowest detection,
    as a dispute lists them."""
    return (
        judgments.sort("judge")
        .group_by("feature_id")
        .agg(
            pl.concat_str(
                pl.col("judge"), pl.lit("="),
                pl.when(pl.col("status") == "ok").then(pl.col("category")).otherwise(
                    pl.lit("failed")),
            ).alias("categories"),
            pl.col("detection").min().alias("min_detection"),
        )
    )  # fmt: skip


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
    counts = _resample_counts(store, feature_id)
    answers = sorted(
        (
            JudgeAnswer(
                failure_reason=row["reason"],
                resamples=counts.get(row["judge"]),
                **{k: row[k] for k in JudgeAnswer.model_fields if k in row},
            )
            for row in judgments.iter_rows(named=True)
        ),
        key=lambda a: order[a.judge],
    )
    disputes = find_disputes(judgments, rules)
    reviews = store.reviews(feature_id)
    place = audit_places(store).get(feature_id)
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
        reviews=reviews,
        output_score=_output_score(store, feature_id),
        audit=place,
        blind=place is not None and not any(r.action == "decide" for r in reviews),
    )


def _resample_counts(store: LabelStore, feature_id: str) -> dict[str, int]:
    """Each judge's number of resampled answers for one feature (``label --resamples``)."""
    rows = store.conn.execute(
        "SELECT judge, json_array_length(payload, '$.resamples.categories') FROM judgments "
        "WHERE feature_id = ? AND status = 'ok'",
        (feature_id,),
    )
    return {str(judge): int(n) for judge, n in rows if n is not None}


def _output_score(store: LabelStore, feature_id: str) -> OutputScoreView | None:
    payload = store.output_score(feature_id)
    return None if payload is None else OutputScoreView.model_validate_json(payload)


def reviewers_disagree(reviews: list[ReviewDecision]) -> bool:
    """Whether the reviewers' latest decisions on a feature name different categories."""
    latest = {r.reviewer: r.category for r in reviews if r.action == "decide"}
    return len(set(latest.values())) > 1


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
