"""``labeler intervene`` on the planted demo: its hesitation circuit is known, so the
study must find it (the output features' ablation removes the hesitation words, adding
them to the hybrid brings some back) and must not find it in matched random controls."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from labeler.causal.measures import last_boxed
from labeler.causal.records import ResultLog
from labeler.errors import UserError
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


def _figure(folder: Path) -> tuple[dict[str, str], Any]:
    """The study's PNG metadata, and its figure drawn again from its report.json by the
    function that drew it (what each mark is, without reading pixels)."""
    from PIL import Image

    from labeler.causal.plot import study_figure
    from labeler.causal.results import StudyReport

    with Image.open(folder / "study.png") as png:
        metadata = dict(png.text)  # type: ignore[attr-defined]
    report = StudyReport.model_validate_json((folder / "report.json").read_text())
    return metadata, study_figure(report, metadata["Title"])


def _intervals(fig: Any) -> list[tuple[float, float, float]]:
    """Every plotted interval as (x, low, high)."""
    out = []
    for ax in fig.axes:
        for collection in ax.collections:
            if collection.get_gid() == "interval":
                for segment in collection.get_segments():
                    (x, y0), (_, y1) = segment
                    out.append((float(x), min(y0, y1), max(y0, y1)))
    return out


def test_the_figure_names_the_selection_and_measure_and_no_rate_interval_crosses_zero(
    studies: dict[str, Any],
) -> None:
    """The title is the selection and the measure (not the run folder's name); the
    intervals drawn are each rate's own bootstrap interval, never below zero, though the
    ablated rate is near zero and its change's interval spans more than the rate."""
    import matplotlib.pyplot as plt

    for name, measure in (("sampled", "sampled"), ("forced", "teacher-forced")):
        metadata, fig = _figure(studies["folder"] / name)
        assert metadata["Title"] == f"{HESITATION_OUTPUT} · {measure}"
        assert fig._suptitle.get_text() == metadata["Title"]
        assert "95% percentile bootstrap interval" in metadata["Description"]
        intervals = _intervals(fig)
        assert len(intervals) == 2 * len(fig.axes) == 4  # reference and selection, per mode
        assert all(low >= 0 for _, low, _ in intervals), intervals
        plt.close(fig)
    ablated = mode(studies["sampled"], "ablated")["selection"]
    assert ablated["reference_rate"] + ablated["low"] < 0  # what the old figure drew
    assert 0 <= ablated["rate_low"] <= ablated["rate"] <= ablated["rate_high"]


def test_the_printed_p_value_names_its_resolution(studies: dict[str, Any]) -> None:
    from rich.console import Console

    from labeler.causal.results import StudyReport
    from labeler.cli.render_study import render_study

    console = Console(record=True, width=240)
    render_study(console, StudyReport.model_validate(studies["sampled"]))
    lines = console.export_text().splitlines()
    for name in ("ablated", "added"):
        p = mode(studies["sampled"], name)["p_value"]
        assert mode(studies["sampled"], name)["smallest_p"] == pytest.approx(1 / 4)
        assert f"{name}: p = {p:.3g}" in "\n".join(lines)
    assert (
        "ablated: p = 0.25, the smallest possible with 3 controls; --controls 19 for p ≤ 0.05"
        in lines
    )


def test_the_default_controls_reach_p_005_on_the_demo(
    labeled: CollectedDemo, tmp_path: Path
) -> None:
    """Without --controls the study draws 19 distinct controls, so a selection beyond
    every control gets p = 0.05, and the terminal says it is the smallest possible."""
    out = tmp_path / "forced"
    result = labeler("intervene", labeled.run, "--select", HESITATION_OUTPUT,
                     "--teacher-forced", "--modes", "ablated", "--limit", "8",
                     "--out", out)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stdout + result.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["n_controls"] == report["controls_asked"] == 19
    ablated = mode(report, "ablated")
    assert len(ablated["controls"]) == 19 and ablated["p_value"] == pytest.approx(0.05)
    assert "ablated: p = 0.05, the smallest possible with 19 controls\n" in result.stdout
    plan = json.loads((out / "plan.json").read_text())
    sets = [frozenset(c["features"]) for c in plan["conditions"] if c["control"] is not None]
    assert len(sets) == len(set(sets)) == 19


def _a_small_pool(run: Path) -> tuple[list[str], int]:
    """One feature: its controls are each one other feature of its layer's frequency
    decile, so there are as many distinct control sets as the decile has other
    features. The deciles are cut as the study cuts them (a layer's alive features
    ranked by frequency, then index)."""
    import polars as pl

    from labeler.run.data import RunData

    features = RunData.open(run).features
    layer = features.filter(pl.col("alive") & (pl.col("layer") == 0)).sort("frequency", "index")
    n = layer.height
    decile = [i for rank, i in enumerate(layer["index"].to_list()) if rank * 10 // n == 0]
    return [f"L0F{decile[0]}"], len(decile) - 1


def test_a_pool_with_fewer_distinct_controls_than_asked_gives_each_once(
    labeled: CollectedDemo, tmp_path: Path
) -> None:
    selection, distinct = _a_small_pool(labeled.run)
    ids = tmp_path / "ids.txt"
    ids.write_text("\n".join(selection) + "\n", encoding="utf-8")
    asked = distinct + 4
    out = tmp_path / "small"
    result = labeler("intervene", labeled.run, "--features", ids, "--teacher-forced",
                     "--controls", asked, "--modes", "ablated", "--limit", "2", "--out", out,
                     "--json")  # fmt: skip
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning")]
    assert len(warnings) == 1, result.stderr
    assert warnings[0].startswith(
        f"warning: asked for {asked} controls, drew {distinct} distinct: only {distinct} "
        "distinct matched control sets exist (choosing "
    ), warnings
    assert f"p-values are over the {distinct}" in warnings[0]
    report = json.loads(result.stdout)
    assert report["n_controls"] == distinct and report["controls_asked"] == asked
    plan = json.loads((out / "plan.json").read_text())
    sets = [frozenset(c["features"]) for c in plan["conditions"] if c["control"] is not None]
    assert len(sets) == len(set(sets)) == distinct
    assert all(not s & set(selection) and len(s) == len(selection) for s in sets)
    ablated = mode(report, "ablated")
    effect = abs(ablated["selection"]["difference"])
    beyond = sum(abs(c["difference"]) >= effect for c in ablated["controls"])
    assert len(ablated["controls"]) == distinct
    assert ablated["p_value"] == pytest.approx((1 + beyond) / (1 + distinct))
    assert ablated["smallest_p"] == pytest.approx(1 / (1 + distinct))


def test_a_zero_rate_is_drawn_as_a_zero(labeled: CollectedDemo, tmp_path: Path) -> None:
    """A word the model never says: every rate is zero, and every bar of zero height
    carries its mark on the axis and the label "0", with an interval of [0, 0]."""
    import matplotlib.pyplot as plt

    prompts = write_prompts(labeled.paths.corpus, tmp_path / "prompts.jsonl", 2)
    out = tmp_path / "zero"
    result = labeler("intervene", labeled.run, "--select", HESITATION_OUTPUT, "--prompts",
                     prompts, "--words", "zebra", "--controls", "1", "--modes", "ablated",
                     "--max-new-tokens", "4", "--out", out)  # fmt: skip
    assert result.returncode == 0, result.stderr
    _, fig = _figure(out)
    (ax,) = fig.axes
    bars = [(p.get_x() + p.get_width() / 2, p.get_height()) for p in ax.patches
            if type(p).__name__ == "Rectangle"]  # fmt: skip
    assert [h for _, h in bars] == [0, 0]
    zeros = [line.get_xdata()[0] for line in ax.lines if line.get_gid() == "zero-bar"]
    labels = [t.xy[0] for t in ax.texts if t.get_text() == "0"]
    assert sorted(zeros) == sorted(labels) == sorted(x for x, _ in bars)
    assert all(low == high == 0 for _, low, high in _intervals(fig))
    plt.close(fig)


def test_more_controls_extend_a_finished_study(
    studies: dict[str, Any], labeled: CollectedDemo, tmp_path: Path
) -> None:
    """Controls are drawn in a seeded order, so a study asked for more of them keeps
    every condition it measured and measures only the new controls; asking for other
    controls than those there is still refused."""
    folder = tmp_path / "forced"
    shutil.copytree(studies["folder"] / "forced", folder)
    before_plan = json.loads((folder / "plan.json").read_text())
    before_log = (folder / "teacher_forced.jsonl").read_bytes()
    args = ["intervene", labeled.run, "--select", HESITATION_OUTPUT, "--teacher-forced",
            "--limit", "60", "--out", folder, "--json"]  # fmt: skip
    result = labeler(*args, "--controls", "5")
    assert result.returncode == 0, result.stderr
    assert "resuming: 600 of 840 traces already read" in result.stderr  # 10 of 14 conditions
    after_log = (folder / "teacher_forced.jsonl").read_bytes()
    assert after_log.startswith(before_log) and len(after_log.splitlines()) == 840
    plan = json.loads((folder / "plan.json").read_text())
    measured = {c["name"] for c in before_plan["conditions"]}
    kept = [c for c in plan["conditions"] if c["name"] in measured]
    assert kept == before_plan["conditions"]
    report = json.loads(result.stdout)
    assert report["n_controls"] == 5 and report["complete"]
    other_seed = labeler(*args, "--controls", "5", "--seed", "1", timeout=120)
    assert other_seed.returncode != 0 and "--seed 0 there, 1 now" in other_seed.stderr


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
    kept = written[: written.rfind(b"\n") + 1].splitlines()
    torn = int(not written.endswith(b"\n"))  # a line cut off is kept, and skipped
    assert 8 <= len(kept) < total
    resumed = labeler(*args[3:], "--json")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming: {len(kept)} of {total} responses already generated" in resumed.stderr
    lines = log_path.read_bytes().splitlines()
    assert lines[: len(kept)] == kept  # nothing it had was generated again
    assert len(lines) == total + torn  # and nothing twice
    uninterrupted = ResultLog(studies["folder"] / "sampled" / "generations.jsonl",
                              ("condition", "prompt", "sample"))  # fmt: skip
    for row in ResultLog(log_path, ("condition", "prompt", "sample")):
        key = (row["condition"], row["prompt"], row["sample"])
        assert uninterrupted.rows[key]["text"] == row["text"], key


def test_a_log_line_cut_off_by_a_kill_is_skipped_and_kept(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    path.write_text('{"k": 1, "v": "a"}\n{"k": 2, "v": "b"}\n{"k": 3, "v"', encoding="utf-8")
    log = ResultLog(path, ("k",))
    assert sorted(r["k"] for r in log) == [1, 2]
    log.add([{"k": 3, "v": "c"}])
    lines = path.read_text().splitlines()
    assert lines[2] == '{"k": 3, "v"'  # the log is only ever appended to
    assert json.loads(lines[3]) == {"k": 3, "v": "c"}  # on a line of its own
    assert [(d.line, d.reason) for d in log.damaged] == [(3, "cut off")]
    assert sorted(r["k"] for r in ResultLog(path, ("k",))) == [1, 2, 3]


def test_a_damaged_line_in_the_middle_of_a_log_cuts_nothing(tmp_path: Path) -> None:
    """Lines after a damaged one are results like any other: opening the log keeps
    every byte, and names each damaged line."""
    path = tmp_path / "log.jsonl"
    written = (b'{"k": 1, "v": "a"}\n{"k": 2, "v\n{}\n[1]\n\xff\xfe\n{"k": 5, "v": "e"}\n'
               b'{"k": 6, "v": "f"}\n')  # fmt: skip
    path.write_bytes(written)
    log = ResultLog(path, ("k",))
    assert sorted(r["k"] for r in log) == [1, 5, 6]
    assert path.read_bytes() == written
    assert [d.line for d in log.damaged] == [2, 3, 4, 5]
    path.write_bytes(written + b'{"k": "7", "v": "g"}\n{"k": true, "v": "h"}\n')
    typed = ResultLog(path, ("k",), {"k": int, "v": str})  # with a result's fields, typed
    assert sorted(r["k"] for r in typed) == [1, 5, 6]
    assert [d.line for d in typed.damaged] == [2, 3, 4, 5, 8, 9]


def resumed_copy(studies: dict[str, Any], labeled: CollectedDemo, tmp_path: Path,
                 *extra: str | Path) -> tuple[Path, list[str | Path]]:  # fmt: skip
    """A copy of the finished sampled study, and the arguments that resume it."""
    folder = tmp_path / "sampled"
    shutil.copytree(studies["folder"] / "sampled", folder)
    args: list[str | Path] = ["intervene", labeled.run, "--select", HESITATION_OUTPUT,
                              "--prompts", studies["prompts"], *SAMPLED, "--out", folder,
                              *extra]  # fmt: skip
    return folder, args


def test_damaged_generation_lines_are_named_and_only_they_are_generated_again(
    studies: dict[str, Any], labeled: CollectedDemo, tmp_path: Path
) -> None:
    folder, args = resumed_copy(studies, labeled, tmp_path, "--json")
    log_path = folder / "generations.jsonl"
    lines = log_path.read_bytes().splitlines(keepends=True)
    lost = [json.loads(lines[4]), json.loads(lines[8])]
    lines[4] = b"{}\n"
    lines[8] = lines[8][:30] + b"\n"
    damaged = b"".join(lines)
    log_path.write_bytes(damaged)
    resumed = labeler(*args)
    assert resumed.returncode == 0, resumed.stderr
    for line in (5, 9):
        assert f"warning: {log_path}:{line}: a damaged line" in resumed.stderr
    assert "resuming: 158 of 160 responses already generated" in resumed.stderr
    after = log_path.read_bytes()
    assert after.startswith(damaged)  # every line after the damaged ones is kept
    regenerated = [json.loads(x) for x in after[len(damaged) :].splitlines()]
    assert sorted(regenerated, key=str) == sorted(lost, key=str)  # the same draws
    assert json.loads(resumed.stdout)["complete"]


def _writes_up_to(limit: int) -> Callable[[], None]:
    """A file size limit for a child process: a write past ``limit`` bytes fails with
    EFBIG ("File too large"), as a write to a full disk fails with ENOSPC."""

    def limit_writes() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the signal kills the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return limit_writes


def test_a_full_disk_keeps_the_earlier_report_and_figure(
    studies: dict[str, Any], labeled: CollectedDemo, tmp_path: Path
) -> None:
    folder, args = resumed_copy(studies, labeled, tmp_path)
    # the selection's ids from a file, as the labels would give them: the store is not
    # opened, so the only files written are the outputs
    plan = json.loads((folder / "plan.json").read_text())
    ids = tmp_path / "ids.txt"
    ids.write_text("\n".join(next(c["features"] for c in plan["conditions"]
                                  if c["name"] == "ablated")), encoding="utf-8")  # fmt: skip
    args[2:4] = ["--features", ids]
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    report, figure = before["report.json"], before["study.png"]
    assert 1024 < len(report) < len(figure)
    # first the report cannot be written, then (the report fits) the figure cannot
    for limit, name in ((1024, "report.json"), ((len(report) + len(figure)) // 2, "study.png")):
        result = subprocess.run([*LABELER, *map(str, args)], capture_output=True, text=True,
                                timeout=600, check=False,
                                preexec_fn=_writes_up_to(limit))  # fmt: skip
        assert result.returncode != 0
        assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # and no temp
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert f"{folder / name}: no space left" in result.stderr, result.stderr


def test_a_study_resumed_in_another_dtype_is_refused(
    studies: dict[str, Any], labeled: CollectedDemo, tmp_path: Path
) -> None:
    plan = json.loads((studies["folder"] / "sampled" / "plan.json").read_text())
    other = "bfloat16" if plan.get("dtype") == "float32" else "float32"
    _, args = resumed_copy(studies, labeled, tmp_path, "--dtype", other)
    result = labeler(*args, timeout=120)
    assert result.returncode != 0
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert f"--dtype {plan.get('dtype')} there, {other} now" in result.stderr


QUICK = ("--controls", "0", "--modes", "ablated", "--max-new-tokens", "4", "--limit", "2")


@pytest.mark.parametrize(
    ("second", "needle"),
    [
        (b'{"prompt": "caf\xe9"}', "prompts.jsonl:2: not valid UTF-8 (byte 0xE9"),
        ('{"prompt": "Solve <｜User｜> this"}'.encode(),
         "prompts.jsonl:2: field 'prompt' already holds the chat marker '<｜User｜>'"),
        (b'{"conversations": [{"from": "human", "value": "<|im_start|>user hi"}]}',
         "already holds the chat marker '<|im_start|>'"),
        (json.dumps({"prompt": "wait " * 5000}).encode(),
         "model's context of 2,048 tokens; shorten the prompt or lower --max-new-tokens"),
    ],
)  # fmt: skip
def test_prompts_are_checked_as_a_corpus_is(
    second: bytes, needle: str, labeled: CollectedDemo, tmp_path: Path
) -> None:
    prompts = write_prompts(labeled.paths.corpus, tmp_path / "prompts.jsonl", 1)
    prompts.write_bytes(prompts.read_bytes() + second + b"\n")
    result = labeler("intervene", labeled.run, "--select", HESITATION_OUTPUT, "--prompts",
                     prompts, *QUICK, "--out", tmp_path / "s", timeout=300)  # fmt: skip
    assert result.returncode != 0
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert needle in result.stderr, result.stderr
    assert "prompts.jsonl:2: " in result.stderr


def test_a_prompt_of_megabytes_is_refused_from_its_head(labeled: CollectedDemo) -> None:
    """Only as much of a huge prompt is encoded as the context could hold, so refusing
    it costs what a short prompt costs."""
    from adapters.tokenizer_loading import load_tokenizer
    from labeler.causal.prompts import Prompt, check_lengths

    tokenizer = load_tokenizer(labeled.paths.checkpoint)
    encoded: list[int] = []
    encode = tokenizer.encode

    def counting(text: str, **kwargs: Any) -> list[int]:
        encoded.append(len(text))
        return list(encode(text, **kwargs))

    tokenizer.encode = counting
    huge = Prompt("huge", "wait " * 1_000_000, line=7)
    with pytest.raises(UserError, match=r"^P:7: the prompt is at least [\d,]+ tokens"):
        check_lengths([huge], tokenizer, 2048, 512, Path("P"))
    assert encoded and max(encoded) < 200_000


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
