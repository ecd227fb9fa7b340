"""What the causal check counts in a model's responses, and how two conditions compare.

- The rate of a word set per 1,000 generated tokens, counted on decoded words (so "Wait",
  " wait," and "wait" split over two tokens all count once), not on token ids.
- Whether a response closes its thinking (``</think>``).
- Accuracy against a reference answer: the response's last ``\\boxed{...}`` (braces
  balanced) compared with the reference after normalisation.
- Effect sizes: the difference of pooled rates between two conditions with a bootstrap
  confidence interval over responses, each rate's own bootstrap interval, and a
  permutation p-value of a selection's effect against the effects of random control
  selections, stated with its resolution (``p_value_text``).
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

HESITATION_WORDS = ("wait", "hmm", "alternatively")
"""The paper's hesitation words (its study counts "wait"; "hmm" and "alternatively" are
the other hesitation tokens its attribution graphs trace)."""
THINK_CLOSE = "</think>"
_WORD = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)?", re.UNICODE)


@dataclass(frozen=True)
class Response:
    """One generation: its decoded text, how many tokens were generated, and the
    reference answer of its prompt, if any."""

    text: str
    n_tokens: int
    reference: str | None = None


def words_of(text: str) -> list[str]:
    """The text's words, lowercased (letters, with an inner apostrophe)."""
    return [w.lower() for w in _WORD.findall(text)]


def count_words(text: str, words: Iterable[str]) -> int:
    wanted = {w.lower() for w in words}
    return sum(1 for w in words_of(text) if w in wanted)


def rate_per_1000(responses: Sequence[Response], words: Iterable[str] = HESITATION_WORDS) -> float:
    """Occurrences of the words per 1,000 generated tokens, pooled over the responses."""
    wanted = tuple(words)
    tokens = sum(r.n_tokens for r in responses)
    if tokens == 0:
        return 0.0
    return 1000.0 * sum(count_words(r.text, wanted) for r in responses) / tokens


def closes_thinking(text: str, close: str = THINK_CLOSE) -> bool:
    return close in text


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (nested braces kept, escaped ones
    literal), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    j = i
    while j < len(text):
        if text[j] == "\\":  # an escaped character (\{ is a literal brace): skipped
            j += 2
            continue
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
        j += 1
    return None  # unbalanced: cut off before it closed


_UNWRAP = re.compile(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}")
_DROP = ("\\left", "\\right", "\\!", "\\,", "\\;", "\\ ", "$", " ")


def normalise(answer: str) -> str:
    """An answer as compared: text wrappers unwrapped, spacing and sizing commands and
    dollar signs dropped, ``\\dfrac``/``\\tfrac`` as ``\\frac``, a leading ``x =`` and a
    trailing period removed."""
    out = answer.strip()
    while (unwrapped := _UNWRAP.sub(r"\1", out)) != out:
        out = unwrapped
    for piece in _DROP:
        out = out.replace(piece, "")
    out = out.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    out = re.sub(r"^[a-zA-Z]=", "", out)
    return out.rstrip(".").strip()


def is_correct(response: Response) -> bool | None:
    """Whether the last boxed answer equals the reference; None without a reference."""
    if response.reference is None:
        return None
    boxed = last_boxed(response.text)
    return boxed is not None and normalise(boxed) == normalise(response.reference)


@dataclass(frozen=True)
class Effect:
    """A condition against the baseline: the difference of pooled rates, its bootstrap
    confidence interval, and their ratio; and each rate's own percentile interval from
    the same resamples (a rate is never negative, so neither is its interval)."""

    baseline: float
    condition: float
    difference: float
    low: float
    high: float
    baseline_low: float
    baseline_high: float
    condition_low: float
    condition_high: float

    @property
    def ratio(self) -> float | None:
        return self.condition / self.baseline if self.baseline else None

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


def rate_effect(
    baseline: Sequence[Response], condition: Sequence[Response],
    words: Iterable[str] = HESITATION_WORDS, n_boot: int = 2000, level: float = 0.95,
    seed: int = 0,
) -> Effect:  # fmt: skip
    """The condition's rate minus the baseline's, with a percentile bootstrap interval:
    responses resampled with replacement within each condition (prompts are shared, but
    sampled responses differ, so the two are resampled independently)."""
    wanted = tuple(words)
    if not baseline or not condition:
        raise ValueError("rate_effect: each condition needs at least one response")
    rng = random.Random(seed)
    counts = [[count_words(r.text, wanted) for r in rs] for rs in (baseline, condition)]
    tokens = [[r.n_tokens for r in rs] for rs in (baseline, condition)]

    def pooled(k: int, picks: Sequence[int]) -> float:
        n = sum(tokens[k][i] for i in picks)
        return 1000.0 * sum(counts[k][i] for i in picks) / n if n else 0.0

    rates: tuple[list[float], list[float]] = ([], [])
    for _ in range(n_boot):
        a = [rng.randrange(len(baseline)) for _ in baseline]
        b = [rng.randrange(len(condition)) for _ in condition]
        rates[0].append(pooled(0, a))
        rates[1].append(pooled(1, b))
    base = rate_per_1000(baseline, wanted)
    cond = rate_per_1000(condition, wanted)
    return _effect(base, cond, rates, level)


def permutation_p(effect: float, controls: Sequence[float]) -> float:
    """How often a random control selection moves the measure as far as the selection
    did (two-sided, with the selection counted among them): ``(1 + k) / (1 + K)``."""
    if not controls:
        raise ValueError("permutation_p: no control effects")
    beyond = sum(1 for c in controls if abs(c) >= abs(effect))
    return (1 + beyond) / (1 + len(controls))


TARGET_P = 0.05
"""The p-value a study should be able to reach; ``controls_for(TARGET_P)`` controls do."""


def smallest_p(n_controls: int) -> float:
    """The smallest permutation p-value ``K`` controls can give: ``1 / (1 + K)``."""
    return 1 / (1 + n_controls)


def controls_for(p: float = TARGET_P) -> int:
    """The fewest controls whose smallest p-value is at most ``p`` (19 for 0.05)."""
    return math.ceil(1 / p - 1 - 1e-9)


def p_value_text(p: float, n_controls: int, asked: int | None = None) -> str:
    """A permutation p-value with its resolution, for people: ``p = 0.167, the smallest
    possible with 5 controls; --controls 19 for p ≤ 0.05``. ``asked``: the controls
    asked for, when the pool held fewer distinct sets (then no more can be drawn)."""
    floor = smallest_p(n_controls)
    at_floor = p <= floor * (1 + 1e-9)
    text = (f"p = {p:.3g}, the smallest possible with {n_controls} controls" if at_floor
            else f"p = {p:.3g} (the smallest possible with {n_controls} controls is "
                 f"{floor:.3g})")  # fmt: skip
    if floor <= TARGET_P * (1 + 1e-9):
        return text
    if asked is not None and asked > n_controls:
        return (f"{text}; only {n_controls} distinct matched control sets exist, so "
                f"p ≤ {TARGET_P:g} cannot be reached")  # fmt: skip
    return f"{text}; --controls {controls_for()} for p ≤ {TARGET_P:g}"


def paired_rate_effect(
    baseline: Sequence[float], condition: Sequence[float], positions: Sequence[int],
    n_boot: int = 2000, level: float = 0.95, seed: int = 0,
) -> Effect:  # fmt: skip
    """Per-trace expected counts under two conditions on the same traces (teacher-forced):
    the difference of pooled rates per 1,000 positions, with a bootstrap interval that
    resamples traces, the two conditions together."""
    if not positions or not len(baseline) == len(condition) == len(positions):
        raise ValueError("paired_rate_effect: one value per trace under each condition")
    rng = random.Random(seed)
    n = len(positions)

    def pooled(values: Sequence[float], picks: Sequence[int]) -> float:
        total = sum(positions[i] for i in picks)
        return 1000.0 * sum(values[i] for i in picks) / total if total else 0.0

    rates: tuple[list[float], list[float]] = ([], [])
    for _ in range(n_boot):
        picks = [rng.randrange(n) for _ in range(n)]
        rates[0].append(pooled(baseline, picks))
        rates[1].append(pooled(condition, picks))
    everything = range(n)
    base, cond = pooled(baseline, everything), pooled(condition, everything)
    return _effect(base, cond, rates, level)


def _effect(base: float, cond: float, rates: tuple[list[float], list[float]],
            level: float) -> Effect:  # fmt: skip
    """The effect with percentile intervals: of the difference (resample by resample)
    and of each rate."""

    def interval(values: Sequence[float]) -> tuple[float, float]:
        ordered, tail = sorted(values), (1 - level) / 2
        last = len(ordered) - 1
        return ordered[int(tail * last)], ordered[int((1 - tail) * last)]

    low, high = interval([c - b for b, c in zip(*rates, strict=True)])
    return Effect(base, cond, cond - base, low, high, *interval(rates[0]), *interval(rates[1]))
