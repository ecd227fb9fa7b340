"""The JSON objects an LLM judge is asked for, one per stage, as pydantic models.

They are sent as strict JSON schemas (structured outputs) and every reply is validated
against them, whether or not the server enforced the schema.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from prompts import Category, Confidence, DomainType, Mechanism, Subcategory

MAX_EXPLANATION_WORDS = 30


class ExplanationReply(BaseModel):
    model_config = ConfigDict(extra="forbid")

    explanation: str


class DetectionReply(BaseModel):
    model_config = ConfigDict(extra="forbid")

    activating: list[bool]


class FuzzReply(BaseModel):
    """Per fuzzing example: whether its marks are on the tokens the feature fires on."""

    model_config = ConfigDict(extra="forbid")

    correct: list[bool]


class IntruderReply(BaseModel):
    """Per intruder trial: the window (numbered from 1) that does not belong."""

    model_config = ConfigDict(extra="forbid")

    intruders: list[int]


class ClassificationReply(BaseModel):
    model_config = ConfigDict(extra="forbid")

    category: Category
    subcategory: Subcategory | None
    mechanism: Mechanism | None
    domain_type: DomainType | None
    confidence: Confidence
    rationale: str


@cache
def strict_json_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The model's JSON schema in the strict form structured outputs require: every
    property required, no additional properties (the reply models have no defaults and
    forbid extras, so pydantic's schema already is)."""
    schema = model.model_json_schema()
    schema.pop("title", None)
    for prop in schema.get("properties", {}).values():
        prop.pop("title", None)
    return schema


def check_explanation(text: str) -> str:
    """An explanation as stored: one line, not empty, at most 30 words; raises
    ``ValueError`` with what is wrong."""
    cleaned = " ".join(text.split()).strip().strip('"').strip()
    if not cleaned or not any(c.isalpha() for c in cleaned):
        raise ValueError("the explanation is empty")
    words = len(cleaned.split())
    if words > MAX_EXPLANATION_WORDS:
        raise ValueError(f"the explanation has {words} words, more than {MAX_EXPLANATION_WORDS}")
    return cleaned


def check_intruders(picks: list[int], sizes: list[int]) -> list[int]:
    """The 1-based window numbers of an intruder reply as 0-based indices, one per trial
    of ``sizes`` windows each; raises ``ValueError`` with what is wrong."""
    if len(picks) != len(sizes):
        raise ValueError(f"{len(picks)} answers for {len(sizes)} trials")
    for n, (pick, size) in enumerate(zip(picks, sizes, strict=True), start=1):
        if not 1 <= pick <= size:
            raise ValueError(f"trial {n}: window {pick} is not between 1 and {size}")
    return [pick - 1 for pick in picks]


def validation_reason(exc: ValidationError, text: str | None = None) -> str:
    """What is wrong with a reply, in one line: the first error and where."""
    first = exc.errors()[0]
    if first["type"] == "json_invalid" and text is not None:
        return f"malformed JSON: {text[:80]!r}"
    where = ".".join(str(p) for p in first["loc"]) or "reply"
    return f"{where}: {first['msg']}"
