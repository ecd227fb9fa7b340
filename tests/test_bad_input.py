"""Bad input: a clear message naming the file, line or field, a non-zero exit, and no
half-written output that looks complete."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from collectors.run_format import RUN_JSON
from tests.conftest import CollectedDemo

LABELER = [sys.executable, "-c", "from labeler.cli import main; main()"]


def labeler(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*LABELER, *map(str, args)], capture_output=True, text=True, timeout=300, check=False
    )


def collect(ckpt: Path, corpus: Path, out: Path) -> subprocess.CompletedProcess[str]:
    return labeler("collect", "--adapter", ckpt, "--corpus", corpus, "--out", out)


def assert_fails(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode != 0, result.stdout
    for needle in needles:
        assert needle in result.stderr, result.stderr


@pytest.fixture
def ckpt(collected: CollectedDemo, tmp_path: Path) -> Path:
    copy = tmp_path / "ckpt"
    shutil.copytree(collected.paths.checkpoint, copy)
    return copy


def test_missing_checkpoint(collected: CollectedDemo, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = collect(tmp_path / "nope", collected.paths.corpus, out)
    assert_fails(result, "nope", "no such checkpoint folder")
    assert not out.exists()


def test_config_without_transcoder_keys(
    collected: CollectedDemo, ckpt: Path, tmp_path: Path
) -> None:
    config = json.loads((ckpt / "config.json").read_text())
    del config["transcoder_n_features"]
    (ckpt / "config.json").write_text(json.dumps(config))
    result = collect(ckpt, collected.paths.corpus, tmp_path / "run")
    assert_fails(result, "config.json", "transcoder_n_features")
    assert not (tmp_path / "run").exists()


def test_tensor_shape_mismatch(collected: CollectedDemo, ckpt: Path, tmp_path: Path) -> None:
    config = json.loads((ckpt / "config.json").read_text())
    config["transcoder_n_features"] = 300
    (ckpt / "config.json").write_text(json.dumps(config))
    result = collect(ckpt, collected.paths.corpus, tmp_path / "run")
    assert_fails(result, "model.layers.0.mlp.transcoder_enc.weight", "[256, 128]", "[300, 128]")


def test_corrupt_safetensors(collected: CollectedDemo, ckpt: Path, tmp_path: Path) -> None:
    weights = ckpt / "model.safetensors"
    weights.write_bytes(b"\x00\x01garbage" + weights.read_bytes()[:100])
    result = collect(ckpt, collected.paths.corpus, tmp_path / "run")
    assert_fails(result, "model.safetensors", "corrupt")


def _corpus(tmp_path: Path, lines: list[str]) -> Path:
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


GOOD = json.dumps(
    {"conversations": [{"from": "human", "value": "1+1?"},
                       {"from": "gpt", "value": "<think>\nWait, 2.\n</think>\n2"}],
     "domain": "math"}
)  # fmt: skip


def test_corpus_line_not_json(collected: CollectedDemo, tmp_path: Path) -> None:
    corpus = _corpus(tmp_path, [GOOD, "{not json"])
    result = collect(collected.paths.checkpoint, corpus, tmp_path / "run")
    assert_fails(result, f"{corpus}:2", "not valid JSON")
    assert not (tmp_path / "run").exists()


def test_corpus_line_without_conversation(collected: CollectedDemo, tmp_path: Path) -> None:
    corpus = _corpus(tmp_path, [GOOD, GOOD, json.dumps({"text": "hello"})])
    result = collect(collected.paths.checkpoint, corpus, tmp_path / "run")
    assert_fails(result, f"{corpus}:3", "'conversations'")


def test_empty_corpus(collected: CollectedDemo, tmp_path: Path) -> None:
    corpus = _corpus(tmp_path, [""])
    result = collect(collected.paths.checkpoint, corpus, tmp_path / "run")
    assert_fails(result, "no traces")
    assert not (tmp_path / "run").exists()


def test_trace_without_think_end_is_kept_and_counted(
    collected: CollectedDemo, tmp_path: Path
) -> None:
    cut = json.dumps(
        {"conversations": [{"from": "human", "value": "2+2?"},
                           {"from": "gpt", "value": "<think>\nHmm, wait, maybe 4"}]}
    )  # fmt: skip
    corpus = _corpus(tmp_path, [GOOD, cut])
    result = collect(collected.paths.checkpoint, corpus, tmp_path / "run")
    assert result.returncode == 0, result.stderr
    assert "1 without </think>; all kept" in result.stdout
    info = json.loads((tmp_path / "run" / RUN_JSON).read_text())
    assert info["n_sequences"] == 2 and info["n_unterminated_think"] == 1
    assert info["domains"] == {"math": 1, "unknown": 1}
    assert info["tokens_by_region"]["answer"] > 0  # the good trace's answer only
    assert info["tokens_by_region"]["think_end"] == 1


def test_existing_run_is_not_overwritten(collected: CollectedDemo, run_copy: Path) -> None:
    before = (run_copy / RUN_JSON).read_text()
    result = collect(collected.paths.checkpoint, collected.paths.corpus, run_copy)
    assert_fails(result, "already exists", "--overwrite")
    assert (run_copy / RUN_JSON).read_text() == before


def test_unknown_judge(run_copy: Path) -> None:
    result = labeler("label", run_copy, "--judge", "oracle:gpt-9")
    assert_fails(result, "unknown judge 'oracle:gpt-9'", "heuristic")
    assert not (run_copy / "labels.sqlite").exists()


def test_run_folder_from_another_schema_version(run_copy: Path) -> None:
    info = json.loads((run_copy / RUN_JSON).read_text())
    info["schema_version"] = 99
    (run_copy / RUN_JSON).write_text(json.dumps(info))
    result = labeler("label", run_copy)
    assert_fails(result, "run.json", "schema_version", "99")


def test_incomplete_run_folder(run_copy: Path) -> None:
    (run_copy / "examples.parquet").unlink()
    result = labeler("summarize", run_copy)
    assert_fails(result, "not a complete run folder", "examples.parquet")


def test_summarize_without_labels(run_copy: Path) -> None:
    result = labeler("summarize", run_copy)
    assert_fails(result, "no labels yet", "labeler label")
