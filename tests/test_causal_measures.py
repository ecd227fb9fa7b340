"""What the causal check counts: word rates on decoded words, closed thinking, boxed
answers after normalisation, bootstrap intervals and permutation p-values, on texts
whose counts are known."""

from __future__ import annotations

import random

import pytest

from labeler.causal.measures import (
    HESITATION_WORDS,
    Response,
    closes_thinking,
    count_words,
    is_correct,
    last_boxed,
    normalise,
    p_value_text,
    paired_rate_effect,
    permutation_p,
    rate_effect,
    rate_per_1000,
)


def test_words_are_counted_on_decoded_words_not_tokens() -> None:
    text = "Wait, 2+2=4. Hmm... wait! Awaiting nothing; waited. ALTERNATIVELY: wait's"
    # 'Awaiting' and 'waited' are other words; "wait's" is one word, not 'wait'
    assert count_words(text, HESITATION_WORDS) == 4
    assert count_words("", HESITATION_WORDS) == 0
    assert count_words("Émile dit «wait»", ["wait"]) == 1


def test_the_rate_is_pooled_per_thousand_generated_tokens() -> None:
    responses = [Response("wait wait", 1000), Response("hmm", 500), Response("no", 500)]
    assert rate_per_1000(responses) == pytest.approx(1000 * 3 / 2000)
    assert rate_per_1000([]) == 0.0


def test_closing_the_thinking() -> None:
    assert closes_thinking("<think>so</think> The answer")
    assert not closes_thinking("<think>and so on, cut off")


@pytest.mark.parametrize(
    ("text", "boxed"),
    [
        ("so \\boxed{12}.", "12"),
        ("first \\boxed{3} then \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),  # escaped braces are literal
        ("\\boxed{\\}", None),  # an escaped closing brace does not close it
        ("\\boxed{x^{2}+1} done", "x^{2}+1"),
        ("no box here", None),
        ("cut off \\boxed{\\frac{1}{", None),
    ],
)
def test_the_last_boxed_answer(text: str, boxed: str | None) -> None:
    assert last_boxed(text) == boxed


def test_answers_are_compared_after_normalisation() -> None:
    assert normalise("\\dfrac{1}{2}") == normalise("\\frac{1}{2}")
    assert normalise("x = 5.") == "5"
    assert normalise("\\text{(A)}") == "(A)"
    assert normalise("$\\left( 1,2 \\right)$") == "(1,2)"
    assert is_correct(Response("thus \\boxed{\\dfrac{3}{4}}", 10, "\\frac{3}{4}"))
    assert is_correct(Response("thus \\boxed{5}", 10, "6")) is False
    assert is_correct(Response("no answer", 10, "6")) is False
    assert is_correct(Response("\\boxed{5}", 10)) is None


def _responses(rate: float, n: int, tokens: int, rng: random.Random) -> list[Response]:
    """``n`` responses of ``tokens`` tokens whose words are 'wait' with probability
    ``rate`` per token (one word per token)."""
    return [
        Response(" ".join("wait" if rng.random() < rate else "so" for _ in range(tokens)), tokens)
        for _ in range(n)
    ]


def test_a_real_effect_excludes_zero_and_no_effect_includes_it() -> None:
    rng = random.Random(0)
    baseline = _responses(0.0055, 60, 400, rng)  # the paper's 5.5 per 1,000
    ablated = _responses(0.0015, 60, 400, rng)  # its 1.5 after ablation
    same = _responses(0.0055, 60, 400, rng)
    cut = rate_effect(baseline, ablated, seed=1)
    assert cut.difference < 0 and cut.excludes_zero and cut.low <= cut.difference <= cut.high
    assert cut.ratio is not None and cut.ratio < 0.5
    null = rate_effect(baseline, same, seed=1)
    assert not null.excludes_zero
    with pytest.raises(ValueError, match="at least one response"):
        rate_effect([], same)


def test_the_permutation_p_value_counts_controls_that_move_as_far() -> None:
    assert permutation_p(-4.0, [0.1, -0.2, 0.3, -0.1]) == pytest.approx(1 / 5)
    assert permutation_p(-0.15, [0.1, -0.2, 0.3, -0.1]) == pytest.approx(3 / 5)
    with pytest.raises(ValueError, match="no control"):
        permutation_p(1.0, [])


def test_each_rate_has_its_own_interval_that_cannot_go_below_zero() -> None:
    """The interval drawn on a rate is the percentile bootstrap of that rate (responses
    resampled within its condition): it holds the rate, and a rate of zero words has the
    interval [0, 0], where the reference's rate plus the difference's interval would
    reach below zero."""
    rng = random.Random(0)
    baseline = _responses(0.0055, 60, 400, rng)
    silent = [Response("so " * 399 + "so", 400) for _ in range(60)]
    cut = rate_effect(baseline, silent, seed=1)
    assert cut.condition == 0.0 and (cut.condition_low, cut.condition_high) == (0.0, 0.0)
    assert cut.baseline + cut.low < 0  # what the figure drew before
    assert 0 < cut.baseline_low <= cut.baseline <= cut.baseline_high
    forced = paired_rate_effect([3.0, 0.5, 2.0, 0.0], [0.0, 0.1, 0.0, 0.0], [900, 300, 600, 200])
    assert 0 <= forced.condition_low <= forced.condition <= forced.condition_high
    assert 0 <= forced.baseline_low <= forced.baseline <= forced.baseline_high
    assert forced.difference < 0 and forced.high < 0


@pytest.mark.parametrize(
    ("p", "n", "asked", "text"),
    [
        (1 / 6, 5, 5, "p = 0.167, the smallest possible with 5 controls; --controls 19 for "
                      "p ≤ 0.05"),
        (1 / 20, 19, 19, "p = 0.05, the smallest possible with 19 controls"),
        (2 / 4, 3, 3, "p = 0.5 (the smallest possible with 3 controls is 0.25); --controls 19 "
                      "for p ≤ 0.05"),
        (3 / 20, 19, 19, "p = 0.15 (the smallest possible with 19 controls is 0.05)"),
        (1 / 7, 6, 9, "p = 0.143, the smallest possible with 6 controls; only 6 distinct "
                      "matched control sets exist, so p ≤ 0.05 cannot be reached"),
    ],
)  # fmt: skip
def test_a_p_value_is_stated_with_its_resolution(p: float, n: int, asked: int, text: str) -> None:
    assert p_value_text(p, n, asked) == text
