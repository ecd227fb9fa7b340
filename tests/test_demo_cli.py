"""`labeler demo` as a user runs it: its cache of the planted model, the figures it prints
against those the docs state, and the CLI's start-up cost."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from collectors.demo_cache import CACHE_ENV, DEMO_FOLDER, MANIFEST, copy_verified
from tests.test_bad_input import labeler

ROOT = Path(__file__).resolve().parents[1]
# as a new user runs it: the installed script, from a shell without the venv on PATH
SCRIPT = Path(sys.executable).parent / "labeler"


@dataclass(frozen=True)
class Demo:
    out: Path
    stdout: str
    stderr: str

    def report(self) -> dict[str, Any]:
        return dict(json.loads((self.out / "ground_truth_report.json").read_text()))

    def summary(self) -> dict[str, Any]:
        return dict(json.loads((self.out / "run" / "summary.json").read_text()))

    def figures(self) -> dict[str, Any]:
        """What the demo prints about its labels: equal between runs of one seed (to nine
        decimals: a sum's order may move the last bit of a float)."""
        report, summary = self.report(), self.summary()
        return _rounded({"report": report, "reasoning": summary["final"]["reasoning"],
                         "n_planned": summary["n_planned"]})  # fmt: skip


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 9)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


def run_demo(out: Path, cache: Path, *options: str) -> Demo:
    env = {**os.environ, "PATH": "/usr/bin:/bin", CACHE_ENV: str(cache)}
    result = subprocess.run([SCRIPT, *options, "demo", "--out", out], capture_output=True,
                            text=True, timeout=900, env=env, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return Demo(out, result.stdout, result.stderr)


@pytest.fixture(scope="module")
def first_demo(tmp_path_factory: pytest.TempPathFactory, demo_cache: Path) -> Demo:
    """`labeler demo` with the session's cache of the planted model."""
    return run_demo(tmp_path_factory.mktemp("demo") / "demo", demo_cache)


def test_demo_end_to_end(first_demo: Demo, tmp_path: Path) -> None:
    out = first_demo.out
    # it ends with what to do next, spelled so that it works in that shell
    assert "\nnext:\n" in first_demo.stdout, first_demo.stdout[-2000:]
    assert f"{SCRIPT} summarize {out / 'run'}" in first_demo.stdout
    assert f"{SCRIPT} review {out / 'run'} --reviewer YOU" in first_demo.stdout
    assert "Reasoning features:" in first_demo.stdout
    assert "Against the planted ground truth" in first_demo.stdout
    assert re.search(r"^planted model: (built in \d+ s, cached in|reused from) ",
                     first_demo.stdout, re.M), first_demo.stdout[:2000]  # fmt: skip
    for produced in ("run/run.json", "run/features.parquet", "run/examples.parquet",
                     "run/labels.sqlite", "run/summary.json", "run/summary.png",
                     "run/catalog.jsonl", "inputs/ground_truth.json",
                     "inputs/model/config.json", "inputs/corpus.jsonl"):  # fmt: skip
        assert (out / produced).is_file(), produced
    assert not (out / "inputs" / MANIFEST).exists()  # the cache's bookkeeping stays there
    run_info = json.loads((out / "run" / "run.json").read_text())
    assert str(out / "inputs") in json.dumps(run_info)  # self-contained: its own inputs
    report, summary = first_demo.report(), first_demo.summary()
    assert report["interpretable_accuracy"] >= 0.95
    reasoning = summary["final"]["reasoning"]
    assert reasoning["ci_low"] <= report["planted_reasoning_share"] <= reasoning["ci_high"]
    catalog = (out / "run" / "catalog.jsonl").read_text().splitlines()
    assert len(catalog) == summary["n_planned"] and "examples" in json.loads(catalog[0])

    # A folder that is not a demo's is refused.
    other = tmp_path / "mine"
    other.mkdir()
    (other / "precious.txt").write_text("keep me")
    refused = labeler("demo", "--out", other)
    assert refused.returncode != 0 and "not a demo folder" in refused.stderr
    assert (other / "precious.txt").read_text() == "keep me"


def test_a_second_demo_reuses_the_planted_model(first_demo: Demo, demo_cache: Path) -> None:
    """The same folder again: the model comes from the cache, every phase is logged with
    its time, and the figures are the first run's."""
    again = run_demo(first_demo.out, demo_cache, "-v")
    assert re.search(r"^planted model: reused from .+ \(built \d{4}-\d\d-\d\d \d\d:\d\d UTC\)$",
                     again.stdout, re.M), again.stdout[:2000]  # fmt: skip
    assert "unembedding fit" not in again.stderr  # nothing was built
    phases = re.findall(r"demo phase ([a-z ]+): \d+\.\d s", again.stderr)
    assert phases == ["planted model", "collect", "label", "summarize", "export"]
    assert "matplotlib" not in again.stderr
    assert again.figures() == first_demo.figures()


def _private_cache(demo_cache: Path, tmp_path: Path) -> tuple[Path, Path, str]:
    """A copy of the session's cache (its one demo entry) to damage: the cache, the entry
    and the entry's key."""
    entries = demo_cache / DEMO_FOLDER
    (entry,) = [p for p in entries.iterdir() if p.is_dir() and p.name.startswith("demo-")]
    cache = tmp_path / "cache"
    shutil.copytree(entry, cache / DEMO_FOLDER / entry.name)
    key = json.loads((entry / MANIFEST).read_text())["key"]
    return cache, cache / DEMO_FOLDER / entry.name, key


def _weights(entry: Path) -> Path:
    (weights,) = (entry / "model").glob("*.safetensors")
    return weights


def test_a_damaged_cache_entry_is_found_said_and_built_anew(
    first_demo: Demo, demo_cache: Path, tmp_path: Path
) -> None:
    cache, entry, key = _private_cache(demo_cache, tmp_path)
    assert copy_verified(entry, key, tmp_path / "sound")[1] is None

    # a file missing
    missing = tmp_path / "missing"
    shutil.copytree(entry, missing)
    (missing / "ground_truth.json").unlink()
    _, problem = copy_verified(missing, key, tmp_path / "out-missing")
    assert problem == f"{missing / 'ground_truth.json'} is missing"

    # a manifest naming other hashes (the files changed and the manifest rewritten to
    # match something else) or another entry's key
    tampered = tmp_path / "tampered"
    shutil.copytree(entry, tampered)
    manifest = json.loads((tampered / MANIFEST).read_text())
    manifest["files"]["corpus.jsonl"] = "0" * 64
    (tampered / MANIFEST).write_text(json.dumps(manifest))
    _, problem = copy_verified(tampered, key, tmp_path / "out-tampered")
    assert (
        problem == f"{tampered / 'corpus.jsonl'} does not match its manifest (damaged or changed)"
    )
    _, problem = copy_verified(entry, "f" * 64, tmp_path / "out-key")
    assert problem == f"{entry / MANIFEST} names another entry's key or no files"

    # a byte flipped in the model's weights: the demo says so, builds it anew, and
    # prints the same figures
    weights = _weights(entry)
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    rebuilt = run_demo(tmp_path / "demo", cache)
    said = [line for line in rebuilt.stdout.splitlines() if line.startswith("planted model")]
    assert len(said) == 2, said
    assert said[0] == (
        f"planted model cache: {weights} does not match its manifest (damaged or changed); "
        "built anew"
    )
    assert said[1].startswith("planted model: built in ") and said[1].endswith(f"in {entry}")
    assert rebuilt.figures() == first_demo.figures()
    assert copy_verified(entry, key, tmp_path / "after")[1] is None
    leftovers = [p.name for p in (cache / DEMO_FOLDER).iterdir() if p.name.startswith(".")]
    assert not leftovers


# The figures the docs state about the demo sit between these markers; each is checked
# against what `labeler demo` wrote.
BEGIN, END = "<!-- demo figures: checked by tests/test_demo_cli.py -->", "<!-- end demo figures -->"
FIGURE_PATTERNS = {
    "interpretable_accuracy": r"category right for (\d+(?:\.\d)?)% of the \d+",
    "n_interpretable": r"category right for \d+(?:\.\d)?% of the (\d+)",
    "reasoning_mechanism_accuracy": r"mechanism (\d+(?:\.\d)?)%",
    "reasoning_subcategory_accuracy": r"subcategory (\d+(?:\.\d)?)%",
    "domain_type_accuracy": r"domain type (\d+(?:\.\d)?)%",
    "uninterpretable_right": r"(\d+) are labeled uninterpretable",
    "share": r"reasoning share (\d+\.\d)%",
    "ci_low": r"reasoning share \d+\.\d% \(95% CI (\d+\.\d)%",
    "ci_high": r"reasoning share \d+\.\d% \(95% CI \d+\.\d%[–-](\d+\.\d)%\)",
    "planted_reasoning_share": r"planted (\d+\.\d)%",
}
REQUIRED = {"interpretable_accuracy", "n_interpretable", "share", "ci_low", "ci_high"}


def stated_figures(text: str) -> list[dict[str, str]]:
    """The figures each marked passage of ``text`` states, by name."""
    passages = re.findall(re.escape(BEGIN) + r"(.*?)" + re.escape(END), text, re.S)
    found = []
    for passage in passages:
        flat = " ".join(passage.split())
        found.append({name: m.group(1) for name, pattern in FIGURE_PATTERNS.items()
                      if (m := re.search(pattern, flat))})  # fmt: skip
    return found


def printed_figures(demo: Demo) -> dict[str, str]:
    """The same figures as the demo prints them (one decimal of a percent)."""
    report, reasoning = demo.report(), demo.summary()["final"]["reasoning"]

    def pct(value: float) -> str:
        return f"{100 * value:.1f}"

    return {
        "interpretable_accuracy": pct(report["interpretable_accuracy"]),
        "n_interpretable": str(report["n_interpretable"]),
        "reasoning_mechanism_accuracy": pct(report["reasoning_mechanism_accuracy"]),
        "reasoning_subcategory_accuracy": pct(report["reasoning_subcategory_accuracy"]),
        "domain_type_accuracy": pct(report["domain_type_accuracy"]),
        "uninterpretable_right": str(report["confusion"]["uninterpretable"]["uninterpretable"]),
        "share": pct(reasoning["share"]),
        "ci_low": pct(reasoning["ci_low"]),
        "ci_high": pct(reasoning["ci_high"]),
        "planted_reasoning_share": pct(report["planted_reasoning_share"]),
    }


@pytest.mark.parametrize("doc", ["README.md", "docs/collecting.md", "BENCHMARKS.md"])
def test_the_docs_state_the_figures_the_demo_prints(first_demo: Demo, doc: str) -> None:
    stated = stated_figures((ROOT / doc).read_text(encoding="utf-8"))
    assert stated, f"{doc}: no passage marked {BEGIN}"
    printed = printed_figures(first_demo)
    for passage in stated:
        lacking = REQUIRED - set(passage)
        assert not lacking, f"{doc}: a marked passage lacks {lacking}"
        wrong = {k: (v, printed[k]) for k, v in passage.items() if float(v) != float(printed[k])}
        assert not wrong, f"{doc}: stated (left) against printed by `labeler demo` (right): {wrong}"


def test_cli_help_does_not_import_torch() -> None:
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from labeler.cli import cli\n"
        "result = CliRunner().invoke(cli, ['--help'])\n"
        "assert result.exit_code == 0 and 'collect' in result.output\n"
        "assert 'torch' not in sys.modules, 'torch imported at start-up'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
