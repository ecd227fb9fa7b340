"""The scorers beyond detection: fuzzing and intruder, as the field runs them.

- **Fuzzing** (as in EleutherAI's delphi, Paulo et al. 2024, "Automatically Interpreting
  Millions of Features in Large Language Models"): the feature's own examples are shown
  with tokens marked; in half of them the marks sit on the tokens where the feature
  fires, in the other half on as many other tokens of the same window. Given the
  explanation, the model says for each example whether the marks are right. An
  explanation that says *where* the feature fires scores high; one that only names the
  topic does not. Scored like detection (``judges.metrics``): the truth is "marked
  right".
- **Intruder** (word intrusion, Chang et al. 2009, "Reading Tea Leaves"; for features
  as in delphi): trials of ``INTRUDER_SIZE`` windows, all but one where the feature
  fires and one corpus window checked not to activate it, without marks and without the
  explanation. The model picks the window that does not belong. It tests whether the
  feature is coherent at all, whatever its explanation says; chance is one in
  ``INTRUDER_SIZE``, and the score carries an exact binomial p-value against chance and
  a Wilson interval.

Both sets are built here from the feature record and a seed, so every judge (the
heuristic, an LLM, the fake server's oracle) sees the same items.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal, get_args

from labeler.errors import UserError
from labeler.judges.prompting import SNIPPET_AFTER, SNIPPET_BEFORE
from labeler.run.schemas import Example, FeatureRecord, IntruderScore, Snippet

Scorer = Literal["detection", "fuzz", "intruder"]
SCORERS: tuple[Scorer, ...] = get_args(Scorer)
DEFAULT_SCORERS: tuple[Scorer, ...] = ("detection",)

FUZZ_PER_SET = 5
"""Examples of each kind (top, random) in a fuzzing set; half of all are fuzzed."""
INTRUDER_SIZE = 5
"""Windows per intruder trial: ``INTRUDER_SIZE - 1`` of the feature's and one intruder."""
INTRUDER_TRIALS = 5
Z_95 = 1.959963984540054


def parse_scorers(text: str | Iterable[str]) -> tuple[Scorer, ...]:
    """Scorers from ``detection,fuzz,intruder`` (any order, detection required: it is part
    of every judgment); unknown names are refused naming the option."""
    names = [s.strip() for s in (text.split(",") if isinstance(text, str) else text)]
    names = [n for n in names if n]
    unknown = [n for n in names if n not in SCORERS]
    if unknown:
        raise UserError(
            f"--scorers: unknown scorer {unknown[0]!r}; choose from {', '.join(SCORERS)}"
        )
    if "detection" not in names:
        raise UserError(
            "--scorers: detection is part of every judgment; write e.g. --scorers "
            "detection,fuzz,intruder"
        )
    return tuple(s for s in SCORERS if s in names)


def scorers_of(judges: Iterable[object]) -> tuple[Scorer, ...]:
    """The scorers the judges were built with (``scorers`` of each; detection alone for
    a judge that has none), in the fixed order."""
    asked = {s for judge in judges for s in getattr(judge, "scorers", DEFAULT_SCORERS)}
    return tuple(s for s in SCORERS if s in asked)


EVIDENCE = ("examples", "outputs")


def parse_explain_from(text: str) -> tuple[Literal["examples", "outputs"], ...]:
    """``examples``, ``outputs`` or both (``examples,outputs``), in that order."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in EVIDENCE]
    if unknown or not names:
        raise UserError(
            f"--explain-from: {'unknown ' + repr(unknown[0]) if unknown else 'empty'}; "
            "write examples, outputs or examples,outputs"
        )
    return tuple(e for e in ("examples", "outputs") if e in names)


def explained_hash(prompt_hash: str, explain_from: tuple[str, ...]) -> str:
    """A judge's prompt hash, marked when its explanations are not made from the examples
    alone, so that labels made from different evidence are never mixed."""
    return (
        prompt_hash
        if tuple(explain_from) == ("examples",)
        else (f"{prompt_hash}+{'+'.join(explain_from)}")
    )


def window(example: Example) -> tuple[list[str], list[float]]:
    """The example's tokens and activations cut as detection cuts its positives."""
    lo = max(0, example.highlight - SNIPPET_BEFORE)
    hi = example.highlight + SNIPPET_AFTER + 1
    return example.tokens[lo:hi], example.acts[lo:hi]


# -- fuzzing ------------------------------------------------------------------------------


@dataclass(frozen=True)
class FuzzItem:
    """One example as a fuzzing prompt shows it: ``marked`` are the indices in
    ``tokens`` carrying marks; ``correct`` whether they are the activating ones."""

    tokens: list[str]
    marked: list[int]
    correct: bool


def fuzz_items(feature: FeatureRecord, seed: int) -> list[FuzzItem]:
    """The feature's fuzzing set: up to ``FUZZ_PER_SET`` top and random examples each,
    half of them (rounded down) with their marks moved to as many non-activating tokens
    of the same window, in a seeded order. An example without a non-activating token
    keeps its true marks."""
    rng = random.Random(seed * 7919 + feature.layer * 1_000_003 + feature.index + 17)
    examples = [e for kind in ("top", "random") for e in feature.of_kind(kind)[:FUZZ_PER_SET]]
    to_fuzz = set(rng.sample(range(len(examples)), len(examples) // 2))
    items: list[FuzzItem] = []
    for n, example in enumerate(examples):
        tokens, acts = window(example)
        active = [i for i, a in enumerate(acts) if a > 0]
        if not active:
            active = [example.highlight - max(0, example.highlight - SNIPPET_BEFORE)]
        quiet = [i for i in range(len(tokens)) if i not in set(active)]
        if n in to_fuzz and quiet:
            wrong = sorted(rng.sample(quiet, min(len(active), len(quiet))))
            items.append(FuzzItem(tokens=tokens, marked=wrong, correct=False))
        else:
            items.append(FuzzItem(tokens=tokens, marked=active, correct=True))
    rng.shuffle(items)
    return items


# -- intruder -----------------------------------------------------------------------------


@dataclass(frozen=True)
class IntruderTrial:
    """Windows shown together; ``intruder`` is the index of the one that does not
    activate the feature."""

    windows: list[list[str]]
    intruder: int


def intruder_trials(
    feature: FeatureRecord, intruders: list[Snippet], seed: int
) -> list[IntruderTrial]:
    """Up to ``INTRUDER_TRIALS`` trials: the feature's top and random examples taken in
    turn, ``INTRUDER_SIZE - 1`` to a trial, each trial with one of ``intruders`` at a
    seeded place. Fewer examples or intruders make fewer trials (possibly none)."""
    rng = random.Random(seed * 7919 + feature.layer * 1_000_003 + feature.index + 29)
    tops, randoms = feature.of_kind("top"), feature.of_kind("random")
    pool: list[Example] = []
    for i in range(max(len(tops), len(randoms))):
        pool += [e for e in (tops[i : i + 1] + randoms[i : i + 1])]
    per_trial = INTRUDER_SIZE - 1
    n_trials = min(INTRUDER_TRIALS, len(pool) // per_trial, len(intruders))
    trials: list[IntruderTrial] = []
    for t in range(n_trials):
        windows = [window(e)[0] for e in pool[t * per_trial : (t + 1) * per_trial]]
        place = rng.randrange(INTRUDER_SIZE)
        windows.insert(place, list(intruders[t].tokens))
        trials.append(IntruderTrial(windows=windows, intruder=place))
    return trials


def binomial_tail(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p): the exact one-sided p-value of k successes."""
    return min(1.0, sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k, n + 1)))


def wilson_interval(k: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (Wilson 1927), which keeps its
    coverage at small n where the normal approximation does not."""
    if n == 0:
        return (0.0, 1.0)
    return wilson_bounds(k / n, n, z)


def wilson_bounds(p: float, n: float, z: float = Z_95) -> tuple[float, float]:
    """Wilson's interval around a share ``p`` at a (possibly effective, not whole)
    sample size ``n``; clamped so that rounding never leaves ``p`` outside it."""
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(max(p * (1 - p), 0.0) / n + z * z / (4 * n * n)) / denom
    return max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half))


def intruder_score(truth: list[int], picks: list[int], size: int = INTRUDER_SIZE) -> IntruderScore:
    """Accuracy over the trials against chance (1 / ``size``)."""
    if len(truth) != len(picks):
        raise ValueError(f"{len(picks)} answers for {len(truth)} trials")
    n = len(truth)
    k = sum(t == p for t, p in zip(truth, picks, strict=True))
    chance = 1 / size
    low, high = wilson_interval(k, n)
    return IntruderScore(
        n_trials=n, n_correct=k, n_choices=size, chance=chance,
        accuracy=k / n if n else None,
        interval=[low, high] if n else None,
        p_value=binomial_tail(k, n, chance) if n else None,
    )  # fmt: skip
