"""A new user's first hour through the real CLI: every bad input is one line naming the
file (``error: FILE[:LINE]: what is wrong[; what to do]``), exit 2, no traceback, and
nothing half-written left looking complete; outputs follow one overwrite policy."""

from __future__ import annotations

import json
import resource
import signal
import sqlite3
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

from tests.conftest import CollectedDemo
from tests.test_bad_input import GOOD, LABELER, labeler


def one_line_error(result: subprocess.CompletedProcess[str], *needles: str, code: int = 2) -> str:
    """The error line of a failed command, checked to be the only one, with no traceback."""
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def test_version() -> None:
    result = labeler("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"labeler {version('transcoder-labeler')}"


# --- outputs: one overwrite policy, missing folders made, saying what was written ---


def test_export_makes_missing_folders_and_never_replaces_silently(
    labeled_copy: Path, tmp_path: Path
) -> None:
    target = tmp_path / "no" / "such" / "dir" / "c.jsonl"
    first = labeler("export", labeled_copy, "--out", target)
    assert first.returncode == 0, first.stderr
    assert f"to {target} (labels only" in first.stdout and "--with-examples" in first.stdout
    lines = target.read_text().splitlines()
    assert lines and "examples" not in json.loads(lines[0])

    again = labeler("export", labeled_copy, "--out", target, "--with-examples")
    one_line_error(again, str(target), "already exists", "--overwrite")
    assert target.read_text().splitlines() == lines  # untouched

    replaced = labeler("export", labeled_copy, "--out", target, "--with-examples", "--overwrite")
    assert replaced.returncode == 0, replaced.stderr
    assert "(with their examples)" in replaced.stdout
    assert "examples" in json.loads(target.read_text().splitlines()[0])

    # the same policy for the circuit-tracer folder, and for the default catalog path
    folder = tmp_path / "deep" / "ct"
    assert (
        labeler("export", labeled_copy, "--format", "circuit-tracer", "--out", folder).returncode
        == 0
    )
    again = labeler("export", labeled_copy, "--format", "circuit-tracer", "--out", folder)
    one_line_error(again, str(folder), "already exists", "--overwrite")
    assert labeler("export", labeled_copy).returncode == 0
    one_line_error(labeler("export", labeled_copy), "catalog.jsonl", "already exists")


def test_export_under_a_file_is_one_line(labeled_copy: Path, tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    result = labeler("export", labeled_copy, "--out", tmp_path / "afile" / "c.jsonl")
    one_line_error(result, "afile", "is a file, not a folder")


# --- collect checks the corpus, the output and the options before loading the model ---


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("case", ["bad_line", "missing_corpus", "existing_out", "empty", "shard"])
def test_collect_checks_its_inputs_before_the_model(tmp_path: Path, case: str) -> None:
    # the adapter does not exist: any error but the corpus's or the output's would mean
    # the model was loaded (or tried) first
    corpus = _write(tmp_path / "corpus.jsonl", [GOOD, GOOD])
    out = tmp_path / "run"
    extra: list[str] = []
    if case == "bad_line":
        _write(corpus, [GOOD, '{"conversations": 3}'])
        needles = (f"{corpus}:2", "'conversations'")
    elif case == "missing_corpus":
        corpus = tmp_path / "nope.jsonl"
        needles = (str(corpus), "not found")
    elif case == "existing_out":
        out.mkdir()
        needles = (str(out), "already exists", "--overwrite")
    elif case == "empty":
        _write(corpus, ["", "  "])
        needles = (str(corpus), "no traces")
    else:
        extra = ["--shard", "4/3"]
        needles = ("4/3",)
    result = labeler("collect", "--adapter", tmp_path / "no-model", "--corpus", corpus,
                     "--out", out, *extra)  # fmt: skip
    one_line_error(result, *needles)
    assert "no-model" not in result.stderr
    assert case == "existing_out" or not out.exists()


def test_invalid_utf8_corpus_names_the_line(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_bytes((GOOD + "\n").encode() + b'{"text": "caf\xe9 au lait"}\n')
    result = labeler("collect", "--adapter", tmp_path / "no-model", "--corpus", corpus,
                     "--out", tmp_path / "run")  # fmt: skip
    one_line_error(result, f"{corpus}:2", "not valid UTF-8", "0xE9")


# --- damaged run folders and stores ---


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("table", ["features.parquet", "examples.parquet"])
@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_a_damaged_table_is_named_and_label_writes_nothing(
    run_copy: Path, table: str, damage: str
) -> None:
    path = run_copy / table
    if damage == "empty":
        path.write_bytes(b"")
    else:
        _truncate(path)
    result = labeler("label", run_copy, "--judge", "heuristic")
    one_line_error(result, str(path), "empty" if damage == "empty" else "truncated")
    assert not (run_copy / "labels.sqlite").exists()


def test_a_damaged_table_is_named_by_every_reader(labeled_copy: Path) -> None:
    path = labeled_copy / "examples.parquet"
    _truncate(path)
    for command in (["summarize"], ["export"], ["review", "--reviewer", "a"], ["status"]):
        one_line_error(labeler(command[0], labeled_copy, *command[1:]), str(path), "truncated")


@pytest.mark.parametrize("damage", ["header", "truncated"])
def test_a_corrupt_label_store_is_named(labeled_copy: Path, damage: str) -> None:
    store = labeled_copy / "labels.sqlite"
    with sqlite3.connect(store) as conn:  # everything in the main file, no WAL beside it
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    data = bytearray(store.read_bytes())
    if damage == "header":
        data[:16] = b"not a database!!"
    else:
        del data[len(data) // 3 :]
        data[4096 * 2 : 4096 * 4] = b"\xa5" * 8192  # interior pages overwritten
    store.write_bytes(bytes(data))
    result = labeler("summarize", labeled_copy)
    one_line_error(result, str(store), "damaged")


# --- a full disk: simulated with a file size limit, which fails writes with EFBIG ---


def _limited(limit_bytes: int) -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))


def _labeler_on_small_disk(limit: int, *args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*LABELER, *map(str, args)], capture_output=True, text=True, timeout=300,
        check=False, preexec_fn=lambda: _limited(limit),
    )  # fmt: skip


def test_a_full_disk_during_export(labeled_copy: Path, tmp_path: Path) -> None:
    target = tmp_path / "out" / "catalog.jsonl"
    result = _labeler_on_small_disk(64_000, "export", labeled_copy, "--out", target,
                                    "--with-examples")  # fmt: skip
    one_line_error(result, str(target), "no space left")
    assert list(target.parent.iterdir()) == []  # no partial file left behind


def test_a_full_disk_during_summarize(labeled_copy: Path) -> None:
    summary = labeled_copy / "summary.json"
    named = set()
    for limit in (2_000, 40_000):  # the store's files fail first, then the plot
        result = _labeler_on_small_disk(limit, "summarize", labeled_copy)
        line = one_line_error(result, "free some disk space")
        named |= {name for name in ("labels.sqlite", "summary.json", "summary.png") if name in line}
        if summary.exists():  # whole or absent, never cut short
            json.loads(summary.read_text())
        assert not [p for p in labeled_copy.iterdir() if ".partial" in p.name]
    assert named == {"labels.sqlite", "summary.png"}, named


def test_a_full_disk_during_label(run_copy: Path) -> None:
    result = _labeler_on_small_disk(300_000, "label", run_copy, "--judge", "heuristic")
    one_line_error(result, str(run_copy / "labels.sqlite"), "free some disk space")
    # what was stored before the disk filled is intact, and a re-run finishes the job
    done = labeler("label", run_copy, "--judge", "heuristic")
    assert done.returncode == 0, done.stderr


def test_a_full_disk_during_collect(collected: CollectedDemo, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = _labeler_on_small_disk(
        200_000, "collect", "--adapter", collected.paths.checkpoint, "--corpus",
        collected.paths.corpus, "--out", out,
    )  # fmt: skip
    one_line_error(result, "run.partial", "no space left")
    assert not out.exists()


# --- anything unexpected: one line and a hint; -v shows the traceback ---

_BOOM = """
import sys
from labeler.cli.app import cli, main

@cli.command()
def boom() -> None:
    raise RuntimeError("kaboom\\nsecond line")

sys.argv = ["labeler", *sys.argv[1:]]
main()
"""


def test_an_unexpected_error_is_one_line_with_a_hint() -> None:
    quiet = subprocess.run([sys.executable, "-c", _BOOM, "boom"], capture_output=True,
                           text=True, timeout=60, check=False)  # fmt: skip
    line = one_line_error(quiet, "unexpected RuntimeError: kaboom", "-v", code=1)
    assert "second line" not in line
    loud = subprocess.run([sys.executable, "-c", _BOOM, "-v", "boom"], capture_output=True,
                          text=True, timeout=60, check=False)  # fmt: skip
    assert loud.returncode == 1 and "Traceback" in loud.stderr and "kaboom" in loud.stderr
