"""``labeler intervene`` on the planted demo: its hesitation circuit is known, so the
study must find it (the output features' ablation removes the hesitation words, adding
them to the hybrid brings some back) and must not find it in matched random controls."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from labeler.causal.measures import last_boxed
from labeler.causal.records import ResultLog
from tests.conftest import CollectedDemo

LABELER = [sys.executable, "-c", "from labeler.cli import main; main()"]
HESITATION_OUTPUT = "category=reasoning,subcategory=hesitation,mechanism=output"


def labeler(*args: str | Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*LABELER, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, check=False)  # fmt: skip


def write_prompts(corpus: Path, path: Path, n: int) -> Path:
    with path.open("w", encoding="utf-8") as out:
        for line in corpus.read_text(encoding="utf-8").splitlines()[:n]:
            record = json.loads(line)
            question, response = (t["value"] for t in record["conversations"])
            prompt = {"id": record["id"], "prompt": question}
            if (answer := last_boxed(response)) is not None:
                prompt["answer"] = answer
            out.write(json.dumps(prompt) + "\n")
    return path


def truth(demo: CollectedDemo, kind: str) -> list[str]:
    planted = json.loads(demo.paths.ground_truth.read_text(encoding="utf-8"))
    return [t["feature_id"] for t in planted if t["kind"] == kind]


SAMPLED = ("--controls", "3", "--max-new-tokens", "128", "--limit", "16", "--seed", "3")


@pytest.fixture(scope="module")
def studies(labeled: CollectedDemo, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One sampled and one teacher-forced study of the heuristic-labeled hesitation output
    features."""
    folder = tmp_path_factory.mktemp("studies")
    prompts = write_prompts(labeled.paths.corpus, folder / "prompts.jsonl", 16)
    sampled = labeler("intervene", labeled.run, "--select", HESITATION_OUTPUT, "--prompts",
                      prompts, *SAMPLED, "--out", folder / "sampled", "--json")  # fmt: skip
    assert sampled.returncode == 0, sampled.stderr
    forced = labeler("intervene", labeled.run, "--select", HESITATION_OUTPUT,
                     "--teacher-forced", "--controls", "3", "--limit", "60",
                     "--out", folder / "forced", "--json")  # fmt: skip
    assert forced.returncode == 0, forced.stderr
    return {"sampled": json.loads(sampled.stdout), "forced": json.loads(forced.stdout),
            "folder": folder, "prompts": prompts}  # fmt: skip


def mode(report: dict[str, Any], name: str) -> dict[str, Any]:
    return next(m for m in report["modes"] if m["mode"] == name)


def test_the_selection_is_the_planted_hesitation_output_features(
    studies: dict[str, Any], labeled: CollectedDemo
) -> None:
    report = studies["sampled"]
    selected = next(c for c in report["conditions"] if c["name"] == "ablated")
    assert (
        report["n_selected"] == selected["n_features"] == len(truth(labeled, "hesitation_output"))
    )
    assert report["n_controls"] == 3 and report["complete"]
    plan = json.loads((studies["folder"] / "sampled" / "plan.json").read_text())
    ablated = next(c for c in plan["conditions"] if c["name"] == "ablated")
    assert sorted(ablated["features"]) == sorted(truth(labeled, "hesitation_output"))
    controls = [c for c in plan["conditions"] if c["control"] is not None]
    for control in controls:  # matched per layer, never the selection itself
        assert not set(control["features"]) & set(ablated["features"])
        layers = sorted(f.split("F")[0] for f in control["features"])
        assert layers == sorted(f.split("F")[0] for f in ablated["features"])


def test_ablating_the_output_features_halves_the_rate_and_controls_do_not(
    studies: dict[str, Any],
) -> None:
    ablated = mode(studies["sampled"], "ablated")
    effect = ablated["selection"]
    assert effect["reference_rate"] > 10  # the adapter model hesitates a lot
    assert effect["rate"] <= 0.5 * effect["reference_rate"]
    assert effect["high"] < 0  # the interval excludes zero
    for control in ablated["controls"]:
        assert control["low"] <= 0 <= control["high"], control
    assert ablated["p_value"] == pytest.approx(1 / 4)  # beyond every control


def test_adding_the_output_features_to_the_hybrid_raises_the_rate(
    studies: dict[str, Any],
) -> None:
    added = mode(studies["sampled"], "added")
    assert added["selection"]["reference"] == "hybrid"
    assert added["selection"]["low"] > 0
    for control in added["controls"]:
        assert control["low"] <= 0 <= control["high"], control


def test_teacher_forced_and_sampled_agree_in_sign(studies: dict[str, Any]) -> None:
    forced = studies["forced"]
    assert forced["measure"] == "teacher_forced" and forced["complete"]
    assert forced["unspelled_words"] == []  # wait, hmm and alternatively are single tokens
    for name in ("ablated", "added"):
        sampled, teacher = mode(studies["sampled"], name), mode(forced, name)
        assert (sampled["selection"]["difference"] > 0) == (teacher["selection"]["difference"] > 0)
        assert teacher["selection"]["low"] > 0 or teacher["selection"]["high"] < 0
        assert all(abs(c["difference"]) < abs(teacher["selection"]["difference"]) / 10
                   for c in teacher["controls"])  # fmt: skip


def test_the_study_writes_its_figure_and_measures_every_condition(
    studies: dict[str, Any],
) -> None:
    folder = studies["folder"] / "sampled"
    assert (folder / "study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = studies["sampled"]
    names = {c["name"] for c in report["conditions"]}
    assert {"baseline", "hybrid", "ablated", "added"} <= names and len(names) == 10
    for c in report["conditions"]:
        assert c["n"] == 16 and 0 < c["tokens"] <= 16 * 128
        assert c["n_with_reference"] > 0 and 0 <= c["accuracy"] <= 1
    log = ResultLog(folder / "generations.jsonl", ("condition", "prompt", "sample"))
    assert len(log) == 10 * 16


def test_a_stopped_study_resumes_without_regenerating(
    studies: dict[str, Any], labeled: CollectedDemo, tmp_path: Path
) -> None:
    """Killed after some batches, the study resumes; what it had is kept, the rest is
    generated, and every response is what the uninterrupted study drew (each response
    has its own seed, whatever batch or study it lands in)."""
    out = tmp_path / "study"
    args = [*LABELER, "intervene", str(labeled.run), "--select", HESITATION_OUTPUT,
            "--prompts", str(studies["prompts"]), *SAMPLED, "--controls", "1",
            "--modes", "ablated", "--batch-size", "4", "--out", str(out)]  # fmt: skip
    total = 3 * 16  # baseline, ablated, control-1-ablated
    log_path = out / "generations.jsonl"
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if log_path.exists() and len(log_path.read_bytes().splitlines()) >= 8:
            break
        time.sleep(0.05)
    assert process.poll() is None, "the study ended before it could be stopped"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=60)
    written = log_path.read_bytes()
    kept = written[: written.rfind(b"\n") + 1].splitlines()  # a line cut off is dropped
    assert 8 <= len(kept) < total
    resumed = labeler(*args[3:], "--json")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming: {len(kept)} of {total} responses already generated" in resumed.stderr
    lines = log_path.read_bytes().splitlines()
    assert lines[: len(kept)] == kept  # nothing it had was generated again
    assert len(lines) == total  # and nothing twice
    uninterrupted = ResultLog(studies["folder"] / "sampled" / "generations.jsonl",
                              ("condition", "prompt", "sample"))  # fmt: skip
    for row in ResultLog(log_path, ("condition", "prompt", "sample")):
        key = (row["condition"], row["prompt"], row["sample"])
        assert uninterrupted.rows[key]["text"] == row["text"], key


def test_a_log_line_cut_off_by_a_kill_is_dropped(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    path.write_text('{"k": 1, "v": "a"}\n{"k": 2, "v": "b"}\n{"k": 3, "v"', encoding="utf-8")
    log = ResultLog(path, ("k",))
    assert sorted(r["k"] for r in log) == [1, 2]
    log.add([{"k": 3, "v": "c"}])
    assert [json.loads(x)["k"] for x in path.read_text().splitlines()] == [1, 2, 3]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--select", "category=reasoning,mechanism=outputs"], "mechanism is one of"),
        (["--select", "colour=red"], "no label field 'colour'"),
        (["--select", "category=reasoning"], "--prompts FILE is needed"),
        (["--select", "category=domain,domain_type=code,mechanism=output", "--prompts", "P"],
         "no feature matches"),
        (["--prompts", "P"], "choose the features"),
        (["--features", "IDS", "--prompts", "P"], "ids.txt:2: not a feature id"),
        (["--select", "category=reasoning", "--prompts", "NOPE"], "NOPE: no such prompts file"),
        (["--select", "category=reasoning", "--prompts", "P", "--words", "wait,2x"],
         "expected comma-separated words"),
    ],
)  # fmt: skip
def test_bad_input_is_one_clear_line(
    args: list[str], needle: str, labeled: CollectedDemo, tmp_path: Path
) -> None:
    prompts = write_prompts(labeled.paths.corpus, tmp_path / "prompts.jsonl", 2)
    ids = tmp_path / "ids.txt"
    ids.write_text("L2F1\nnot-an-id\n", encoding="utf-8")
    resolved = [str(prompts) if a == "P" else str(ids) if a == "IDS" else
                str(tmp_path / a) if a == "NOPE" else a for a in args]  # fmt: skip
    result = labeler("intervene", labeled.run, *resolved, "--out", tmp_path / "s", timeout=120)
    assert result.returncode != 0
    assert needle in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
