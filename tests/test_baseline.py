"""``labeler baseline`` and ``summarize --baseline`` on the planted demo: the control's
frequencies match the run's per layer, its scores sit far below the planted features',
the comparison lands in summary.json with its numbers, and bad input is refused.
One baseline is built per session and shared."""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pytest
import torch

from labeler.baseline.control import firing_bias
from labeler.labeling.store import LabelStore
from tests.conftest import CollectedDemo
from tests.test_bad_input import assert_fails, labeler


@dataclass(frozen=True)
class Built:
    run: Path
    base: Path
    ground_truth: Path
    build: subprocess.CompletedProcess[str]


@pytest.fixture(scope="module")
def built(collected: CollectedDemo, tmp_path_factory: pytest.TempPathFactory) -> Built:
    """The demo run labeled with every scorer, and its baseline."""
    folder = tmp_path_factory.mktemp("baseline")
    run, base = folder / "run", folder / "base"
    shutil.copytree(collected.run, run)
    labeled = labeler("label", run, "--scorers", "detection,fuzz,intruder")
    assert labeled.returncode == 0, labeled.stderr
    build = labeler("baseline", run, "--out", base)
    assert build.returncode == 0, build.stderr
    return Built(run, base, collected.paths.ground_truth, build)


def _intruder(folder: Path) -> dict[str, float]:
    store = LabelStore(folder / "labels.sqlite")
    try:
        return {
            fid: s.judgment.intruder.accuracy
            for fid, s in store.judgments("heuristic").items()
            if s.judgment is not None
            and s.judgment.intruder is not None
            and s.judgment.intruder.accuracy is not None
        }
    finally:
        store.close()


def test_firing_bias_fires_on_the_asked_share() -> None:
    pre = torch.randn(1000, 4, generator=torch.Generator().manual_seed(0))
    bias = firing_bias(pre, torch.tensor([0.0, 0.001, 0.1, 1.0]))
    fired = ((pre + bias) > 0).sum(0).tolist()
    assert fired == [0, 1, 100, 1000]


def test_control_matches_the_runs_frequencies_per_layer(built: Built) -> None:
    def alive(folder: Path) -> pl.DataFrame:
        return pl.read_parquet(folder / "features.parquet").filter(pl.col("alive"))

    run, base = alive(built.run), alive(built.base)
    run_info = json.loads((built.run / "run.json").read_text())
    base_info = json.loads((built.base / "run.json").read_text())
    assert base_info["layers"] == run_info["layers"]
    assert base_info["n_features_per_layer"] == run_info["n_features_per_layer"]
    assert base_info["params"] == run_info["params"]
    assert Path(base_info["adapter_path"]) == built.base / "control-adapter"
    for layer in run_info["layers"]:
        mine = run.filter(pl.col("layer") == layer)["frequency"].median()
        theirs = base.filter(pl.col("layer") == layer)["frequency"].median()
        assert isinstance(mine, float) and isinstance(theirs, float)
        assert mine / 2 <= theirs <= mine * 2, (layer, mine, theirs)
    made = json.loads((built.base / "baseline.json").read_text())
    assert made["kind"] == "control"
    assert made["control_of"] == str(built.run.resolve())
    assert sorted(made["layers"]) == [str(la) for la in run_info["layers"]]


def test_baseline_labels_a_sample_with_the_runs_judge(built: Built) -> None:
    store = LabelStore(built.base / "labels.sqlite")
    try:
        assert store.judges() == ["heuristic"]
        judged = store.judgments("heuristic")
    finally:
        store.close()
    n_layers = len(json.loads((built.run / "run.json").read_text())["layers"])
    assert len(judged) == 50 * n_layers
    assert all(s.judgment is not None and s.judgment.fuzz is not None for s in judged.values())


def test_control_intruder_scores_sit_far_below_the_planted_features(built: Built) -> None:
    truth = {g["feature_id"]: g for g in json.loads(built.ground_truth.read_text())}
    run, base = _intruder(built.run), _intruder(built.base)
    planted = [v for fid, v in run.items() if truth.get(fid, {}).get("kind") == "token_set"]
    control = list(base.values())
    assert len(control) >= 150 and len(planted) >= 100
    # chance is 1 in 5 windows; random directions still catch some token patterns
    # (Heap et al. 2025), so the control sits above chance but far below the planted
    assert statistics.median(control) <= 0.5
    assert statistics.median(planted) >= 0.9
    above = sorted(control)[int(0.95 * len(control))]
    assert sum(v >= above for v in planted) / len(planted) > 0.5


def test_summarize_with_baseline_reports_the_comparison(built: Built) -> None:
    result = labeler("summarize", built.run, "--baseline", built.base)
    assert result.returncode == 0, result.stderr
    summary = json.loads((built.run / "summary.json").read_text())
    comparison = summary["baseline"]
    assert comparison["baseline"] == str(built.base)
    assert comparison["same_run"] is True
    rows = {row["metric"]: row for row in comparison["metrics"]}
    assert {"detection.f1", "fuzz.f1", "intruder.accuracy", "intruder.p_value"} <= set(rows)
    intruder = rows["intruder.accuracy"]
    assert intruder["run"]["median"] > intruder["baseline"]["median"]
    assert intruder["n_reach"] / intruder["run"]["n"] == pytest.approx(intruder["share_reach"])
    assert intruder["share_reach_ci"][0] > intruder["baseline_share_reach"]
    assert intruder["separates"] is True
    assert 0.0 <= intruder["reasoning_among_reach"] <= 1.0
    assert rows["intruder.p_value"]["lower_is_better"] is True
    assert comparison["separates"] is True
    assert intruder["sentence"] in " ".join(result.stdout.split())
    assert "intruder.accuracy: median 1.00 vs baseline" in intruder["sentence"]


def test_rerun_resumes_without_collecting_again(built: Built) -> None:
    before = (built.base / "features.parquet").stat().st_mtime_ns
    again = labeler("baseline", built.run, "--out", built.base)
    assert again.returncode == 0, again.stderr
    assert "collected already" in again.stderr
    assert "0 labeled now" in again.stdout
    assert (built.base / "features.parquet").stat().st_mtime_ns == before


def test_bad_input_is_refused_plainly(built: Built, tmp_path: Path) -> None:
    assert_fails(labeler("summarize", built.run, "--baseline", built.run), "not a baseline run")
    assert_fails(labeler("baseline", tmp_path / "nowhere", "--out", tmp_path / "b"), "not found")
    (tmp_path / "taken").mkdir()
    assert_fails(
        labeler("baseline", built.run, "--out", tmp_path / "taken"), "is not a baseline run"
    )
    assert_fails(labeler("baseline", built.base, "--out", tmp_path / "b2"), "itself a baseline")
