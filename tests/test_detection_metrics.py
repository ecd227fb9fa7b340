"""Detection metrics that pass the sanity checks of Oikarinen et al. (ICML 2025): F1,
balanced accuracy and average precision (AUPRC), checked against hand-computed cases,
a brute-force definition, planted perfect and random explanations, and the labeled
demo's ground truth."""

from __future__ import annotations

import json
import random
import statistics
from pathlib import Path

import pytest

from collectors.demo_model import DemoPaths
from labeler.judges.metrics import (
    average_precision,
    balanced_accuracy,
    detection_score,
    f1_score,
)
from labeler.labeling.store import LabelStore
from labeler.run.schemas import DetectionScore
from tests.fake_llm import FakeLLMServer
from tests.test_bad_input import labeler
from tests.test_llm_judges import _label, fake, server  # noqa: F401 (fixtures)


def _brute_average_precision(labels: list[bool], scores: list[float]) -> float:
    """sklearn's definition read literally: for each distinct threshold t, from the
    highest, precision and recall of "score >= t"; AP = sum (R_t - R_prev) * P_t."""
    total = sum(labels)
    ap, previous_recall = 0.0, 0.0
    for t in sorted(set(scores), reverse=True):
        chosen = [y for y, s in zip(labels, scores, strict=True) if s >= t]
        tp = sum(chosen)
        recall = tp / total
        ap += (recall - previous_recall) * (tp / len(chosen))
        previous_recall = recall
    return ap


def test_average_precision_by_hand() -> None:
    # ranked: + - + -  -> P@1 = 1 (R 0.5), P@3 = 2/3 (R 1.0): AP = 0.5 + 0.5 * 2/3
    assert average_precision([True, False, True, False], [0.9, 0.8, 0.7, 0.1]) == pytest.approx(
        0.5 + 0.5 * 2 / 3
    )
    # sklearn's documented example: y = [0, 0, 1, 1], scores [0.1, 0.4, 0.35, 0.8] -> 0.8333
    assert average_precision([False, False, True, True], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(
        0.8333333333
    )
    # a tie across classes is one threshold: both enter at once, P = 1/2, R = 1
    assert average_precision([True, False], [0.5, 0.5]) == pytest.approx(0.5)
    # ties do not depend on the input order
    assert average_precision([False, True], [0.5, 0.5]) == pytest.approx(0.5)
    # a perfect ranking is 1, the worst ranking with one positive in four is 1/4
    assert average_precision([True, True, False], [0.9, 0.8, 0.1]) == 1.0
    assert average_precision([False, False, False, True], [0.9, 0.8, 0.7, 0.1]) == 0.25
    # undefined without both classes
    assert average_precision([True, True], [0.1, 0.2]) is None
    assert average_precision([False, False], [0.1, 0.2]) is None


def test_average_precision_matches_the_brute_force_definition() -> None:
    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(2, 30)
        labels = [rng.random() < 0.4 for _ in range(n)]
        if all(labels) or not any(labels):
            continue
        # coarse scores so that many ties occur, across and within classes
        scores = [rng.randint(0, 5) / 5 for _ in range(n)]
        assert average_precision(labels, scores) == pytest.approx(
            _brute_average_precision(labels, scores)
        )


def test_f1_and_balanced_accuracy_by_hand() -> None:
    labels = [True, True, True, False, False]
    predicted = [True, True, False, True, False]  # tp 2, fn 1, fp 1, tn 1
    assert f1_score(labels, predicted) == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    assert balanced_accuracy(labels, predicted) == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert f1_score([True, False], [False, False]) == 0.0
    assert f1_score([True, True], [True, True]) is None  # one class: undefined
    assert balanced_accuracy([False, False], [False, True]) is None


def test_detection_score_carries_the_new_metrics_and_nulls_them_with_one_class() -> None:
    score = detection_score([True, False, True, False], [True, False, False, False],
                            [0.9, 0.2, 0.4, 0.6])  # fmt: skip
    assert score.f1 == pytest.approx(2 / 3)
    assert score.balanced_accuracy == pytest.approx(0.75)
    assert score.auprc == pytest.approx(_brute_average_precision(
        [True, False, True, False], [0.9, 0.2, 0.4, 0.6]))  # fmt: skip
    without_probs = detection_score([True, False], [True, False])
    assert (without_probs.f1, without_probs.balanced_accuracy) == (1.0, 1.0)
    assert without_probs.auprc is None
    one_class = detection_score([True, True, True], [True, True, True], [0.9, 0.8, 0.7])
    assert one_class.undefined is not None
    assert (one_class.f1, one_class.balanced_accuracy, one_class.auprc) == (None, None, None)
    assert one_class.accuracy is None and one_class.recall == 1.0


def test_older_stored_scores_still_parse() -> None:
    old = {"accuracy": 0.5, "precision": 0.5, "recall": 0.5, "n_positive": 2, "n_negative": 2,
           "undefined": None, "auroc": None}  # fmt: skip
    score = DetectionScore.model_validate(old)
    assert (score.f1, score.balanced_accuracy, score.auprc) == (None, None, None)


def test_a_perfect_explanation_scores_one() -> None:
    rng = random.Random(1)
    for base_rate in (0.1, 0.5, 0.9):
        labels = [rng.random() < base_rate for _ in range(200)]
        probs = [0.6 + 0.4 * rng.random() if y else 0.4 * rng.random() for y in labels]
        score = detection_score(labels, labels, probs)
        assert (score.f1, score.balanced_accuracy, score.auroc, score.auprc, score.accuracy) == (
            1.0, 1.0, 1.0, 1.0, 1.0)  # fmt: skip


@pytest.mark.parametrize("base_rate", [0.1, 0.3, 0.5, 0.9])
def test_a_random_explanation_scores_chance_whatever_the_balance(base_rate: float) -> None:
    """Answers independent of the truth, saying 'active' as often as the feature is:
    F1 and AUPRC sit at the base rate, balanced accuracy and AUROC at 0.5."""
    rng = random.Random(int(base_rate * 100))
    scores: dict[str, list[float]] = {"f1": [], "balanced_accuracy": [], "auroc": [], "auprc": []}
    for _ in range(200):
        labels = [rng.random() < base_rate for _ in range(200)]
        predicted = [rng.random() < base_rate for _ in range(200)]
        score = detection_score(labels, predicted, [rng.random() for _ in range(200)])
        for name, values in scores.items():
            value = getattr(score, name)
            assert value is not None
            values.append(value)
    mean = {name: statistics.fmean(values) for name, values in scores.items()}
    assert mean["f1"] == pytest.approx(base_rate, abs=0.03)
    assert mean["auprc"] == pytest.approx(base_rate, abs=0.03)
    assert mean["balanced_accuracy"] == pytest.approx(0.5, abs=0.01)
    assert mean["auroc"] == pytest.approx(0.5, abs=0.01)


def test_always_active_is_not_rewarded_on_a_mostly_active_sample() -> None:
    """Plain accuracy drifts with the balance; balanced accuracy does not, and F1
    gives no free 1."""
    labels = [True] * 90 + [False] * 10
    score = detection_score(labels, [True] * 100)
    assert score.accuracy == pytest.approx(0.9)
    assert score.balanced_accuracy == pytest.approx(0.5)
    assert score.f1 == pytest.approx(2 * 0.9 / 1.9)  # precision 0.9, recall 1
    assert score.f1 is not None and score.f1 < 0.95
    rare = detection_score([True] * 10 + [False] * 90, [False] * 100)  # "never active"
    assert rare.accuracy == pytest.approx(0.9)
    assert (rare.balanced_accuracy, rare.f1) == (0.5, 0.0)


def test_summarize_reports_f1_by_category_and_layer(
    labeled_copy: Path, demo_paths: DemoPaths
) -> None:
    result = labeler("summarize", labeled_copy, "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    [heuristic] = [j for j in summary["judges"] if j["rater"] == "heuristic"]
    dist = heuristic["detection_distribution"]
    by_category = dist["by_category"]
    truth = json.loads(demo_paths.ground_truth.read_text())
    planted = {t["category"] for t in truth if t["category"] != "dead"}
    assert {"reasoning", "domain", "language", "uninterpretable"} <= planted
    n_labeled = heuristic["n_labeled"]
    for metric in ("f1", "balanced_accuracy"):
        for group in ("by_category", "by_layer"):
            cells = dist[group]
            assert sum(c[metric]["n"] for c in cells.values()) <= n_labeled
            for cell in cells.values():
                m = cell[metric]
                if m["n"]:
                    assert m["q1"] <= m["median"] <= m["q3"]
    assert sum(c["f1"]["n"] for c in by_category.values()) > 0.9 * n_labeled
    worst_interpretable = min(
        by_category[c]["f1"]["median"] for c in ("reasoning", "domain", "language")
    )
    assert worst_interpretable > by_category["uninterpretable"]["f1"]["median"]
    # against the planted truth, not the judge's own category: each feature's stored F1
    store = LabelStore(labeled_copy / "labels.sqlite")
    judged = [o.judgment for o in store.judgments("heuristic").values() if o.judgment]
    stored = {j.feature_id: j.detection.f1 for j in judged}
    assert all(j.detection.auprc is None for j in judged)  # the heuristic gives no probabilities
    store.close()
    f1_by_planted: dict[bool, list[float]] = {True: [], False: []}
    for t in truth:
        f1 = stored.get(t["feature_id"])
        if t["category"] != "dead" and f1 is not None:
            f1_by_planted[t["category"] != "uninterpretable"].append(f1)
    assert min(map(len, f1_by_planted.values())) >= 10
    assert statistics.median(f1_by_planted[True]) > statistics.median(f1_by_planted[False])

    text = labeler("summarize", labeled_copy)
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("detection F1"))
    end = next(i for i in range(start, len(lines)) if lines[i].startswith("└"))
    table = lines[start : end + 1]
    assert max(map(len, table)) <= 80, "\n".join(table)
    assert any("heuristic" in line and "reasoning" in line for line in table), "\n".join(table)
    assert sum("layer " in line for line in table) == len(
        heuristic["detection_distribution"]["by_layer"]
    )


def test_judge_probabilities_give_an_average_precision(
    run_copy: Path,
    fake: FakeLLMServer,  # noqa: F811 (the fixture imported above)
) -> None:
    _, store = _label(run_copy, fake, "chat", logprobs=True)
    judged = [s.judgment for s in store.judgments("openai:fake-model").values() if s.judgment]
    assert judged
    for j in judged:
        for score in (j.detection, *j.detection_by_set.values()):
            if score.undefined is None:
                assert score.auprc is not None and 0.0 < score.auprc <= 1.0
                assert score.f1 is not None and score.balanced_accuracy is not None
            else:
                assert score.auprc is None


def test_the_catalog_carries_the_metrics(labeled_copy: Path, tmp_path: Path) -> None:
    out = tmp_path / "catalog.jsonl"
    result = labeler("export", labeled_copy, "--out", out)
    assert result.returncode == 0, result.stderr
    scores = [
        judgment["detection"]
        for line in out.read_text().splitlines()
        for judgment in json.loads(line)["judgments"]
        if judgment["detection"] is not None
    ]
    assert len(scores) == 960
    defined = [s for s in scores if s["undefined"] is None]
    assert len(defined) == 954  # the demo's 6 features without a non-activating window
    assert all(0.0 <= s["f1"] <= 1.0 and 0.0 <= s["balanced_accuracy"] <= 1.0 for s in defined)
    assert all(s["f1"] is None and s["balanced_accuracy"] is None
               for s in scores if s["undefined"] is not None)  # fmt: skip
    assert all(s["auprc"] is None for s in scores)  # the heuristic gives no probabilities
    by_set = [s["by_set"][kind] for s in defined for kind in ("top", "random")
              if s["by_set"] and s["by_set"][kind]]  # fmt: skip
    assert by_set and all("f1" in entry for entry in by_set)
