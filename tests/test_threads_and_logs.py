"""Torch's thread count chosen when a command loads a model, and what ``-v`` logs."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from adapters.errors import AdapterError
from adapters.threads import THREADS_ENV, choose_threads, free_cores
from collectors.demo_model import DemoPaths
from tests.test_bad_input import LABELER


@pytest.mark.parametrize(
    ("cpus", "load", "default", "expected"),
    [
        (2, 0.1, 2, 2),  # a quiet machine: torch's default
        (2, 1.0, 2, 1),  # one core busy
        (2, 4.0, 2, 1),  # overloaded: never fewer than one
        (16, 5.4, 16, 11),  # rounded to the nearest core
        (16, 0.0, 8, 8),  # never more than torch's default
        (4, 0.0, 16, 4),  # never more than this process may use
    ],
)
def test_free_cores(cpus: int, load: float, default: int, expected: int) -> None:
    assert free_cores(cpus, load, default) == expected


def test_an_explicit_setting_wins_over_the_load() -> None:
    asked = choose_threads({THREADS_ENV: "3"}, cpus=2, load=8.0, default=2)
    assert (asked.threads, asked.automatic) == (3, False)
    omp = choose_threads({"OMP_NUM_THREADS": "1"}, cpus=16, load=0.0, default=1)
    assert (omp.threads, omp.automatic, omp.reason) == (1, False, "OMP_NUM_THREADS=1")
    both = choose_threads({THREADS_ENV: "2", "OMP_NUM_THREADS": "1"}, 16, 0.0, 1)
    assert both.threads == 2
    auto = choose_threads({}, cpus=2, load=1.2, default=2)
    assert (auto.threads, auto.automatic) == (1, True)
    with pytest.raises(AdapterError, match=f"{THREADS_ENV}=two: not a number of threads"):
        choose_threads({THREADS_ENV: "two"}, 2, 0.0, 2)


def _run(env: dict[str, str], *args: str | Path) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", THREADS_ENV)}
    return subprocess.run([*LABELER, *map(str, args)], capture_output=True, text=True,
                          timeout=300, check=False, env=clean | env)  # fmt: skip


def _collect_args(demo_paths: DemoPaths, out: Path) -> list[str | Path]:
    return ["collect", "--adapter", demo_paths.checkpoint, "--corpus", demo_paths.corpus,
            "--out", out, "--layers", "0"]  # fmt: skip


def test_collect_uses_the_threads_asked_for(demo_paths: DemoPaths, tmp_path: Path) -> None:
    by_env = _run({THREADS_ENV: "1"}, "-v", *_collect_args(demo_paths, tmp_path / "a"))
    assert by_env.returncode == 0, by_env.stderr
    lines = [line for line in by_env.stderr.splitlines() if "torch threads:" in line]
    assert len(lines) == 1 and "torch threads: 1 (LABELER_THREADS=1;" in lines[0], lines

    by_option = _run({}, "-v", "--threads", "2", *_collect_args(demo_paths, tmp_path / "b"))
    assert by_option.returncode == 0, by_option.stderr
    assert "torch threads: 2 (LABELER_THREADS=2;" in by_option.stderr

    by_omp = _run({"OMP_NUM_THREADS": "1"}, "-v", *_collect_args(demo_paths, tmp_path / "c"))
    assert by_omp.returncode == 0, by_omp.stderr
    assert "torch threads: 1 (OMP_NUM_THREADS=1;" in by_omp.stderr

    wrong = _run({THREADS_ENV: "0"}, *_collect_args(demo_paths, tmp_path / "d"))
    assert wrong.returncode == 2
    assert wrong.stderr.strip().splitlines() == [
        f"error: {THREADS_ENV}=0: not a number of threads; set it to a whole number of 1 "
        "or more, or unset it"
    ]


def test_verbose_keeps_library_debug_lines_out(labeled_copy: Path) -> None:
    verbose = _run({}, "-v", "summarize", labeled_copy)
    assert verbose.returncode == 0, verbose.stderr
    lines = verbose.stderr.splitlines()
    assert lines, "-v logged nothing"
    assert not [line for line in lines if "matplotlib" in line or "PIL" in line], lines[:5]
    assert any(" labeler." in line for line in lines), lines[:5]
    # -vv lets the libraries' own lines through
    very = _run({}, "-vv", "summarize", labeled_copy)
    assert very.returncode == 0, very.stderr
    assert any("matplotlib" in line for line in very.stderr.splitlines())
