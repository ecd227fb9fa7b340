"""Rendering the templates of ``prompts/templates`` into the prompts a judge sends.

The shared instructions (``system``) are the same for every call of every stage, and
the feature's data comes last, so a provider's prompt cache can serve the prefix.
"""

from __future__ import annotations

import random
from functools import cache
from typing import TYPE_CHECKING

from labeler.judges.backend import Prompt
from labeler.run.schemas import Example, FeatureRecord, Snippet
from prompts import load_taxonomy, load_template

if TYPE_CHECKING:  # scorers builds its items with this module's window sizes
    from labeler.judges.scorers import FuzzItem, IntruderTrial

CONTEXT_BEFORE = 24
CONTEXT_AFTER = 8
N_ACTIVE_SHOWN = 5
SNIPPET_BEFORE = 20
SNIPPET_AFTER = 11
REGION_NAMES = {
    "user_prompt": "user prompt",
    "think": "thinking",
    "answer": "answer",
}


def _bullets(items: dict[str, str]) -> str:
    return "\n".join(f"- {key}: {text}" for key, text in items.items())


@cache
def system_prompt() -> str:
    taxonomy = load_taxonomy()
    return load_template("system").substitute(
        categories=_bullets(taxonomy.categories),
        subcategories=_bullets(taxonomy.subcategories),
        mechanisms=_bullets(taxonomy.mechanisms),
        domain_types=_bullets(taxonomy.domain_types),
    )


def _visible(token: str) -> str:
    return token.replace("\n", "\\n")


def render_example(number: int, example: Example) -> str:
    """One example: its window with the activating token marked ``<<token>>``, and the
    most active tokens with their activations."""
    lo = max(0, example.highlight - CONTEXT_BEFORE)
    hi = min(len(example.tokens), example.highlight + CONTEXT_AFTER + 1)
    text = "".join(
        f"<<{_visible(t)}>>" if i == example.highlight else _visible(t)
        for i, t in enumerate(example.tokens[lo:hi], start=lo)
    )
    active = sorted(
        ((a, i) for i, a in enumerate(example.acts[lo:hi], start=lo) if a > 0), reverse=True
    )[:N_ACTIVE_SHOWN]
    listed = ", ".join(f'"{_visible(example.tokens[i]).strip()}" {a:.2f}' for a, i in active)
    return (
        f"Example {number} (activation {example.activation:.2f}):\n{text}\n"
        f"Active tokens: {listed or 'none shown'}"
    )


def render_examples(examples: list[Example]) -> str:
    return "\n\n".join(render_example(n, e) for n, e in enumerate(examples, start=1))


def _quoted(tokens: list[str]) -> str:
    return ", ".join(f'"{_visible(t)}"' for t in tokens) or "(none)"


def _with_values(tokens: list[str], values: list[float]) -> str:
    if len(values) < len(tokens):
        return _quoted(tokens)
    return ", ".join(f'"{_visible(t)}" {v:+.3g}' for t, v in zip(tokens, values, strict=False))


def _shares(counts: dict[str, int]) -> str:
    total = sum(counts.values())
    if not total:
        return "none"
    ordered = sorted(counts.items(), key=lambda kv: -kv[1])
    return ", ".join(
        f"{REGION_NAMES.get(k, k.replace('_', ' '))} {n / total:.0%}" for k, n in ordered if n
    )


def explain_prompt(
    feature: FeatureRecord, n_examples: int, explain_from: tuple[str, ...] = ("examples",)
) -> Prompt:
    """The explainer's request, from the feature's top examples and, with ``outputs`` in
    ``explain_from``, from what it does to the output: its logit lens with values and,
    where ``labeler score-outputs`` has run, the tokens steering it promotes
    (output-centric descriptions, Gur-Arieh et al., ACL 2025)."""
    parts: list[str] = []
    if "examples" in explain_from:
        examples = feature.of_kind("top")[:n_examples]
        parts.append(
            f"Its {len(examples)} most strongly activating examples:\n\n"
            + render_examples(examples)
        )
    if "outputs" in explain_from:
        parts.append(render_outputs(feature))
    user = load_template("explain").substitute(
        feature_id=feature.feature_id, layer=feature.layer, evidence="\n\n".join(parts)
    )
    return Prompt("explain", system_prompt(), user)


OUTPUT_TOKENS_SHOWN = 10


def render_outputs(feature: FeatureRecord) -> str:
    """What the feature does to the output, for the explainer."""
    n = OUTPUT_TOKENS_SHOWN
    lines = [
        "What it does to the model's output:",
        "Promoted tokens (logit lens, with values): "
        + _with_values(feature.top_logits[:n], feature.top_logit_values),
        f"Suppressed tokens (logit lens): {_quoted(feature.bottom_logits[:n])}",
    ]
    if feature.steering_promotes:
        lines.append(
            "Tokens made more likely when the feature is steered: "
            + _quoted(feature.steering_promotes[:n])
        )
    return "\n".join(lines)


def classify_prompt(feature: FeatureRecord, n_examples: int, n_logits: int) -> Prompt:
    examples = feature.of_kind("top")[:n_examples]
    user = load_template("classify").substitute(
        feature_id=feature.feature_id,
        layer=feature.layer,
        frequency=f"{feature.frequency:.4%}",
        regions=_shares(feature.by_region),
        domains=_shares(feature.by_domain),
        n_logits=n_logits,
        top_logits=_with_values(feature.top_logits[:n_logits], feature.top_logit_values),
        bottom_logits=_quoted(feature.bottom_logits[:n_logits]),
        n_examples=len(examples),
        examples=render_examples(examples),
    )
    return Prompt("classify", system_prompt(), user)


def snippet_text(tokens: list[str]) -> str:
    return "".join(_visible(t) for t in tokens).strip()


def detection_snippets(
    positives: list[Example], negatives: list[Snippet], seed: int
) -> list[Snippet]:
    """Positives cut to the negatives' width around the activating token (so length
    gives nothing away), mixed with the negatives in a seeded random order."""
    snippets = [
        Snippet(
            tokens=e.tokens[max(0, e.highlight - SNIPPET_BEFORE) : e.highlight + SNIPPET_AFTER + 1],
            activating=True,
        )
        for e in positives
    ] + list(negatives)
    random.Random(seed).shuffle(snippets)
    return snippets


def detect_prompt(explanation: str, snippets: list[Snippet]) -> Prompt:
    listed = "\n".join(
        f"Snippet {n}: {snippet_text(s.tokens)}" for n, s in enumerate(snippets, start=1)
    )
    user = load_template("detect").substitute(
        explanation=explanation, snippets=listed, n_snippets=len(snippets)
    )
    return Prompt("detect", system_prompt(), user)


def likelihood_detect_prompt(explanation: str, snippet: Snippet) -> Prompt:
    user = load_template("likelihood_detect").substitute(
        explanation=explanation, snippet=snippet_text(snippet.tokens)
    )
    return Prompt("detect", system_prompt(), user)


def likelihood_classify_prompt(
    feature: FeatureRecord, n_examples: int, n_logits: int, question: str
) -> Prompt:
    examples = feature.of_kind("top")[:n_examples]
    user = load_template("likelihood_classify").substitute(
        feature_id=feature.feature_id,
        layer=feature.layer,
        top_logits=_quoted(feature.top_logits[:n_logits]),
        n_examples=len(examples),
        examples=render_examples(examples),
        question=question,
    )
    return Prompt("classify", system_prompt(), user)


# -- the scorers beyond detection (``judges.scorers``) ---------------------------------------


def marked_text(tokens: list[str], marked: list[int]) -> str:
    """A fuzzing example's text with each marked token wrapped ``<<token>>``, as the
    explanation prompt marks the activating one."""
    at = set(marked)
    return "".join(
        f"<<{_visible(t)}>>" if i in at else _visible(t) for i, t in enumerate(tokens)
    ).strip()


def fuzz_prompt(explanation: str, items: list[FuzzItem]) -> Prompt:
    """The explanation and the fuzzing examples, numbered, their marks shown."""
    listed = "\n".join(
        f"Example {n}: {marked_text(it.tokens, it.marked)}" for n, it in enumerate(items, start=1)
    )
    user = load_template("fuzz").substitute(
        explanation=explanation, examples=listed, n_examples=len(items)
    )
    return Prompt("fuzz", system_prompt(), user)


def _windows(windows: list[list[str]]) -> str:
    return "\n".join(f"Window {n}: {snippet_text(w)}" for n, w in enumerate(windows, start=1))


def intruder_prompt(trials: list[IntruderTrial]) -> Prompt:
    """The trials' windows, numbered from 1 within each trial; no explanation and no
    marks (the scorer tests the feature's coherence, not its description)."""
    listed = "\n\n".join(
        f"Trial {t}:\n{_windows(trial.windows)}" for t, trial in enumerate(trials, start=1)
    )
    size = max((len(trial.windows) for trial in trials), default=0)
    user = load_template("intruder").substitute(trials=listed, n_trials=len(trials), size=size)
    return Prompt("intruder", system_prompt(), user)


def likelihood_fuzz_prompt(explanation: str, item: FuzzItem) -> Prompt:
    user = load_template("likelihood_fuzz").substitute(
        explanation=explanation, example=marked_text(item.tokens, item.marked)
    )
    return Prompt("fuzz", system_prompt(), user)


def likelihood_intruder_prompt(trial: IntruderTrial) -> Prompt:
    user = load_template("likelihood_intruder").substitute(
        windows=_windows(trial.windows), size=len(trial.windows)
    )
    return Prompt("intruder", system_prompt(), user)
