"""Disputes, human review in the terminal, final labels, agreement, weighted summaries
and the catalog, on the planted demo model labeled by the heuristic judge and by an
"oracle" judge that answers with the planted truth: where the two disagree is known."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from labeler.labeling.store import LabelStore
from labeler.reporting.agreement import cohen_kappa
from labeler.reporting.summarize import stratified
from labeler.run.schemas import Classification
from tests.conftest import CollectedDemo
from tests.test_bad_input import assert_fails, labeler

ORACLE = "openai:oracle"


def _truth(demo: CollectedDemo) -> dict[str, dict[str, str | None]]:
    rows = json.loads(demo.paths.ground_truth.read_text())
    return {t["feature_id"]: t for t in rows}


@pytest.fixture
def two_judges(labeled: CollectedDemo, tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A copy of the labeled run with a second judge that gives the planted categories;
    returns the run and the heuristic's category of each feature it got wrong."""
    run = tmp_path / "run"
    shutil.copytree(labeled.run, run)
    truth = _truth(labeled)
    store = LabelStore(run / "labels.sqlite")
    wrong = {}
    for fid, stored in store.judgments("heuristic").items():
        assert stored.judgment is not None
        planted = truth[fid]
        oracle = Classification(
            category=planted["category"], subcategory=planted["subcategory"],
            mechanism=planted["mechanism"], domain_type=planted["domain_type"],
            confidence="high", rationale="the planted truth says so",
        )  # fmt: skip
        store.put_ok(stored.judgment.model_copy(update={"judge": ORACLE, "classification": oracle}))
        if stored.judgment.classification.category != planted["category"]:
            wrong[fid] = stored.judgment.classification.category
    store.close()
    assert 5 <= len(wrong) <= 40  # the heuristic misreads some planted-uninterpretable features
    return run, wrong


def _catalog(run: Path) -> dict[str, dict[str, object]]:
    result = labeler("export", run, "--out", run / "catalog.jsonl", "--overwrite")
    assert result.returncode == 0, result.stderr
    lines = (run / "catalog.jsonl").read_text().splitlines()
    return {line["feature_id"]: line for line in map(json.loads, lines)}


def test_disputes_are_where_the_judges_disagree_most_informative_first(
    two_judges: tuple[Path, dict[str, str]],
) -> None:
    run, wrong = two_judges
    result = labeler("disputes", run, "--json")
    assert result.returncode == 0, result.stderr
    queue = json.loads(result.stdout)
    disagree = {q["feature_id"] for q in queue if "judges_disagree" in q["reasons"]}
    assert disagree == set(wrong)
    # The oracle is right, so where they disagree the heuristic is outvoted by every model.
    assert all("heuristic_outvoted" in q["reasons"] for q in queue if q["feature_id"] in wrong)
    assert {q["feature_id"] for q in queue[: len(wrong)]} == set(wrong)
    scores = [q["score"] for q in queue]
    assert scores == sorted(scores, reverse=True)

    table = labeler("disputes", run, "--limit", "3")
    assert table.returncode == 0 and f"{len(queue):,} disputed features" in table.stdout

    rules = run / "rules.json"
    rules.write_text(json.dumps({"low_confidence": [], "min_detection": None,
                                 "heuristic_outvoted": False}))  # fmt: skip
    only = json.loads(labeler("disputes", run, "--json", "--rules", rules).stdout)
    assert {q["feature_id"] for q in only} == set(wrong)
    rules.write_text(json.dumps({"min_detection": 2}))
    assert_fails(labeler("disputes", run, "--rules", rules), str(rules), "min_detection")


def test_final_labels_human_over_consensus_over_one_judge(
    labeled: CollectedDemo, two_judges: tuple[Path, dict[str, str]]
) -> None:
    run, wrong = two_judges
    truth = _truth(labeled)
    catalog = _catalog(run)
    sources = {fid: line["label_source"] for fid, line in catalog.items()}
    assert {fid for fid, s in sources.items() if s == "single_judge"} == set(wrong)
    assert all(catalog[fid]["label_source_detail"] == ORACLE for fid in wrong)
    assert set(sources.values()) == {"consensus", "single_judge"}
    for fid, line in catalog.items():  # the oracle wins every dispute: all labels right
        assert line["final_label"]["category"] == truth[fid]["category"], fid  # type: ignore[index]

    picked = sorted(wrong)[0]
    result = labeler("decide", run, picked, "--reviewer", "ann", "--category", "reasoning",
                     "--subcategory", "planning", "--note", "a hunch")  # fmt: skip
    assert result.returncode == 0, result.stderr
    line = _catalog(run)[picked]
    assert line["label_source"] == "human" and line["label_source_detail"] == "ann"
    assert line["final_label"] == {"category": "reasoning", "subcategory": "planning",
                                   "mechanism": None, "domain_type": None}  # fmt: skip
    (review,) = line["reviews"]  # type: ignore[misc]
    assert review["reviewer"] == "ann" and review["note"] == "a hunch"
    assert [j["judge"] for j in line["judgments"]] == sorted([ORACLE, "heuristic"])  # type: ignore[union-attr]


def test_terminal_review_hides_the_judges_until_asked(
    two_judges: tuple[Path, dict[str, str]],
) -> None:
    run, _ = two_judges
    first = json.loads(labeler("disputes", run, "--json").stdout)[0]["feature_id"]

    skipped = labeler_input(run, "ann", "s\ny\nq\n")  # a skip is confirmed
    assert skipped.returncode == 0, skipped.stderr
    assert first in skipped.stdout and "the planted truth says so" not in skipped.stdout
    assert "1 skipped" in skipped.stdout

    decided = labeler_input(run, "ann", "x\nj\nu\nnot a feature\nq\n")
    assert decided.returncode == 0, decided.stderr
    assert "unknown choice 'x'" in decided.stdout
    assert "the planted truth says so" in decided.stdout  # shown once asked for
    store = LabelStore(run / "labels.sqlite")
    reviews = store.reviews(first)
    store.close()
    assert [(r.action, r.reviewer, r.category, r.note) for r in reviews] == [
        ("skip", "ann", None, ""),
        ("decide", "ann", "uninterpretable", "not a feature"),
    ]
    # Decided features leave the queue; the review goes on with the next one.
    after = json.loads(labeler("disputes", run, "--json").stdout)
    assert next(q for q in after if q["feature_id"] == first)["decided_by"] == ["ann"]
    again = labeler_input(run, "bob", "q\n")
    assert first not in again.stdout.split("(1 of")[0]


def labeler_input(run: Path, reviewer: str, keys: str) -> object:
    import subprocess

    from tests.test_bad_input import LABELER

    return subprocess.run(
        [*LABELER, "review", str(run), "--reviewer", reviewer], input=keys,
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def test_two_reviewers_are_both_kept_and_their_disagreement_shown(
    two_judges: tuple[Path, dict[str, str]],
) -> None:
    run, wrong = two_judges
    fid = sorted(wrong)[-1]
    assert labeler("decide", run, fid, "--reviewer", "ann", "--category", "domain",
                   "--domain-type", "math").returncode == 0  # fmt: skip
    second = labeler("decide", run, fid, "--reviewer", "bob", "--category", "language")
    assert second.returncode == 0, second.stderr
    assert "ann decided domain" in second.stdout and "both are kept" in second.stdout
    line = _catalog(run)[fid]
    assert [(r["reviewer"], r["category"]) for r in line["reviews"]] == [  # type: ignore[attr-defined]
        ("ann", "domain"), ("bob", "language"),
    ]  # fmt: skip
    assert line["reviewers_disagree"] is True and line["label_source_detail"] == "ann,bob"
    assert line["final_label"]["category"] == "language"  # type: ignore[index]  # a tie: the latest
    summary = json.loads(labeler("summarize", run, "--json").stdout)
    assert summary["reviews"]["n_reviewers_disagree"] == 1
    assert summary["reviews"]["reviewers"] == ["ann", "bob"]
    pairs = {(p["rater_a"], p["rater_b"]): p for p in summary["agreement"]["pairs"]}
    assert pairs[("human:ann", "human:bob")]["n"] == 1
    assert pairs[("human:ann", "human:bob")]["percent"] == 0.0


def test_bad_review_decisions_are_refused_and_nothing_is_stored(
    two_judges: tuple[Path, dict[str, str]],
) -> None:
    run, wrong = two_judges
    fid = sorted(wrong)[0]
    bad = labeler("decide", run, fid, "--reviewer", "ann", "--category", "magic")
    assert_fails(bad, "category", "'reasoning'", "'uninterpretable'")
    assert_fails(labeler("decide", run, fid, "--reviewer", "ann", "--category", "language",
                         "--subcategory", "planning"), "subcategory")  # fmt: skip
    assert_fails(labeler("decide", run, "L99F9999", "--reviewer", "ann", "--category",
                         "language"), "L99F9999", "not a feature planned")  # fmt: skip
    store = LabelStore(run / "labels.sqlite")
    assert store.reviews() == []
    store.close()


def test_summary_weights_layers_and_reports_agreement_and_comparison(
    two_judges: tuple[Path, dict[str, str]], labeled: CollectedDemo, tmp_path: Path
) -> None:
    run, wrong = two_judges
    store = LabelStore(run / "labels.sqlite")
    heuristic = {fid: s.judgment.classification.category  # type: ignore[union-attr]
                 for fid, s in store.judgments("heuristic").items()}  # fmt: skip
    oracle = {fid: s.judgment.classification.category  # type: ignore[union-attr]
              for fid, s in store.judgments(ORACLE).items()}  # fmt: skip
    store.close()
    result = labeler("summarize", run, "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    final = summary["final"]
    assert final["by_source"] == {"human": 0, "consensus": len(oracle) - len(wrong),
                                  "single_judge": len(wrong), "none": 0}  # fmt: skip
    assert [j["rater"] for j in summary["judges"]] == [ORACLE, "heuristic"]
    assert final["reasoning"]["count"] == sum(c == "reasoning" for c in oracle.values())
    # Kappa as computed directly from the two judges' categories.
    names = sorted(set(heuristic.values()) | set(oracle.values()))
    ids = sorted(oracle)
    codes = [np.array([names.index(d[f]) for f in ids]) for d in (oracle, heuristic)]
    (pair,) = summary["agreement"]["pairs"]
    assert pair["kappa"] == pytest.approx(cohen_kappa(*codes))
    assert pair["percent"] == pytest.approx(1 - len(wrong) / len(ids))
    assert (run / "summary-agreement.png").read_bytes().startswith(b"\x89PNG")
    assert summary["disputes"]["by_reason"]["judges_disagree"] == len(wrong)

    text = labeler("summarize", run)
    assert "Reasoning features:" in text.stdout and "Cohen's kappa" in text.stdout
    assert "Krippendorff's alpha" in text.stdout and ORACLE in text.stdout

    # Against the heuristic-only run: the differences are this run's minus the other's.
    compared = json.loads(labeler("summarize", run, "--json", "--compare", labeled.run).stdout)
    other = json.loads(labeler("summarize", labeled.run, "--json").stdout)["final"]
    (reasoning,) = [d for d in compared["comparison"]["differences"] if d["label"] == "reasoning"]
    assert reasoning["difference"] == pytest.approx(
        final["reasoning"]["share"] - other["reasoning"]["share"]
    )
    assert reasoning["ci_low"] <= reasoning["difference"] <= reasoning["ci_high"]
    assert (run / "summary-compare.png").read_bytes().startswith(b"\x89PNG")


def test_stratified_share_weights_each_layer_by_its_alive_features() -> None:
    # Layer 0: 1,000 alive, 100 labeled, 20 reasoning; layer 1: 9,000 alive, 100, 5.
    estimate = stratified({0: 20, 1: 5}, {0: 100, 1: 100}, {0: 1000, 1: 9000})
    assert estimate.share == pytest.approx(0.1 * 0.20 + 0.9 * 0.05)
    assert estimate.sample_share == pytest.approx(25 / 200)
    variance = 0.01 * 0.2 * 0.8 / 99 + 0.81 * 0.05 * 0.95 / 99
    assert estimate.std_error == pytest.approx(variance**0.5)
    assert estimate.ci_low < estimate.share < estimate.ci_high


def test_stratified_interval_covers_the_population_share() -> None:
    """Sample 250 features per layer from layers of unequal size and reasoning rate, as
    the paper did; the 95% interval should hold the true share about 95% of the time."""
    rng = np.random.default_rng(7)
    alive = {h: int(n) for h, n in enumerate(rng.integers(2000, 8192, size=28))}
    rates = {h: float(r) for h, r in enumerate(rng.uniform(0.0, 0.25, size=28))}
    truth = sum(alive[h] * rates[h] for h in alive) / sum(alive.values())
    covered, trials = 0, 400
    for _ in range(trials):
        counts = {h: int(rng.binomial(250, rates[h])) for h in alive}
        estimate = stratified(counts, dict.fromkeys(alive, 250), alive)
        covered += estimate.ci_low <= truth <= estimate.ci_high
    assert 0.92 <= covered / trials <= 0.98
    naive = sum(counts.values()) / (250 * 28)  # unweighted: biased when layers differ
    assert estimate.sample_share == pytest.approx(naive)


@pytest.mark.parametrize("command", ["summarize", "disputes", "export"])
def test_a_run_without_labels_says_so(run_copy: Path, command: str) -> None:
    assert_fails(labeler(command, run_copy), "no labels yet", "labeler label")


def test_a_store_with_a_plan_and_no_judgments_says_so(run_copy: Path) -> None:
    store = LabelStore(run_copy / "labels.sqlite")
    store.add_planned([("L0F1", 0, 1)])
    store.close()
    assert_fails(labeler("summarize", run_copy), "no labels yet")
    assert_fails(labeler("export", run_copy), "no labels yet")


def test_catalog_lists_failed_features_with_their_reason(
    two_judges: tuple[Path, dict[str, str]],
) -> None:
    run, _ = two_judges
    store = LabelStore(run / "labels.sqlite")
    planned = store.planned()
    failed_id = planned[0][0]
    store.put_failure(failed_id, "openai:broken", "invalid_reply: classify: not JSON", "h")
    store.close()
    line = _catalog(run)[failed_id]
    broken = [j for j in line["judgments"] if j["judge"] == "openai:broken"]  # type: ignore[attr-defined]
    assert broken[0]["status"] == "failed" and broken[0]["detection"] is None
    assert broken[0]["failure_reason"] == "invalid_reply: classify: not JSON"
    summary = json.loads(labeler("summarize", run, "--json").stdout)
    broken_summary = next(j for j in summary["judges"] if j["rater"] == "openai:broken")
    assert broken_summary["n_failed"] == 1
    assert broken_summary["n_unlabeled"] == len(planned) - 1
    frame = pl.DataFrame(list(_catalog(run).values()))
    assert frame.height == len(planned)


def test_wilson_interval_always_holds_its_share() -> None:
    from labeler.reporting.summarize import wilson

    for n in range(1, 3000):
        for count in (0, n):
            share = wilson(count, n)
            assert share.ci_low <= share.share <= share.ci_high, (count, n)
    lone = stratified({0: 1}, {0: 1}, {0: 100})  # one labeled feature: no spread known
    assert lone.std_error == pytest.approx(0.5) and lone.ci_low < 0.5


def test_unlabeled_layers_failed_features_and_odd_names(
    two_judges: tuple[Path, dict[str, str]],
) -> None:
    run, _ = two_judges
    store = LabelStore(run / "labels.sqlite")
    layer3 = [fid for fid, layer, _ in store.planned() if layer == 3]
    with store.transaction():
        store.conn.execute("DELETE FROM judgments WHERE feature_id LIKE 'L3F%'")
    store.put_failure(layer3[0], "heuristic", "error: ValueError: broken", "h")
    store.close()
    summary = json.loads(labeler("summarize", run, "--json").stdout)
    final = summary["final"]
    assert final["layers_without_labels"] == ["3"]
    assert final["n_alive_covered"] == summary["n_alive"] - summary["n_alive_by_layer"]["3"]
    text = labeler("summarize", run).stdout
    assert "no labels yet in layer(s) 3" in " ".join(text.split())

    queue = json.loads(labeler("disputes", run, "--json").stdout)
    failed = [q for q in queue if q["feature_id"] == layer3[0]]
    assert failed and failed[0]["reasons"] == ["all_failed"]
    assert failed[0]["categories"] == ["heuristic=failed"]

    # The catalog keeps the failed and the unjudged features of the layer, each with why.
    catalog = _catalog(run)
    assert {fid for fid, line in catalog.items() if line["layer"] == 3} == set(layer3)
    failure = catalog[layer3[0]]
    assert failure["label_source"] == "none" and failure["dispute_reasons"] == ["all_failed"]
    assert [(j["status"], j["failure_reason"]) for j in failure["judgments"]] == [  # type: ignore[union-attr]
        ("failed", "error: ValueError: broken")
    ]
    for fid in layer3[1:]:
        assert catalog[fid]["judgments"] == [] and catalog[fid]["label_source"] == "none"
        assert catalog[fid]["final_label"] == dict.fromkeys(
            ("category", "subcategory", "mechanism", "domain_type")
        )

    # A reviewer's name is text, never terminal markup.
    odd = "[/b][bold]x"
    result = labeler("decide", run, layer3[0], "--reviewer", odd, "--category", "language")
    assert result.returncode == 0, result.stderr
    assert odd in result.stdout
    listing = labeler("disputes", run, "--limit", "0")
    assert listing.returncode == 0, listing.stderr
    line = _catalog(run)[layer3[0]]
    assert line["label_source"] == "human" and line["label_source_detail"] == odd
    summarized = labeler("summarize", run)
    assert summarized.returncode == 0, summarized.stderr

    # A layer without a single judgment is still exported, its reviews kept.
    store = LabelStore(run / "labels.sqlite")
    with store.transaction():
        store.conn.execute("DELETE FROM judgments WHERE feature_id LIKE 'L3F%'")
    store.close()
    catalog = _catalog(run)
    sources = {fid: line["label_source"] for fid, line in catalog.items() if line["layer"] == 3}
    assert sources == {fid: "human" if fid == layer3[0] else "none" for fid in layer3}


def test_comparison_interval_is_honest_where_a_share_is_zero() -> None:
    """Five sampled features, none of them reasoning, against a large census at 2.6%: the
    standard error of the first is 0, yet it says little; the interval must cover 0."""
    from labeler.reporting.summarize import LabelSummary, RunSummary, compare

    def run(name: str, estimate: object) -> RunSummary:
        final = LabelSummary.model_construct(reasoning=estimate, by_category={},
                                             by_subcategory={})  # fmt: skip
        return RunSummary.model_construct(run=name, final=final)

    few = stratified({0: 0}, {0: 5}, {0: 8192})
    many = stratified({0: 213}, {0: 8192}, {0: 8192})
    assert few.std_error == 0.0 and few.ci_high > 0.3
    (row,) = compare(run("sample", few), run("census", many)).differences
    assert row.difference == pytest.approx(-213 / 8192)
    assert row.ci_low < row.difference < 0 < row.ci_high
    assert row.ci_high > 0.3  # as wide as what five features can tell
