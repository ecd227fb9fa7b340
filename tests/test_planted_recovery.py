"""Ground truth: the planted features' meaning is recovered by collection and labeling."""

from __future__ import annotations

import json

import polars as pl

from collectors.run_format import read_run_info
from labeler.labeling.store import LabelStore
from labeler.reporting.ground_truth import compare_with_ground_truth
from labeler.reporting.summarize import summarize
from prompts import normalize_token
from tests.conftest import CollectedDemo

TOKEN_TRIGGERED = ("token_set", "template", "hesitation_output")


def _truth(demo: CollectedDemo) -> list[dict[str, object]]:
    return json.loads(demo.paths.ground_truth.read_text())


def test_planted_token_features_top_example_highlights_their_token(
    collected: CollectedDemo,
) -> None:
    top1 = (
        pl.read_parquet(collected.run / "examples.parquet")
        .filter((pl.col("kind") == "top") & (pl.col("rank") == 0))
        .select("feature_id", "tokens", "highlight")
    )
    by_id = {r["feature_id"]: r for r in top1.iter_rows(named=True)}
    token_features = [t for t in _truth(collected) if t["kind"] in TOKEN_TRIGGERED]
    assert len(token_features) == 640
    for truth in token_features:
        row = by_id[truth["feature_id"]]
        token = row["tokens"][row["highlight"]]
        assert (normalize_token(token) or token) in truth["triggers"], truth["feature_id"]


def test_dead_features_are_dead_and_alive_ones_alive(collected: CollectedDemo) -> None:
    features = pl.read_parquet(collected.run / "features.parquet")
    alive = dict(zip(features["feature_id"], features["alive"], strict=True))
    for truth in _truth(collected):
        assert alive[truth["feature_id"]] == (truth["category"] != "dead"), truth["feature_id"]


def test_heuristic_recovers_planted_categories(labeled: CollectedDemo) -> None:
    store = LabelStore(labeled.run / "labels.sqlite")
    report = compare_with_ground_truth(labeled.paths.ground_truth, store, "heuristic")
    store.close()
    assert report.n_interpretable == 640
    assert report.interpretable_accuracy >= 0.95
    assert report.accuracy_by_category["reasoning"] >= 0.95
    assert report.reasoning_subcategory_accuracy >= 0.9
    assert report.reasoning_mechanism_accuracy >= 0.9
    assert report.domain_type_accuracy >= 0.95


def test_summary_interval_contains_planted_reasoning_share(labeled: CollectedDemo) -> None:
    store = LabelStore(labeled.run / "labels.sqlite")
    summary = summarize(store, read_run_info(labeled.run), str(labeled.run)).final
    report = compare_with_ground_truth(labeled.paths.ground_truth, store, "heuristic")
    store.close()
    planted = report.planted_reasoning_share
    assert 0.07 <= planted <= 0.09
    assert summary.reasoning.ci_low <= planted <= summary.reasoning.ci_high
    assert summary.n_labeled == summary.n_planned == 960
    assert summary.n_failed == summary.n_unlabeled == 0
    assert set(summary.by_layer) == {"0", "1", "2", "3"}
    assert sum(s.count for s in summary.by_category.values()) == 960


def test_detection_separates_token_features_from_checked_negatives(
    labeled: CollectedDemo,
) -> None:
    store = LabelStore(labeled.run / "labels.sqlite")
    judgments = store.judgments("heuristic")
    store.close()
    truth = {t["feature_id"]: t for t in _truth(labeled)}
    token_sets = [
        judgments[fid].judgment
        for fid, t in truth.items()
        if t["kind"] == "token_set" and t["category"] != "language"
    ]
    mean_acc = sum(j.detection.accuracy for j in token_sets if j) / len(token_sets)
    assert mean_acc >= 0.9
    for j in token_sets:
        assert j is not None and j.detection.n_positive == 10 and j.detection.n_negative == 10
