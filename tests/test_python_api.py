"""The Python API (docs/python.md) on the planted demo: every ```python block of the doc
runs as written against a labeled demo run, and the API gives what the CLI gives."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from labeler.errors import USER_ERRORS, UserError
from tests.conftest import CollectedDemo
from tests.test_bad_input import labeler

DOC = Path(__file__).resolve().parents[1] / "docs" / "python.md"
DOC_RUN = "demo-run/run"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```$", text, flags=re.DOTALL | re.MULTILINE)


def test_every_python_block_of_the_doc_runs(labeled_copy: Path, tmp_path: Path) -> None:
    blocks = python_blocks(DOC.read_text(encoding="utf-8"))
    assert len(blocks) == 8
    script = "\n\n".join(blocks)
    for name in ("open_run(", "labels()", "summary()", "audit(", "feature(", "label(", "study(",
                 "effects("):  # fmt: skip
        assert name in script, name
    assert script.count(DOC_RUN) == 1
    (tmp_path / "doc.py").write_text(script.replace(DOC_RUN, str(labeled_copy)), encoding="utf-8")
    result = subprocess.run([sys.executable, "doc.py"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=600, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.startswith("[0, 1, 2, 3] 256\n")  # the first block's documented print
    assert "no feature L9F0; its layers are 0, 1, 2, 3, each with 256 features" in out
    assert out.endswith("no-such-run: run folder not found\n")
    assert result.stderr == ""  # quiet by default: no progress, no warnings
    report = json.loads((labeled_copy / "interventions" / "teacher-forced" / "report.json")
                        .read_text())  # fmt: skip
    assert report["n_controls"] == 3 and report["complete"]


def test_labels_and_summary_are_the_commands(labeled_copy: Path) -> None:
    import labeler as api

    run = api.open_run(labeled_copy)
    labels = run.labels()
    exported = labeler("export", labeled_copy, "--out", labeled_copy / "catalog.jsonl")
    assert exported.returncode == 0, exported.stderr
    lines = [json.loads(line) for line in (labeled_copy / "catalog.jsonl").read_text().splitlines()]
    assert labels["feature_id"].to_list() == [line["feature_id"] for line in lines]
    for row, line in zip(labels.iter_rows(named=True), lines, strict=True):
        assert {k: row[k] for k in line["final_label"]} == line["final_label"]
        assert row["source"] == line["label_source"]
    summarized = labeler("summarize", labeled_copy, "--json")
    assert summarized.returncode == 0, summarized.stderr
    cli = json.loads(summarized.stdout)
    mine = run.summary().model_dump(mode="json")
    for key in ("final", "judges", "n_alive", "n_planned", "disputes"):
        assert same(mine[key], cli[key]), key


def same(a: object, b: object) -> bool:
    """Equal, floats to within rounding (a sum's order may differ between two readings)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    return a == b


def test_one_feature_holds_its_examples_judgments_and_label(labeled_copy: Path) -> None:
    import labeler as api

    run = api.open_run(labeled_copy)
    labels = run.labels()
    fid = labels.filter(pl.col("category") == "reasoning")["feature_id"][0]
    feature = run.feature(fid)
    assert (feature.layer, feature.index) == tuple(map(int, fid[1:].split("F")))
    assert run.feature((feature.layer, feature.index)).feature_id == fid
    stored = run.examples.filter(pl.col("feature_id") == fid).collect()
    assert feature.examples.height == stored.height > 0
    assert feature.examples["activation"].to_list() == stored["activation"].to_list()
    assert feature.judgments["judge"].to_list() == ["heuristic"]
    assert feature.label == labels.filter(pl.col("feature_id") == fid).row(0, named=True)
    assert feature.stats["feature_id"] == fid and feature.stats["alive"]
    assert feature.neighbours is None  # until labeler browse builds them
    with pytest.raises(UserError, match="no feature L0F999999"):
        run.feature("L0F999999")
    with pytest.raises(UserError, match="bad-id"):
        run.feature("bad-id")


def test_a_features_neighbours_once_built(labeled: CollectedDemo, labeled_copy: Path) -> None:
    """The planted pair of output features promoting the same words in layer 2 (their
    decoder columns one direction plus noise) are each other's first decoder neighbour."""
    import labeler as api
    from labeler.review.neighbours import ensure_neighbours
    from labeler.run.data import RunData

    ensure_neighbours(RunData.open(labeled_copy), device="cpu").close()
    truth = json.loads(labeled.paths.ground_truth.read_text())
    pairs: dict[tuple[int, tuple[str, ...]], list[str]] = {}
    for planted in truth:
        if planted.get("promotes"):
            pairs.setdefault((planted["layer"], tuple(planted["promotes"])), []).append(
                planted["feature_id"]
            )
    a, b = next(ids for ids in pairs.values() if len(ids) == 2)
    near = api.open_run(labeled_copy).feature(a).neighbours
    assert near is not None
    decoder = near.filter(pl.col("kind") == "decoder").sort("rank")
    assert decoder["feature_id"][0] == b and decoder["value"][0] > 0.9
    assert set(near["kind"]) == {"decoder", "encoder", "coactivation"}


def test_label_from_python_plans_what_the_command_plans(
    collected_copies: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    import labeler as api

    by_api, by_cli = collected_copies
    with pytest.raises(UserError, match="no labels yet"):
        api.open_run(by_api).labels()
    reports = api.label(by_api, "heuristic", sample_per_layer=5, seed=3)
    report = reports["heuristic"]
    layers = api.open_run(by_api).info.layers
    assert (report.planned, report.labeled, report.failed) == (5 * len(layers), 5 * len(layers), 0)
    result = labeler("label", by_cli, "--sample-per-layer", "5", "--seed", "3")
    assert result.returncode == 0, result.stderr
    mine, theirs = api.open_run(by_api).labels(), api.open_run(by_cli).labels()
    assert mine.height == 5 * len(layers)
    assert mine.equals(theirs)
    assert capsys.readouterr() == ("", "")  # quiet by default
    again = api.label(by_api, ["heuristic"], sample_per_layer=5, seed=3, progress=True)
    assert (again["heuristic"].skipped, again["heuristic"].labeled) == (5 * len(layers), 0)
    assert "labeling (heuristic)" in capsys.readouterr().err


def test_a_study_of_listed_features_with_the_commands_settings(labeled_copy: Path) -> None:
    import labeler as api

    run = api.open_run(labeled_copy)
    chosen = run.labels().filter(pl.col("mechanism") == "output")["feature_id"].to_list()[:3]
    report = api.study(run, features=chosen, teacher_forced=True, controls=0, limit=4,
                       modes=["ablated"], words=["wait"], out=labeled_copy / "mine")  # fmt: skip
    assert report.n_selected == len(chosen) == 3 and report.n_controls == 0
    assert report.words == ["wait"] and [m.mode for m in report.modes] == ["ablated"]
    assert {c.name for c in report.conditions} == {"baseline", "ablated"}
    assert all(c.n == 4 for c in report.conditions)
    stored = json.loads((labeled_copy / "mine" / "report.json").read_text())
    assert stored == report.model_dump(mode="json")
    frame = api.effects(report)
    assert frame.rows() == [("ablated", "selection", "ablated", "baseline",
                             report.modes[0].selection.reference_rate,
                             report.modes[0].selection.rate,
                             report.modes[0].selection.difference,
                             report.modes[0].selection.low, report.modes[0].selection.high,
                             None)]  # fmt: skip


def test_bad_inputs_raise_user_errors_not_exits(run_copy: Path) -> None:
    import labeler as api

    with pytest.raises(UserError, match="unknown judge 'nonsense'"):
        api.label(run_copy, "nonsense")
    with pytest.raises(UserError, match="concurrency"):
        api.label(run_copy, concurrency=0)
    # the request's checks are the command's, whoever makes the request
    with pytest.raises(UserError, match="not with --executor batch"):
        api.label(run_copy, "openai:gpt-5-mini", executor="batch", budget_usd=5.0)
    with pytest.raises(UserError, match="--max-inflight applies to --executor celery and batch"):
        api.label(run_copy, max_inflight=4)
    with pytest.raises(UserError, match="n_examples"):
        api.label(run_copy, options={"n_examples": 0})
    with pytest.raises(USER_ERRORS, match="run folder not found"):
        api.open_run(run_copy.parent / "nowhere")
    with pytest.raises(UserError, match="--select"):
        api.study(run_copy, teacher_forced=True)
    with pytest.raises(TypeError, match="unknown setting 'control'"):
        api.study(run_copy, select="category=reasoning", control=3)


def test_import_labeler_stays_light() -> None:
    heavy = "('torch', 'transformers', 'polars')"
    code = ("import sys, labeler; labeler.open_run; labeler.label; labeler.study; "
            f"print(sorted(m for m in {heavy} if m in sys.modules))")  # fmt: skip
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.fixture
def collected_copies(collected: object, tmp_path: Path) -> list[Path]:
    import shutil

    from tests.conftest import CollectedDemo

    assert isinstance(collected, CollectedDemo)
    copies = [tmp_path / "api", tmp_path / "cli"]
    for copy in copies:
        shutil.copytree(collected.run, copy)
    return copies
