"""Audits: drawing with known probabilities, the audited estimate in `summarize`, and its
coverage proved by seeded simulations on planted truth (docs/audit.md)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from labeler.audit.design import draw_audit, draw_order, inclusion_probabilities
from labeler.audit.estimate import audit_sample, labeled_population
from labeler.labeling.store import LabelStore
from tests.audit_simulation import AuditSimulator, planted_categories
from tests.conftest import CollectedDemo
from tests.test_bad_input import assert_fails, labeler


def test_inclusion_probabilities_sum_to_the_size_and_cap_at_one() -> None:
    size = np.array([10.0, 1.0, 1.0, 1.0, 1.0])
    pi = inclusion_probabilities(size, 2)
    assert pi.tolist() == pytest.approx([1.0, 0.25, 0.25, 0.25, 0.25])
    assert inclusion_probabilities(size, 5).tolist() == [1.0] * 5
    assert inclusion_probabilities(size, 0).tolist() == [0.0] * 5


def test_every_prefix_of_the_draw_order_is_a_sample_with_those_probabilities() -> None:
    """Sequential Poisson sampling: how often a feature is among the first m drawn is its
    inclusion probability for m, for every m (within 0.03 over 3,000 seeded draws; the
    largest deviation measured is 2.9 standard errors)."""
    size = np.random.default_rng(1).uniform(0.3, 1.2, 200)
    fids = [f"L0F{i}" for i in range(200)]
    orders = [draw_order(fids, size, seed) for seed in range(3000)]
    for m in (10, 40):
        counts = np.zeros(200)
        for order in orders:
            counts[order[:m]] += 1
        assert np.abs(counts / 3000 - inclusion_probabilities(size, m)).max() < 0.03
    # the order does not depend on the order the features come in
    shuffled = fids[::-1]
    again = draw_order(shuffled, size[::-1], 7)
    assert [shuffled[i] for i in again] == [fids[i] for i in draw_order(fids, size, 7)]


@pytest.fixture
def truth(collected: CollectedDemo) -> dict[str, str]:
    return planted_categories(collected.paths.ground_truth)


def _alive(run: Path) -> dict[int, int]:
    info = json.loads((run / "run.json").read_text())
    return {int(k): v for k, v in info["n_alive"].items()}


def test_audit_command_draws_anew_each_time_and_refuses_a_repeat(
    labeled_copy: Path, truth: dict[str, str]
) -> None:
    first = labeler("audit", labeled_copy, "--n", "20")
    assert first.returncode == 0, first.stderr
    assert "drew 20 of 960 labeled features weighted toward uncertain labels" in first.stdout
    second = labeler("audit", labeled_copy, "--n", "10", "--weighting", "uniform")
    assert second.returncode == 0, second.stderr
    store = LabelStore(labeled_copy / "labels.sqlite")
    audits = store.audits.all()
    assert [(a.n_drawn, a.seed, a.weighting) for a in audits] == [
        (20, 0, "uncertainty"), (10, 1, "uniform"),
    ]  # fmt: skip
    drawn = store.audits.drawn()
    assert [p for a, _, p in drawn if a == audits[0].audit_id] == list(range(1, 21))
    store.close()
    assert_fails(labeler("audit", labeled_copy, "--n", "5", "--seed", "0"),
                 "audit 1 was drawn with --seed 0", "choose another --seed")  # fmt: skip
    assert_fails(labeler("audit", labeled_copy, "--n", "0"), "--n")
    progress = labeler("audit", labeled_copy)
    assert progress.returncode == 0, progress.stderr
    assert "audit 1 (drawn, uncertainty): 0 of 20 decided in draw order" in progress.stdout
    assert "20 drawn features wait for a decision" in progress.stdout


def test_audit_of_an_unlabeled_run_is_refused(run_copy: Path) -> None:
    assert_fails(labeler("audit", run_copy, "--n", "5"), "no labels yet", "labeler label")


def test_an_audit_is_used_up_to_its_first_undecided_feature(
    labeled_copy: Path, truth: dict[str, str]
) -> None:
    store = LabelStore(labeled_copy / "labels.sqlite")
    sim = AuditSimulator(store, truth, _alive(labeled_copy))
    drawn = draw_audit(store, 6, seed=3)
    sim.decide([drawn.feature_ids[i] for i in (0, 1, 3, 4)])  # the third is not decided
    population = labeled_population(store)
    decided = {r.feature_id for r in store.reviews()}
    sample, uses = audit_sample(store, population, decided)
    assert sorted(population[i] for i in sample.index) == sorted(drawn.feature_ids[:2])
    assert uses[0].n_used == 2 and uses[0].note is not None
    assert "4 drawn features wait for a decision" in uses[0].note
    store.close()


def test_an_audit_of_other_features_than_those_labeled_now_is_left_out_and_named(
    labeled_copy: Path, truth: dict[str, str]
) -> None:
    store = LabelStore(labeled_copy / "labels.sqlite")
    fid = labeled_population(store)[0]
    row = store.conn.execute("SELECT * FROM judgments WHERE feature_id=?", (fid,)).fetchone()
    with store.transaction():
        store.conn.execute("DELETE FROM judgments WHERE feature_id=?", (fid,))
    drawn = draw_audit(store, 10, seed=0)
    AuditSimulator(store, truth, _alive(labeled_copy)).decide(drawn.feature_ids)
    with store.transaction():  # the feature is labeled after the audit was drawn
        marks = ", ".join("?" * len(row))
        store.conn.execute(f"INSERT INTO judgments VALUES ({marks})", row)
    sample, uses = audit_sample(store, labeled_population(store), set(drawn.feature_ids))
    assert len(sample.index) == 0 and not uses[0].used
    assert uses[0].note == (
        "drawn from 959 labeled features; 960 are labeled now: run `labeler audit` again"
    )
    store.close()


def test_summarize_without_an_audit_says_what_its_interval_leaves_out(labeled_copy: Path) -> None:
    result = labeler("summarize", labeled_copy)
    assert result.returncode == 0, result.stderr
    assert "judges' error not counted:" in result.stdout
    summary = json.loads((labeled_copy / "summary.json").read_text())
    assert summary["audit"] is None
    assert "take the judges' labels as right" in summary["judge_error"]
    assert not (labeled_copy / "summary-audit.png").exists()


def test_summarize_reports_the_audited_estimate(labeled_copy: Path, truth: dict[str, str]) -> None:
    """The heuristic judge on the demo is right about the planted categories but for a
    few: the audited share stays near the judges' and its interval holds the planted
    share; people's labels give the judge's precision and recall."""
    store = LabelStore(labeled_copy / "labels.sqlite")
    drawn = draw_audit(store, 40, seed=0)
    AuditSimulator(store, truth, _alive(labeled_copy)).decide(drawn.feature_ids)
    store.close()
    result = labeler("summarize", labeled_copy)
    assert result.returncode == 0, result.stderr
    assert "Audited: reasoning" in result.stdout
    assert "the judges' error included" in result.stdout
    summary = json.loads((labeled_copy / "summary.json").read_text())
    audit = summary["audit"]
    assert summary["judge_error"] is None
    assert (audit["n_drawn"], audit["n_decided"], audit["n_used"]) == (40, 40, 40)
    planned = [f for f in truth if truth[f] != "dead"]
    planted = sum(truth[f] == "reasoning" for f in planned) / len(planned)
    r = audit["reasoning"]
    assert r["ci_low"] <= planted <= r["ci_high"]
    assert r["ci_low"] <= r["share"] <= r["ci_high"]
    assert set(audit["by_category"]) == {"reasoning", "domain", "language", "uninterpretable"}
    raters = [a["rater"] for a in audit["accuracy"]]
    assert raters == ["judges", "heuristic"]
    assert (labeled_copy / "summary-audit.png").stat().st_size > 10_000
