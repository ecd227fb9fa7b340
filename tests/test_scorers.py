"""The fuzzing and intruder scorers: how their items are built, their statistics, the
heuristic judge's versions on the planted demo (planted features far above random ones,
random ones at chance), and a scorer asked for later scoring labeled features without
labeling them again."""

from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path

import pytest

from labeler.errors import UserError
from labeler.judges import make_judge
from labeler.judges.base import JudgeOptions
from labeler.judges.metrics import auroc
from labeler.judges.scorers import (
    FUZZ_PER_SET,
    INTRUDER_SIZE,
    binomial_tail,
    fuzz_items,
    intruder_score,
    intruder_trials,
    parse_scorers,
    wilson_interval,
)
from labeler.labeling import label_run
from labeler.labeling.store import LabelStore
from labeler.run.data import RunData
from labeler.run.schemas import Judgment, Snippet
from tests.conftest import CollectedDemo
from tests.test_bad_input import assert_fails, labeler

ALL = ("detection", "fuzz", "intruder")
PLANTED_KINDS = {"token_set", "hesitation_output", "template"}


# -- parsing --------------------------------------------------------------------------------


def test_scorers_parse_in_a_fixed_order() -> None:
    assert parse_scorers("intruder, detection,fuzz") == ALL
    assert parse_scorers("detection") == ("detection",)
    with pytest.raises(UserError, match="unknown scorer 'simulation'"):
        parse_scorers("detection,simulation")
    with pytest.raises(UserError, match="detection is part of every judgment"):
        parse_scorers("fuzz")


def test_label_refuses_unknown_scorers_naming_the_option(run_copy: Path) -> None:
    result = labeler("label", run_copy, "--scorers", "detection,fuzzy")
    assert_fails(result, "--scorers", "fuzzy")
    assert not (run_copy / "labels.sqlite").exists()


# -- statistics -----------------------------------------------------------------------------


def test_binomial_tail_is_exact() -> None:
    # P(X >= 2), X ~ Bin(3, 0.2) = 3 * 0.04 * 0.8 + 0.008
    assert binomial_tail(2, 3, 0.2) == pytest.approx(3 * 0.04 * 0.8 + 0.008)
    assert binomial_tail(0, 5, 0.2) == pytest.approx(1.0)
    assert binomial_tail(5, 5, 0.2) == pytest.approx(0.2**5)


def test_wilson_interval_covers_at_small_n() -> None:
    """Over 4,000 seeded binomial draws at n from 5 to 40 and p from 0.05 to 0.95, the
    95% Wilson interval holds the true p in at least 93% of them (the normal
    approximation's falls far lower at small n and extreme p)."""
    rng = random.Random(0)
    hits = total = 0
    for _ in range(4000):
        n = rng.randint(5, 40)
        p = rng.uniform(0.05, 0.95)
        k = sum(rng.random() < p for _ in range(n))
        low, high = wilson_interval(k, n)
        hits += low <= p <= high
        total += 1
    assert hits / total >= 0.93
    assert wilson_interval(0, 0) == (0.0, 1.0)
    low, high = wilson_interval(5, 5)
    assert high == 1.0 and 0.5 < low < 0.6  # 5/5: [0.566, 1]


def test_intruder_score_against_chance() -> None:
    perfect = intruder_score([0, 1, 2, 3, 4], [0, 1, 2, 3, 4])
    assert perfect.accuracy == 1.0 and perfect.chance == pytest.approx(1 / INTRUDER_SIZE)
    assert perfect.p_value == pytest.approx(0.2**5)
    assert perfect.interval is not None and perfect.interval[1] == 1.0
    none = intruder_score([], [])
    assert none.accuracy is None and none.p_value is None and none.n_trials == 0
    with pytest.raises(ValueError, match="2 answers for 3 trials"):
        intruder_score([0, 1, 2], [0, 1])


# -- the items ------------------------------------------------------------------------------


def test_fuzz_items_move_half_the_marks_off_the_activating_tokens(
    collected: CollectedDemo,
) -> None:
    run = RunData.open(collected.run)
    record = run.records(["L0F1"])[0]
    items = fuzz_items(record, seed=0)
    assert len(items) == 2 * FUZZ_PER_SET
    assert sum(not it.correct for it in items) == len(items) // 2
    examples = [e for kind in ("top", "random") for e in record.of_kind(kind)[:FUZZ_PER_SET]]
    active_sets = []
    for e in examples:
        lo = max(0, e.highlight - 20)
        acts = e.acts[lo : e.highlight + 12]
        active_sets.append({i for i, a in enumerate(acts) if a > 0})
    for it in items:
        assert it.marked, "every item carries marks"
        matching = [s for s in active_sets if set(it.marked) == s]
        if it.correct:
            assert matching, "right marks are exactly an example's activating tokens"
    assert fuzz_items(record, seed=0) == items
    assert fuzz_items(record, seed=1) != items


def test_intruder_trials_hold_one_intruder_each(collected: CollectedDemo) -> None:
    run = RunData.open(collected.run)
    record = run.records(["L0F1"])[0]
    intruders = [Snippet(tokens=["<intruder>", str(i)], activating=False) for i in range(5)]
    trials = intruder_trials(record, intruders, seed=0)
    assert len(trials) == 5
    for n, trial in enumerate(trials):
        assert len(trial.windows) == INTRUDER_SIZE
        assert trial.windows[trial.intruder] == ["<intruder>", str(n)]
        assert sum(w[0] == "<intruder>" for w in trial.windows) == 1
    assert len({t.intruder for t in trials}) > 1, "the intruder's place is drawn"
    assert len(intruder_trials(record, intruders[:2], seed=0)) == 2
    few = record.model_copy(update={"examples": record.of_kind("top")[:7]})
    assert len(intruder_trials(few, intruders, seed=0)) == 1


# -- the heuristic judge on the planted demo --------------------------------------------------


@pytest.fixture(scope="module")
def scored(collected: CollectedDemo, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("scored") / "run"
    shutil.copytree(collected.run, run)
    store = LabelStore(run / "labels.sqlite")
    judge = make_judge("heuristic", JudgeOptions(scorers=ALL))
    label_run(RunData.open(run), store, judge)
    store.close()
    return run


def _by_truth(run: Path, truth_path: Path) -> list[tuple[bool, Judgment]]:
    truth = {g["feature_id"]: g for g in json.loads(truth_path.read_text())}
    store = LabelStore(run / "labels.sqlite")
    try:
        stored = store.judgments("heuristic")
    finally:
        store.close()
    out = []
    for fid, row in stored.items():
        planted = truth[fid]["kind"] in PLANTED_KINDS
        if planted or truth[fid]["category"] == "uninterpretable":
            assert row.judgment is not None
            out.append((planted, row.judgment))
    return out


def test_planted_features_score_far_above_random_ones(
    scored: Path, collected: CollectedDemo
) -> None:
    """Per scorer, the AUROC between planted features (a known trigger) and random ones
    (random token sets and random directions), over every feature's score. Measured on
    this session's run (quantile examples, seed 0): intruder accuracy 0.98, detection F1
    0.79, fuzz F1 0.81 (on `labeler demo`'s run: 0.98, 0.93, 0.85). The token-level
    scorers separate less on this model: a random token set fires on a few whole
    tokens, so an explanation that lists them predicts where it fires; only the
    explanation-free intruder test sees that the windows share nothing (this is what
    a baseline run measures: docs/baseline.md)."""
    rows = _by_truth(scored, collected.paths.ground_truth)
    assert sum(p for p, _ in rows) > 500 and sum(not p for p, _ in rows) > 250

    def separation(read: object) -> float:
        pairs = [(p, read(j)) for p, j in rows if read(j) is not None]  # type: ignore[operator]
        value = auroc([p for p, _ in pairs], [s for _, s in pairs])
        assert value is not None
        return value

    assert separation(lambda j: j.intruder.accuracy) >= 0.95
    # token-level scorers: a random token set is predictable by listing its tokens
    assert separation(lambda j: j.detection.f1) >= 0.75
    assert separation(lambda j: j.fuzz.f1) >= 0.75
    random_intruder = [j.intruder.accuracy for p, j in rows if not p]
    planted_intruder = [j.intruder.accuracy for p, j in rows if p and j.intruder.n_trials]
    # chance is 0.2: random features near it, planted ones far above
    assert sum(random_intruder) / len(random_intruder) < 0.4
    assert sum(planted_intruder) / len(planted_intruder) > 0.9
    significant = [j for p, j in rows if not p and j.intruder.p_value < 0.05]
    assert len(significant) / len(random_intruder) < 0.2


def test_a_scorer_asked_later_scores_without_relabeling(labeled_copy: Path) -> None:
    store = LabelStore(labeled_copy / "labels.sqlite")
    before = {f: r.judgment for f, r in store.judgments("heuristic").items()}
    assert before and all(j is not None and j.fuzz is None for j in before.values())
    assert store.done("heuristic", ALL) == set()
    store.close()

    result = labeler("label", labeled_copy, "--scorers", "detection,fuzz")
    assert result.returncode == 0, result.stderr
    assert f"{len(before)} labeled now" in result.stdout

    store = LabelStore(labeled_copy / "labels.sqlite")
    after = {f: r.judgment for f, r in store.judgments("heuristic").items()}
    assert after.keys() == before.keys()
    for fid, judgment in after.items():
        old = before[fid]
        assert judgment is not None and old is not None
        assert judgment.fuzz is not None and judgment.intruder is None
        assert judgment.explanation == old.explanation
        assert judgment.classification == old.classification
        assert judgment.detection == old.detection
    assert store.done("heuristic", ("detection", "fuzz")) == set(after)
    store.close()

    again = labeler("label", labeled_copy, "--scorers", "detection,fuzz")
    assert again.returncode == 0 and "0 labeled now" in again.stdout
    assert f"{len(before)} already labeled" in again.stdout


def test_p_values_are_uniform_enough_for_random_picks() -> None:
    """An intruder judge guessing at random is rejected at 5% in at most about 5% of
    features (the exact test is conservative with five trials: P(X >= 3) = 0.058 is the
    smallest tail above 0.05, so the realised level is P(X >= 4) = 0.0067)."""
    rng = random.Random(1)
    rejected = 0
    n = 4000
    for _ in range(n):
        truth = [rng.randrange(INTRUDER_SIZE) for _ in range(5)]
        picks = [rng.randrange(INTRUDER_SIZE) for _ in range(5)]
        p_value = intruder_score(truth, picks).p_value
        assert p_value is not None
        rejected += p_value < 0.05
    assert rejected / n <= 0.0067 + 3 * math.sqrt(0.0067 / n)
