"""`labeler make-adapter`: a random adapter of one's own shape runs through the pipeline
(collect the planted demo corpus, label with the heuristic) and has the shape asked for;
`--like` takes the shape and the tokenizer of a model folder without its weights."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import polars as pl
import pytest

from collectors.synthetic_corpus import write_corpus
from tests.test_bad_input import assert_fails, labeler

SHAPE = ("--arch", "llama", "--layers", "3", "--d-model", "96", "--features-per-layer", "64")


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("made") / "adapter"
    result = labeler("make-adapter", "--out", folder, *SHAPE, "--seed", "1")
    assert result.returncode == 0, result.stderr
    assert "not for real labels" in result.stdout
    assert f"labeler collect --adapter {folder}" in result.stdout
    return folder


def test_help_says_it_is_for_trying_the_pipeline() -> None:
    result = labeler("make-adapter", "--help")
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    assert "trying the pipeline" in text and "not for real labels" in text
    for option in ("--like", "--arch", "--layers", "--d-model", "--features-per-layer", "--seed"):
        assert option in text


def test_an_adapter_of_another_shape_runs_end_to_end(made: Path, tmp_path: Path) -> None:
    config = json.loads((made / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["architectures"] == ["LlamaForCausalLMWithTranscoder"]
    assert (config["num_hidden_layers"], config["hidden_size"]) == (3, 96)
    assert config["transcoder_n_features"] == 64
    corpus = tmp_path / "corpus.jsonl"
    write_corpus(corpus, 60, seed=0)
    run = tmp_path / "run"
    collected = labeler("collect", "--adapter", made, "--corpus", corpus, "--out", run)
    assert collected.returncode == 0, collected.stderr
    features = pl.read_parquet(run / "features.parquet")
    assert features.height == 3 * 64
    assert features.group_by("layer").len().sort("layer").rows() == [(0, 64), (1, 64), (2, 64)]
    info = json.loads((run / "run.json").read_text())
    per_token = features["count"].sum() / info["n_tokens"] / 3
    assert 1 <= per_token <= 16  # calibrated to about 4 features a token per layer
    labeled = labeler("label", run, "--judge", "heuristic")
    assert labeled.returncode == 0, labeled.stderr
    n_alive = sum(info["n_alive"].values())
    assert 0 < n_alive <= 3 * 64
    assert f"heuristic: {n_alive} planned" in labeled.stdout
    summary = labeler("summarize", run, "--json")
    assert summary.returncode == 0, summary.stderr
    assert json.loads(summary.stdout)["final"]["n_labeled"] == n_alive


def test_same_seed_same_weights(made: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    result = labeler("make-adapter", "--out", again, *SHAPE, "--seed", "1")
    assert result.returncode == 0, result.stderr
    for name in ("model.safetensors", "tokenizer.json"):
        assert (again / name).read_bytes() == (made / name).read_bytes(), name


def test_like_takes_a_models_shape_and_tokenizer_without_weights(
    made: Path, tmp_path: Path
) -> None:
    model = tmp_path / "my-model"  # a model folder as the hub has it, minus the weights
    model.mkdir()
    raw = json.loads((made / "config.json").read_text())
    raw |= {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_size": 128,
            "intermediate_size": 320, "num_attention_heads": 4, "num_key_value_heads": 2,
            "num_hidden_layers": 5}  # fmt: skip
    for key in ("transcoder_n_features", "transcoder_dec_bias"):
        raw.pop(key)
    (model / "config.json").write_text(json.dumps(raw))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(made / name, model / name)
    out = tmp_path / "like"
    result = labeler("make-adapter", "--out", out, "--like", model, "--layers", "2",
                     "--features-per-layer", "32")  # fmt: skip
    assert result.returncode == 0, result.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "qwen2"
    assert (config["num_hidden_layers"], config["hidden_size"]) == (2, 128)
    assert (config["intermediate_size"], config["num_key_value_heads"]) == (320, 2)
    assert config["transcoder_n_features"] == 32
    assert (out / "tokenizer.json").read_bytes() == (model / "tokenizer.json").read_bytes()


def test_bad_shapes_and_outputs_are_one_line_errors(made: Path, tmp_path: Path) -> None:
    assert_fails(labeler("make-adapter", "--out", made, *SHAPE), "already exists", "--overwrite")
    assert_fails(
        labeler("make-adapter", "--out", tmp_path / "a", "--d-model", "100", "--heads", "3"),
        "--d-model 100",
        "--heads 3",
    )
    odd = tmp_path / "gpt2"
    odd.mkdir()
    (odd / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    assert_fails(labeler("make-adapter", "--out", tmp_path / "b", "--like", odd),
                 "gpt2", "qwen2, llama")  # fmt: skip
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_the_tiny_tokenizer_in_the_qwen_chat_format_collects(tmp_path: Path) -> None:
    out = tmp_path / "qwen"
    result = labeler("make-adapter", "--out", out, "--layers", "2", "--d-model", "64",
                     "--features-per-layer", "32", "--chat-format", "qwen")  # fmt: skip
    assert result.returncode == 0, result.stderr
    special = json.loads((out / "tokenizer_config.json").read_text())
    assert special["eos_token"] == "<|im_end|>"
    corpus = tmp_path / "corpus.jsonl"
    write_corpus(corpus, 20, seed=1)
    run = tmp_path / "run"
    collected = labeler("collect", "--adapter", out, "--corpus", corpus, "--out", run,
                        "--chat-format", "qwen")  # fmt: skip
    assert collected.returncode == 0, collected.stderr
    info = json.loads((run / "run.json").read_text())
    assert info["params"]["chat_format"] == "qwen" and info["n_sequences"] == 20
    assert pl.read_parquet(run / "features.parquet").height == 2 * 32
