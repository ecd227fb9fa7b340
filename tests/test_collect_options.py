"""`labeler collect` options as a user runs them: a Llama checkpoint, layer subsets,
bfloat16, the logit lens through the final norm, the neuron baseline, and the paper's
per-feature JSON out and back in."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from safetensors.torch import load_file, save_file

from adapters.branch import load_adapter, save_adapter
from adapters.random_adapter import ModelShape, random_adapter
from collectors.corpus import read_traces, tokenize_traces
from collectors.run_format import RUN_JSON
from tests.conftest import CollectedDemo
from tests.test_bad_input import assert_fails, labeler


@pytest.fixture(scope="module")
def llama_checkpoint(collected: CollectedDemo, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from adapters.tokenizer_loading import load_tokenizer

    tokenizer = load_tokenizer(collected.paths.checkpoint)  # as collect loads it
    shape = ModelShape(arch="llama", n_layers=3, d_model=64, intermediate=128, n_features=256,
                       vocab_size=len(tokenizer))  # fmt: skip
    calibration = tokenize_traces(list(read_traces(collected.paths.corpus))[:16], tokenizer, 128)
    ids = torch.from_numpy(calibration.token_ids[: 16 * 64].reshape(16, 64))
    adapter = random_adapter(shape, ids, l0=4.0, seed=1)
    with torch.no_grad():  # a final norm with weights of its own, as trained models have
        norm = adapter.final_norm()
        assert norm is not None
        norm.weight.uniform_(0.2, 2.0, generator=torch.Generator().manual_seed(0))
    folder = tmp_path_factory.mktemp("llama") / "checkpoint"
    save_adapter(adapter, tokenizer, folder)
    return folder


def test_llama_checkpoint_collects_a_layer_subset(
    collected: CollectedDemo, llama_checkpoint: Path, tmp_path: Path
) -> None:
    config = json.loads((llama_checkpoint / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["architectures"] == ["LlamaForCausalLMWithTranscoder"]
    out = tmp_path / "run"
    result = labeler("collect", "--adapter", llama_checkpoint, "--corpus",
                     collected.paths.corpus, "--out", out, "--layers", "0,2",
                     "--lens-through-norm")  # fmt: skip
    assert result.returncode == 0, result.stderr
    info = json.loads((out / RUN_JSON).read_text())
    assert info["layers"] == [0, 2] and info["params"]["lens_through_norm"] is True
    features = pl.read_parquet(out / "features.parquet")
    assert set(features["layer"]) == {0, 2} and features.height == 2 * 256
    alive = features.filter(pl.col("alive"))
    per_token = alive["count"].sum() / info["n_tokens"] / 2
    assert 1 <= per_token <= 12  # the calibrated adapter's sparsity
    # The logit lens through the norm: unembedding . norm(decoder column).
    adapter, _, _ = load_adapter(str(llama_checkpoint), "cpu", "float32")
    norm = adapter.final_norm()
    assert norm is not None
    row = features.filter(pl.col("layer") == 2).row(7, named=True)
    with torch.no_grad():
        column = adapter.decoder_columns(2)[:, 7]
        logits = adapter.unembedding() @ norm(column.unsqueeze(0))[0]
    assert row["top_logit_ids"] == logits.topk(10).indices.tolist()
    plain = (adapter.unembedding() @ column).topk(10).indices.tolist()
    assert plain != row["top_logit_ids"]  # the norm's weights changed the ranking


def test_bfloat16_collection_matches_float32(collected: CollectedDemo, tmp_path: Path) -> None:
    runs = {}
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / dtype
        result = labeler("collect", "--adapter", collected.paths.checkpoint, "--corpus",
                         collected.paths.corpus, "--out", out, "--layers", "1",
                         "--dtype", dtype)  # fmt: skip
        assert result.returncode == 0, result.stderr
        runs[dtype] = pl.read_parquet(out / "features.parquet")
    f32, bf16 = runs["float32"], runs["bfloat16"]
    # Planted features have wide margins: the same features fire, with close maxima.
    np.testing.assert_array_equal(f32["alive"].to_numpy(), bf16["alive"].to_numpy())
    np.testing.assert_allclose(bf16["act_max"].to_numpy(), f32["act_max"].to_numpy(), rtol=0.05)
    counts_f32, counts_bf16 = f32["count"].to_numpy(), bf16["count"].to_numpy()
    assert np.abs(counts_bf16 - counts_f32).sum() <= 0.01 * counts_f32.sum()


def test_neuron_baseline_labels_and_summarizes(collected: CollectedDemo, tmp_path: Path) -> None:
    out = tmp_path / "neurons"
    result = labeler("collect", "--model", collected.paths.checkpoint, "--corpus",
                     collected.paths.corpus, "--out", out, "--neurons", "32")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "neurons alive" in result.stdout
    info = json.loads((out / RUN_JSON).read_text())
    assert info["unit"] == "neuron" and info["n_features_per_layer"] == 256  # intermediate size
    features = pl.read_parquet(out / "features.parquet")
    assert features.height == 4 * 32
    indices = features.filter(pl.col("layer") == 0)["index"].to_list()
    assert indices == sorted(indices) and len(set(indices)) == 32 and max(indices) < 256
    assert labeler("label", out).returncode == 0
    result = labeler("summarize", out, "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["final"]["n_labeled"] == int(features["alive"].sum())


def test_export_to_the_papers_format_and_import_back(
    collected: CollectedDemo, tmp_path: Path
) -> None:
    paper = tmp_path / "paper"
    result = labeler("export", collected.run, "--format", "circuit-tracer", "--out", paper)
    assert result.returncode == 0, result.stderr
    features = pl.read_parquet(collected.run / "features.parquet")
    alive = features.filter(pl.col("alive"))
    files = sorted((paper / "features").glob("*.json"))
    assert len(files) == alive.height
    one = alive.row(3, named=True)
    cantor = (one["layer"] + one["index"]) * (one["layer"] + one["index"] + 1) // 2 + one["index"]
    data = json.loads((paper / "features" / f"{cantor}.json").read_text())
    assert (data["layer"], data["feature"]) == (one["layer"], one["index"])
    assert data["top_logits"] == one["top_logits"]
    groups = [g["quantile_name"] for g in data["examples_quantiles"]]
    assert groups[0] == "Top activations" and groups[-1] == "Random samples"
    imported = tmp_path / "imported"
    result = labeler("import", paper, "--out", imported)
    assert result.returncode == 0, result.stderr
    back = pl.read_parquet(imported / "features.parquet").filter(pl.col("alive"))
    for column in ("feature_id", "count", "act_max", "top_logits"):
        assert back.sort("layer", "index")[column].to_list() == alive[column].to_list(), column
    assert labeler("label", imported).returncode == 0
    again = tmp_path / "again"
    assert labeler("export", imported, "--format", "circuit-tracer", "--out", again).returncode == 0
    for file in files:
        assert (again / "features" / file.name).read_bytes() == file.read_bytes()


def test_adapter_width_differing_between_layers(collected: CollectedDemo, tmp_path: Path) -> None:
    folder = tmp_path / "ckpt"
    adapter, tokenizer, _ = load_adapter(str(collected.paths.checkpoint), "cpu", "float32")
    save_adapter(adapter, tokenizer, folder)
    tensors = load_file(str(folder / "model.safetensors"))
    for part in ("enc.weight", "enc.bias"):
        name = f"model.layers.2.mlp.transcoder_{part}"
        tensors[name] = tensors[name][:128].contiguous()
    name = "model.layers.2.mlp.transcoder_dec.weight"
    tensors[name] = tensors[name][:, :128].contiguous()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "run"
    result = labeler("collect", "--adapter", folder, "--corpus", collected.paths.corpus,
                     "--out", out)  # fmt: skip
    assert_fails(result, "width differs between layers", "layer 2: 128",
                 "transcoder_n_features=256")  # fmt: skip
    assert not out.exists()


def test_corpus_with_mixed_formats(collected: CollectedDemo, tmp_path: Path) -> None:
    corpus = tmp_path / "mixed.jsonl"
    lines = collected.paths.corpus.read_text().splitlines()[:3]
    lines.append(json.dumps({"text": "plain text, not a conversation"}))
    corpus.write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    result = labeler("collect", "--adapter", collected.paths.checkpoint, "--corpus", corpus,
                     "--out", out)  # fmt: skip
    assert_fails(result, f"{corpus}:4", "'text'", "line 1", "'conversations'")
    assert not out.exists()


def test_unembedding_rows_beyond_the_tokenizer(collected: CollectedDemo, tmp_path: Path) -> None:
    """Real models pad the unembedding past the tokenizer's vocabulary (Qwen2: 152,064
    rows for 151,665 tokens); the logit lens names such rows instead of failing."""
    from adapters.tokenizer_loading import load_tokenizer

    tokenizer = load_tokenizer(collected.paths.checkpoint)  # as collect loads it
    shape = ModelShape(n_layers=2, d_model=64, intermediate=128, n_features=64,
                       vocab_size=len(tokenizer) + 64)  # fmt: skip
    ids = torch.tensor([tokenizer.encode("Wait, let me check: 3 * 5 = 15.")] * 2)
    adapter = random_adapter(shape, ids, l0=4.0, seed=2)
    with torch.no_grad():  # padding rows aligned with every decoder column: top of the lens
        head = adapter.model.get_output_embeddings().weight
        head[len(tokenizer) :] = adapter.decoder_columns(1).sum(1) * 100
    folder = tmp_path / "ckpt"
    save_adapter(adapter, tokenizer, folder)
    out = tmp_path / "run"
    result = labeler("collect", "--adapter", folder, "--corpus", collected.paths.corpus,
                     "--out", out, "--layers", "1")  # fmt: skip
    assert result.returncode == 0, result.stderr
    tops = pl.read_parquet(out / "features.parquet")["top_logits"].explode().to_list()
    assert f"<id:{len(tokenizer)}>" in tops
