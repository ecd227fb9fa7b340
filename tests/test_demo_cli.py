"""`labeler demo` as a user runs it, and the CLI's start-up cost."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.test_bad_input import labeler


def test_demo_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    # as a new user runs it: the installed script, from a shell without the venv on PATH
    script = Path(sys.executable).parent / "labeler"
    env = {**os.environ, "PATH": "/usr/bin:/bin"}
    result = subprocess.run([script, "demo", "--out", out], capture_output=True, text=True,
                            timeout=600, env=env, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr
    # it ends with what to do next, spelled so that it works in that shell
    assert "\nnext:\n" in result.stdout, result.stdout[-2000:]
    assert f"{script} summarize {out / 'run'}" in result.stdout
    assert f"{script} review {out / 'run'} --reviewer YOU" in result.stdout
    assert "Reasoning features:" in result.stdout
    assert "Against the planted ground truth" in result.stdout
    for produced in ("run/run.json", "run/features.parquet", "run/examples.parquet",
                     "run/labels.sqlite", "run/summary.json", "run/summary.png",
                     "run/catalog.jsonl", "inputs/ground_truth.json",
                     "inputs/model/config.json"):  # fmt: skip
        assert (out / produced).is_file(), produced
    report = json.loads((out / "ground_truth_report.json").read_text())
    summary = json.loads((out / "run" / "summary.json").read_text())
    assert report["interpretable_accuracy"] >= 0.95
    reasoning = summary["final"]["reasoning"]
    assert reasoning["ci_low"] <= report["planted_reasoning_share"] <= reasoning["ci_high"]
    catalog = (out / "run" / "catalog.jsonl").read_text().splitlines()
    assert len(catalog) == summary["n_planned"] and "examples" in json.loads(catalog[0])

    # A second run replaces the demo folder; a folder that is not a demo's is refused.
    other = tmp_path / "mine"
    other.mkdir()
    (other / "precious.txt").write_text("keep me")
    refused = labeler("demo", "--out", other)
    assert refused.returncode != 0 and "not a demo folder" in refused.stderr
    assert (other / "precious.txt").read_text() == "keep me"


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
