"""A killed collection resumes to the same run; shards merge to the same run; and the
bad inputs around both fail clearly without overwriting anything. All through the CLI."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest

from collectors.run_format import EXAMPLES, FEATURES, NEGATIVES, RUN_JSON
from collectors.state import STATE_FILE, read_state_meta
from tests.conftest import CollectedDemo
from tests.test_bad_input import labeler

OPTIONS = ("--batch-tokens", "1024", "--quantiles", "10", "--per-quantile", "2")
DIFFERS = {"created_at", "source", "shard"}  # provenance that may differ between equal runs


def collect_args(collected: CollectedDemo, out: Path, *extra: str) -> list[str]:
    paths = collected.paths
    return ["collect", "--adapter", str(paths.checkpoint), "--corpus", str(paths.corpus),
            "--out", str(out), *OPTIONS, *extra]  # fmt: skip


def assert_same_run(a: Path, b: Path) -> None:
    for table in (FEATURES, EXAMPLES, NEGATIVES):
        left, right = pl.read_parquet(a / table), pl.read_parquet(b / table)
        assert left.columns == right.columns, table
        assert left.equals(right), f"{table} differs between {a} and {b}"
    info_a = json.loads((a / RUN_JSON).read_text())
    info_b = json.loads((b / RUN_JSON).read_text())
    for key in DIFFERS:
        info_a.pop(key), info_b.pop(key)
    info_a.pop("corpus_path"), info_b.pop("corpus_path")
    assert info_a == info_b


@pytest.fixture(scope="module")
def single_run(collected: CollectedDemo, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("single") / "run"
    result = labeler(*collect_args(collected, out))
    assert result.returncode == 0, result.stderr
    return out


def start(args: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", "from labeler.cli import main; main()", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def kill_after_checkpoint(args: list[str], state: Path, after_batches: int) -> int:
    """Start a collection and SIGKILL it once its checkpoint holds more than
    ``after_batches`` batches; returns how many the checkpoint held when it died."""
    process = start(args)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            meta = read_state_meta(state.parent) if state.is_file() else None
            if meta is not None and len(meta.batches_done) > after_batches:
                os.kill(process.pid, signal.SIGKILL)
                break
            assert process.poll() is None, "finished before it could be killed"
            time.sleep(0.01)
        assert process.wait(timeout=30) == -signal.SIGKILL
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate()
    final = read_state_meta(state.parent)
    assert final is not None
    return len(final.batches_done)


@pytest.mark.slow
def test_killed_collection_resumes_to_the_same_run(
    collected: CollectedDemo, single_run: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    args = collect_args(collected, out, "--checkpoint-every", "8")
    state = tmp_path / ".run.partial" / "collect-state" / STATE_FILE
    first = kill_after_checkpoint(args, state, 0)
    assert not out.exists()  # nothing looks complete after a kill
    second = kill_after_checkpoint(args, state, first)  # resumed, then killed again
    assert second > first
    result = labeler(*args)
    assert result.returncode == 0, result.stderr
    assert "resuming from a checkpoint" in result.stdout
    assert not (tmp_path / ".run.partial").exists()
    assert not (out / "collect-state").exists()  # a whole run keeps no state
    assert_same_run(out, single_run)


@pytest.mark.slow
def test_shards_merge_into_the_single_run(
    collected: CollectedDemo, single_run: Path, tmp_path: Path
) -> None:
    shards = [tmp_path / f"shard{i}" for i in (1, 2, 3)]
    processes = [start(collect_args(collected, s, "--shard", f"{i}/3"))
                 for i, s in enumerate(shards, start=1)]  # fmt: skip
    for process in processes:
        _, err = process.communicate(timeout=300)
        assert process.returncode == 0, err
    tokens = [json.loads((s / RUN_JSON).read_text())["n_tokens"] for s in shards]
    total = json.loads((single_run / RUN_JSON).read_text())["n_tokens"]
    assert sum(tokens) == total and min(tokens) > total / 6  # a balanced split
    out = tmp_path / "merged"
    result = labeler("merge-runs", *map(str, reversed(shards)), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert json.loads((out / RUN_JSON).read_text())["source"] == "merge"
    assert_same_run(out, single_run)

    # Bad merges: a shard missing, a shard twice, shards of different collections.
    result = labeler("merge-runs", str(shards[0]), str(shards[1]), "--out", str(tmp_path / "x"))
    assert result.returncode == 2 and "missing shard(s) 3/3" in result.stderr
    result = labeler("merge-runs", str(shards[0]), str(shards[0]), str(shards[2]),
                     "--out", str(tmp_path / "x"))  # fmt: skip
    assert result.returncode == 2 and "given twice" in result.stderr
    other = tmp_path / "other2"
    result = labeler(*collect_args(collected, other, "--shard", "2/3", "--seed", "7"))
    assert result.returncode == 0, result.stderr
    result = labeler("merge-runs", str(shards[0]), str(other), str(shards[2]),
                     "--out", str(tmp_path / "x"))  # fmt: skip
    assert result.returncode == 2
    assert "not shards of one collection" in result.stderr and "params.seed" in result.stderr
    result = labeler("merge-runs", str(shards[0]), str(shards[1]), str(shards[2]),
                     "--out", str(out))  # fmt: skip
    assert result.returncode == 2 and "already exists" in result.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("spec", ["3/2", "0/2", "2", "a/b", "1/0"])
def test_bad_shard_spec(collected: CollectedDemo, tmp_path: Path, spec: str) -> None:
    result = labeler(*collect_args(collected, tmp_path / "run", "--shard", spec))
    assert result.returncode == 2
    assert f"--shard {spec!r}" in result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_resume_against_a_changed_corpus_is_refused(
    collected: CollectedDemo, tmp_path: Path
) -> None:
    corpus = tmp_path / "corpus.jsonl"
    shutil.copy(collected.paths.corpus, corpus)
    out = tmp_path / "run"
    args = collect_args(collected, out, "--checkpoint-every", "8")
    args[args.index("--corpus") + 1] = str(corpus)
    state = tmp_path / ".run.partial" / "collect-state" / STATE_FILE
    kill_after_checkpoint(args, state, 0)
    before = state.read_bytes()
    with corpus.open("a") as fh:  # one more trace: a different corpus
        fh.write(corpus.read_text().splitlines()[0] + "\n")
    result = labeler(*args)
    assert result.returncode == 2
    assert "holds a checkpoint of a different collection" in result.stderr
    assert "corpus_hash" in result.stderr and "--restart" in result.stderr
    assert state.read_bytes() == before and not out.exists()  # nothing overwritten
    result = labeler(*args, "--restart")
    assert result.returncode == 0, result.stderr
    assert json.loads((out / RUN_JSON).read_text())["n_sequences"] == 301
