"""The label taxonomy and prompt templates, shipped as package data.

Every judgment records ``prompt_hash``: a content hash of the taxonomy and templates it
was made with, so labels made under different instructions are never silently mixed.
"""

from __future__ import annotations

import hashlib
import json
import string
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Literal

Category = Literal["reasoning", "domain", "language", "uninterpretable"]
Subcategory = Literal[
    "hesitation", "self_correction", "verification", "planning", "answer_template", "other"
]
Mechanism = Literal["output", "input_simple", "input_abstract"]
DomainType = Literal["math", "science", "code"]
Confidence = Literal["high", "medium", "low"]

CATEGORIES: tuple[Category, ...] = ("reasoning", "domain", "language", "uninterpretable")
SUBCATEGORIES: tuple[Subcategory, ...] = (
    "hesitation",
    "self_correction",
    "verification",
    "planning",
    "answer_template",
    "other",
)
MECHANISMS: tuple[Mechanism, ...] = ("output", "input_simple", "input_abstract")
DOMAIN_TYPES: tuple[DomainType, ...] = ("math", "science", "code")
CONFIDENCES: tuple[Confidence, ...] = ("high", "medium", "low")


@dataclass(frozen=True)
class Taxonomy:
    """The paper's label taxonomy with descriptions and the heuristic judge's cue words."""

    version: str
    categories: dict[str, str]
    subcategories: dict[str, str]
    mechanisms: dict[str, str]
    domain_types: dict[str, str]
    cue_words: dict[str, dict[str, list[str]]]

    def cue_index(self) -> dict[str, tuple[str, str]]:
        """Map a normalized cue word to its (category, subcategory or domain type)."""
        index: dict[str, tuple[str, str]] = {}
        for category, groups in self.cue_words.items():
            for group, words in groups.items():
                for word in words:
                    index.setdefault(normalize_token(word), (category, group))
        return index


def _read_text(name: str) -> str:
    return resources.files(__name__).joinpath(name).read_text(encoding="utf-8")


@cache
def load_taxonomy() -> Taxonomy:
    data = json.loads(_read_text("taxonomy.json"))
    return Taxonomy(
        version=str(data["version"]),
        categories=dict(data["categories"]),
        subcategories=dict(data["subcategories"]),
        mechanisms=dict(data["mechanisms"]),
        domain_types=dict(data["domain_types"]),
        cue_words={k: dict(v) for k, v in data["cue_words"].items()},
    )


def content_hash(*names: str) -> str:
    """A short sha256 over the named package-data files, in the order given."""
    digest = hashlib.sha256()
    for name in names:
        digest.update(name.encode())
        digest.update(b"\0")
        digest.update(_read_text(name).encode("utf-8"))
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def taxonomy_hash() -> str:
    return content_hash("taxonomy.json")


TEMPLATES = (
    "system",
    "explain",
    "detect",
    "classify",
    "likelihood_detect",
    "likelihood_classify",
    "fuzz",
    "intruder",
    "likelihood_fuzz",
    "likelihood_intruder",
)


@cache
def load_template(name: str) -> string.Template:
    """A prompt template (``templates/NAME.txt``) with ``$placeholders``."""
    if name not in TEMPLATES:
        raise KeyError(f"no prompt template {name!r}; templates: {', '.join(TEMPLATES)}")
    return string.Template(_read_text(f"templates/{name}.txt"))


def prompt_hash() -> str:
    """The content hash of the taxonomy and every template: stored on each LLM judgment."""
    return content_hash("taxonomy.json", *(f"templates/{name}.txt" for name in TEMPLATES))


def normalize_token(text: str) -> str:
    """How tokens are compared with cue words: whitespace and a leading backslash
    stripped, lower case ("ĠWait" decoded as " Wait" becomes "wait", "\\frac" "frac")."""
    return text.strip().lstrip("\\").lower()
