"""The output score on the planted demo: steering the planted output features promotes
the words they were planted to promote, far more than steering input features does, and
the score reaches the summary, the catalog and a resumed run."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from labeler.causal.output_score import auroc
from labeler.labeling.store import LabelStore
from tests.conftest import CollectedDemo

LABELER = [sys.executable, "-c", "from labeler.cli import main; main()"]


def labeler(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*LABELER, *map(str, args)], capture_output=True, text=True,
                          timeout=600, check=False)  # fmt: skip


@pytest.fixture(scope="module")
def scored(labeled: CollectedDemo, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    run = tmp_path_factory.mktemp("scored") / "run"
    shutil.copytree(labeled.run, run)
    result = labeler("score-outputs", run)
    assert result.returncode == 0, result.stderr
    store = LabelStore(run / "labels.sqlite")
    try:
        scores = {fid: json.loads(p) for fid, p in store.output_scores().items()}
    finally:
        store.close()
    truth = {t["feature_id"]: t for t in json.loads(labeled.paths.ground_truth.read_text())}
    return {"run": run, "scores": scores, "truth": truth, "stdout": result.stdout}


def _split(scored: dict[str, Any], key: str) -> tuple[list[float], list[float]]:
    output, inputs = [], []
    for fid, score in scored["scores"].items():
        mechanism = scored["truth"][fid]["mechanism"]
        if mechanism == "output":
            output.append(score[key])
        elif mechanism in ("input_simple", "input_abstract"):
            inputs.append(score[key])
    return output, inputs


def test_every_alive_feature_is_scored(scored: dict[str, Any]) -> None:
    alive = [t for t in scored["truth"].values() if t["kind"] != "dead"]
    assert len(scored["scores"]) == len(alive) == 960
    for score in scored["scores"].values():
        assert score["size"] > 0 and score["kl"] >= 0 and 0 < score["p_value"] <= 1
        assert len(score["promoted"]) == 5 and score["tokens"]


def test_the_score_separates_planted_output_from_input_features(scored: dict[str, Any]) -> None:
    output, inputs = _split(scored, "logprob_change")
    assert len(output) >= 12 and len(inputs) >= 60
    assert auroc(output, inputs) >= 0.9
    significant_output, significant_input = _split(scored, "significant")
    assert sum(significant_output) / len(significant_output) >= 0.75
    assert sum(significant_input) / len(significant_input) <= 0.1


def test_steering_a_planted_output_feature_promotes_its_planted_words(
    scored: dict[str, Any],
) -> None:
    for fid, truth in scored["truth"].items():
        if truth["mechanism"] == "output" and truth["kind"] != "dead":
            promoted = [t.strip().lower() for t in scored["scores"][fid]["promoted"][:2]]
            assert set(promoted) <= set(truth["promotes"]), (fid, promoted)


def test_summary_and_catalog_carry_the_scores(scored: dict[str, Any], tmp_path: Path) -> None:
    run = scored["run"]
    summary = labeler("summarize", run, "--json")
    assert summary.returncode == 0, summary.stderr
    steering = json.loads(summary.stdout)["steering"]
    assert steering["n_scored"] == 960
    output = steering["by_mechanism"]["output"]
    assert output["n_scored"] >= 12 and output["share"] >= 0.75
    catalog = tmp_path / "catalog.jsonl"
    exported = labeler("export", run, "--out", catalog)
    assert exported.returncode == 0, exported.stderr
    lines = [json.loads(x) for x in catalog.read_text().splitlines()]
    by_id = {line["feature_id"]: line for line in lines}
    for fid, score in scored["scores"].items():
        assert by_id[fid]["output_score"]["logprob_change"] == pytest.approx(
            score["logprob_change"]
        )


def test_the_command_prints_progress_by_layer_and_the_top_features(
    scored: dict[str, Any],
) -> None:
    out = scored["stdout"]
    lines = out.splitlines()
    by_layer: dict[int, list[dict[str, Any]]] = {}
    for score in scored["scores"].values():
        by_layer.setdefault(score["layer"], []).append(score)
    for layer, scores in sorted(by_layer.items()):
        significant = sum(s["significant"] for s in scores)
        assert f"layer {layer}: {len(scores)} features scored, {significant} significant" in out
    # the top 10 by the judged statistic, in order, each with its promoted tokens
    top = sorted(scored["scores"].values(), key=lambda s: -s["lens_change"])[:10]
    assert "top 10 of 960 features by lens change" in out
    rows = [line for line in lines if line.startswith("│ L")]
    assert [row.split("│")[1].strip() for row in rows] == [s["feature_id"] for s in top]
    for row, score in zip(rows, top, strict=True):
        cells = [c.strip() for c in row.strip("│").split("│")]
        assert float(cells[1]) == pytest.approx(score["lens_change"], abs=0.01)
        assert cells[4] == ("yes" if score["significant"] else "no")
        assert cells[5].startswith(score["promoted"][0].strip()[:3])
    n_significant = sum(s["significant"] for s in scored["scores"].values())
    assert f"{n_significant} of 960 significant" in out
    assert "labeler export" in out  # where every feature's score is


def test_a_second_run_scores_nothing_again(scored: dict[str, Any]) -> None:
    again = labeler("score-outputs", scored["run"])
    assert again.returncode == 0, again.stderr
    assert "every selected feature (960) is scored already" in again.stdout


def test_a_run_split_over_invocations_scores_as_one_uninterrupted_run(
    scored: dict[str, Any], labeled: CollectedDemo, tmp_path: Path
) -> None:
    """Features scored over two invocations (a resumed run, or two selections) are
    judged against the null an uninterrupted run of every feature uses: each layer's
    is measured once, over all its alive features, and kept."""
    run = tmp_path / "run"
    shutil.copytree(labeled.run, run)
    layer = min(s["layer"] for s in scored["scores"].values())
    by_size = sorted((s["size"], fid) for fid, s in scored["scores"].items()
                     if s["layer"] == layer)  # fmt: skip
    third = len(by_size) // 3
    parts = [[fid for _, fid in by_size[third : third + 2]],
             [fid for _, fid in by_size[2 * third : 2 * third + 2]]]  # fmt: skip
    for number, part in enumerate(parts):
        ids = tmp_path / f"ids-{number}.txt"
        ids.write_text("\n".join(part) + "\n", encoding="utf-8")
        result = labeler("score-outputs", run, "--features", ids)
        assert result.returncode == 0, result.stderr
    store = LabelStore(run / "labels.sqlite")
    try:
        split = {fid: json.loads(p) for fid, p in store.output_scores().items()}
    finally:
        store.close()
    assert sorted(split) == sorted(parts[0] + parts[1])
    for fid, score in split.items():
        whole = scored["scores"][fid]
        assert score["null_high"] == pytest.approx(whole["null_high"], rel=1e-5), fid
        assert score["p_value"] == whole["p_value"], fid
