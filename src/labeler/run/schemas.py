"""Records that cross a boundary: what a judge sees, what it returns, what is exported."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from prompts import Category, Confidence, DomainType, Mechanism, Subcategory, load_taxonomy

JUDGMENT_SCHEMA_VERSION = 4
CATALOG_SCHEMA_VERSION = 2


class Example(BaseModel):
    """One activating example: a window of tokens with the feature's activation on each."""

    model_config = ConfigDict(extra="forbid")

    kind: str = Field(description="'top', 'random' or 'quantile'")
    rank: int = Field(description="order within the kind (within the quantile for 'quantile')")
    quantile: int | None = Field(None, description="activation quantile, 0 lowest")
    activation: float
    tokens: list[str]
    acts: list[float]
    highlight: int = Field(description="index in tokens of the activating token")
    domain: str
    region: str


class Snippet(BaseModel):
    """A window of corpus text used in detection scoring."""

    model_config = ConfigDict(extra="forbid")

    tokens: list[str]
    activating: bool


class FeatureRecord(BaseModel):
    """Everything a judge may look at for one feature."""

    model_config = ConfigDict(extra="forbid")

    feature_id: str
    layer: int
    index: int
    frequency: float
    count: int
    by_domain: dict[str, int]
    by_region: dict[str, int]
    corpus_domain_share: dict[str, float] = Field(description="share of corpus tokens per domain")
    top_logits: list[str]
    top_logit_values: list[float]
    bottom_logits: list[str]
    examples: list[Example]
    steering_promotes: list[str] = Field(
        default_factory=list,
        description="the tokens whose probability rose most when the feature was steered "
        "(`labeler score-outputs`); empty where it has not run",
    )

    def of_kind(self, kind: str) -> list[Example]:
        """The examples of one kind in order (quantile samples: highest quantile first)."""
        chosen = (e for e in self.examples if e.kind == kind)
        return sorted(chosen, key=lambda e: (-(e.quantile or 0), e.rank))


class Classification(BaseModel):
    """A feature's place in the paper's taxonomy, validated against it."""

    model_config = ConfigDict(extra="forbid")

    category: Category
    subcategory: str | None = None
    mechanism: Mechanism | None = None
    domain_type: DomainType | None = None
    confidence: Confidence
    rationale: str

    @model_validator(mode="after")
    def _consistent(self) -> Classification:
        taxonomy = load_taxonomy()
        if self.category == "reasoning":
            if self.subcategory not in taxonomy.subcategories:
                raise ValueError(
                    f"subcategory {self.subcategory!r} is not one of "
                    f"{sorted(taxonomy.subcategories)}"
                )
            if self.mechanism is None:
                raise ValueError("a reasoning feature needs a mechanism")
        elif self.subcategory is not None or self.mechanism is not None:
            raise ValueError("only reasoning features have a subcategory and a mechanism")
        if (self.category == "domain") != (self.domain_type is not None):
            raise ValueError("domain features, and only they, have a domain_type")
        return self


class DetectionScore(BaseModel):
    """How well the explanation tells activating snippets from non-activating ones."""

    model_config = ConfigDict(extra="forbid")

    accuracy: float | None = Field(description="null when a class is missing (``undefined``)")
    precision: float | None = Field(description="null when a class is missing (``undefined``)")
    recall: float | None = Field(description="null without activating examples")
    n_positive: int
    n_negative: int
    undefined: str | None = Field(
        None,
        description="why accuracy and precision are null: no non-activating or no "
        "activating examples were scored (accuracy over one class says nothing)",
    )
    auroc: float | None = Field(
        None, description="from the judge's probability of 'active', where the backend yields one"
    )
    f1: float | None = Field(
        None,
        description="2 tp / (2 tp + fp + fn); null when a class is missing (``undefined``) "
        "and in judgments stored before it was computed",
    )
    balanced_accuracy: float | None = Field(
        None,
        description="the mean of the true-positive and true-negative rates (0.5 for answers "
        "independent of the truth); null when a class is missing or stored before",
    )
    auprc: float | None = Field(
        None,
        description="average precision (step-wise, not interpolated) from the judge's "
        "probability of 'active', where the backend yields one; null when a class is "
        "missing or stored before",
    )


class IntruderScore(BaseModel):
    """How often the odd window out was found among the feature's windows
    (``judges.scorers``), against chance."""

    model_config = ConfigDict(extra="forbid")

    n_trials: int
    n_correct: int
    n_choices: int = Field(description="windows per trial; chance is one in this")
    chance: float
    accuracy: float | None = Field(description="n_correct / n_trials; null without trials")
    interval: list[float] | None = Field(
        None, description="95% Wilson interval of the accuracy [low, high]"
    )
    p_value: float | None = Field(
        None, description="exact one-sided binomial p-value of the accuracy against chance"
    )


class Resampling(BaseModel):
    """The classifier asked again on resampled subsets of the examples (``label
    --resamples K``): how stable the label is."""

    model_config = ConfigDict(extra="forbid")

    categories: list[Category] = Field(description="the category of each resampled answer")
    confidence: float = Field(
        ge=0.0,
        le=1.0,
        description="share of the resampled answers that agree with the label's category",
    )
    mode: Category = Field(description="the most common resampled category")
    mode_share: float = Field(ge=0.0, le=1.0, description="share of answers giving the mode")


class Usage(BaseModel):
    """Tokens that calls used, as the provider reported them."""

    model_config = ConfigDict(extra="forbid")

    calls: int = 0
    input_tokens: int = Field(0, description="input tokens not read from or written to a cache")
    cached_tokens: int = Field(0, description="input tokens read from the provider's cache")
    cache_write_tokens: int = Field(0, description="input tokens written to the cache")
    output_tokens: int = Field(0, description="output tokens, reasoning tokens included")
    cached_replies: int = Field(
        0, description="requests answered from the reply cache, at no cost (not in calls)"
    )

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            calls=self.calls + other.calls,
            cached_replies=self.cached_replies + other.cached_replies,
            input_tokens=self.input_tokens + other.input_tokens,
            cached_tokens=self.cached_tokens + other.cached_tokens,
            cache_write_tokens=self.cache_write_tokens + other.cache_write_tokens,
            output_tokens=self.output_tokens + other.output_tokens,
        )

    @property
    def total_input(self) -> int:
        return self.input_tokens + self.cached_tokens + self.cache_write_tokens


class Judgment(BaseModel):
    """One judge's explanation, detection scores and classification of one feature."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int = JUDGMENT_SCHEMA_VERSION
    feature_id: str
    judge: str
    prompt_hash: str
    explanation: str
    detection: DetectionScore
    detection_by_set: dict[str, DetectionScore]
    classification: Classification
    fuzz: DetectionScore | None = Field(
        None, description="the fuzzing scorer's: 'marked right' is the truth; null unless asked"
    )
    intruder: IntruderScore | None = Field(
        None, description="the intruder scorer's; null unless asked"
    )
    resamples: Resampling | None = Field(
        None, description="the classifier on resampled examples; null unless asked"
    )
    usage: dict[str, Usage] = Field(
        default_factory=dict,
        description="tokens per stage: explain, detect, classify (fuzz, intruder)",
    )
    cost_usd: float | None = Field(None, description="None where the model has no price")


class ReviewDecision(BaseModel):
    """A person's decision on a feature: appended to the store, never overwritten.

    ``action`` is ``decide`` (a label) or ``skip`` (looked at, left undecided)."""

    model_config = ConfigDict(extra="forbid")

    feature_id: str
    reviewer: str = Field(min_length=1, pattern=r"\S", description="who decided")
    action: Literal["decide", "skip"] = "decide"
    category: Category | None = None
    subcategory: Subcategory | None = None
    mechanism: Mechanism | None = None
    domain_type: DomainType | None = None
    note: str = ""
    decided_at: str = Field("", description="UTC, ISO 8601; set by the store when empty")

    @model_validator(mode="after")
    def _consistent(self) -> ReviewDecision:
        if self.action == "skip":
            if self.category is not None:
                raise ValueError("a skip carries no category")
            return self
        if self.category is None:
            raise ValueError("a decision needs a category")
        if self.category != "reasoning" and (self.subcategory or self.mechanism):
            raise ValueError("only reasoning features have a subcategory and a mechanism")
        if self.category != "domain" and self.domain_type is not None:
            raise ValueError("only domain features have a domain_type")
        return self
