"""The rendered prompts, pinned: a change to a template or to the rendering shows up here
as a diff to review (regenerate with UPDATE_GOLDEN=1 once it is intended), and as a new
prompt hash on every judgment made afterwards."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from labeler.judges.prompting import (
    classify_prompt,
    detect_prompt,
    detection_snippets,
    explain_prompt,
    likelihood_classify_prompt,
    likelihood_detect_prompt,
    system_prompt,
)
from labeler.judges.replies import ClassificationReply, DetectionReply, strict_json_schema
from labeler.run.schemas import Example, FeatureRecord, Snippet
from prompts import SUBCATEGORIES, load_taxonomy, prompt_hash, taxonomy_hash

GOLDEN = Path(__file__).parent / "golden"


def _example(rank: int, kind: str, words: list[str], at: int, act: float) -> Example:
    acts = [0.0] * len(words)
    acts[at] = act
    if at + 1 < len(words):
        acts[at + 1] = round(act / 3, 2)
    return Example(kind=kind, rank=rank, activation=act, tokens=words, acts=acts, highlight=at,
                   domain="math", region="think")  # fmt: skip


def feature() -> FeatureRecord:
    a = ["So", " x", " =", " 4", ".\n\n", "Wait", ",", " let", " me", " check", " that", "."]
    b = ["The", " sum", " is", " 12", ".", " Hmm", ",", " that", " seems", " off", "."]
    c = ["<think>", "\n", "Wait", ",", " the", " question", " asks", " for", " <b>", "."]
    return FeatureRecord(
        feature_id="L3F17", layer=3, index=17, frequency=0.0123, count=456,
        by_domain={"math": 300, "code": 100, "science": 56},
        by_region={"think": 440, "answer": 10, "user_prompt": 6},
        corpus_domain_share={"math": 0.5, "code": 0.3, "science": 0.2},
        top_logits=[" Wait", " Hmm", " But", " Actually"], top_logit_values=[2.5, 1.75, 0.5, 0.25],
        bottom_logits=[" Therefore", " Thus"],
        examples=[_example(0, "top", a, 5, 4.5), _example(1, "top", b, 5, 3.25),
                  _example(2, "top", c, 2, 3.0), _example(0, "random", b, 5, 1.5)],
    )  # fmt: skip


def rendered() -> dict[str, str]:
    f = feature()
    negatives = [Snippet(tokens=["We", " add", " 3", " to", " both", " sides", "."],
                         activating=False)]  # fmt: skip
    snippets = detection_snippets(f.of_kind("top")[:2], negatives, seed=1)
    return {
        "system": system_prompt(),
        "explain": explain_prompt(f, 3).user,
        "classify": classify_prompt(f, 2, 4).user,
        "detect": detect_prompt("'Wait' and 'Hmm' at the start of a self-check.", snippets).user,
        "likelihood_detect": likelihood_detect_prompt("'Wait' at a self-check.", snippets[0]).user,
        "likelihood_classify": likelihood_classify_prompt(
            f, 1, 2, "Which category fits this feature best?"
        ).user,
    }


@pytest.mark.parametrize("name", sorted(rendered()))
def test_rendered_prompt_matches_golden(name: str) -> None:
    text = rendered()[name]
    path = GOLDEN / f"{name}.txt"
    if os.environ.get("UPDATE_GOLDEN"):
        path.write_text(text, encoding="utf-8")
    assert path.exists(), f"{path} missing; run with UPDATE_GOLDEN=1 to create it"
    assert text == path.read_text(encoding="utf-8")


def test_examples_mark_the_activating_token_and_show_activations() -> None:
    text = rendered()["explain"]
    assert "Example 1 (activation 4.50):" in text
    assert "<<Wait>>" in text and "<< Hmm>>" in text
    assert '"Wait" 4.50, "," 1.50' in text  # most active tokens, strongest first


def test_shared_instructions_come_first_and_are_identical_for_every_stage() -> None:
    f = feature()
    prompts = [explain_prompt(f, 3), classify_prompt(f, 2, 4),
               detect_prompt("x", [Snippet(tokens=["a"], activating=True)])]  # fmt: skip
    assert len({p.system for p in prompts}) == 1
    # long enough for providers' automatic prompt caching (1,024 tokens at ~4 chars each)
    assert len(prompts[0].system) / 4 > 1024
    taxonomy = load_taxonomy()
    for key in [*taxonomy.categories, *taxonomy.subcategories, *taxonomy.mechanisms]:
        assert f"- {key}:" in prompts[0].system


def test_detection_positives_are_cut_to_the_negatives_width_and_shuffled() -> None:
    long = _example(0, "top", [f" w{i}" for i in range(80)], 60, 2.0)
    negatives = [Snippet(tokens=["n"] * 32, activating=False) for _ in range(5)]
    snippets = detection_snippets([long] * 5, negatives, seed=0)
    assert sum(s.activating for s in snippets) == 5
    assert all(len(s.tokens) == 32 for s in snippets)
    assert [s.activating for s in snippets] != [True] * 5 + [False] * 5
    assert snippets == detection_snippets([long] * 5, negatives, seed=0)


def test_prompt_hash_covers_templates_not_only_the_taxonomy() -> None:
    assert prompt_hash() != taxonomy_hash()
    assert len(prompt_hash()) == 16


def test_reply_schemas_are_strict_and_follow_the_taxonomy() -> None:
    schema = strict_json_schema(ClassificationReply)
    assert schema["additionalProperties"] is False
    assert sorted(schema["required"]) == sorted(schema["properties"])
    assert set(SUBCATEGORIES) == set(load_taxonomy().subcategories)
    sub = schema["properties"]["subcategory"]["anyOf"][0]["enum"]
    assert sub == list(SUBCATEGORIES)
    assert strict_json_schema(DetectionReply)["required"] == ["activating"]
