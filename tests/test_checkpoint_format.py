"""Checkpoints in exactly the paper's format: config keys, tensor names, sharded files."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from adapters.branch import load_adapter
from adapters.checkpoint import read_config
from tests.conftest import CollectedDemo


def test_demo_checkpoint_uses_the_papers_names(collected: CollectedDemo) -> None:
    folder = collected.paths.checkpoint
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "qwen2"
    assert config["architectures"] == ["Qwen2ForCausalLMWithTranscoder"]
    assert config["transcoder_n_features"] == 256 and config["transcoder_dec_bias"] is True
    with safe_open(str(folder / "model.safetensors"), framework="pt") as fh:
        names = {k for k in fh.keys() if "transcoder" in k}  # noqa: SIM118
        shapes = {k: tuple(fh.get_slice(k).get_shape()) for k in names}
    expected = {
        f"model.layers.{i}.mlp.transcoder_{part}": shape
        for i in range(4)
        for part, shape in (
            ("enc.weight", (256, 128)),
            ("enc.bias", (256,)),
            ("dec.weight", (128, 256)),
            ("dec.bias", (128,)),
        )
    }
    assert shapes == expected


def test_sharded_checkpoint_loads_to_the_same_features(
    collected: CollectedDemo, tmp_path: Path
) -> None:
    adapter, tokenizer, _ = load_adapter(str(collected.paths.checkpoint), "cpu", "float32")
    sharded = tmp_path / "sharded"
    adapter.model.save_pretrained(sharded, max_shard_size="1MB")
    tokenizer.save_pretrained(sharded)
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) > 1
    config, _ = read_config(sharded)
    assert config.n_features == 256
    again, _, _ = load_adapter(str(sharded), "cpu", "float32")
    ids = torch.tensor([tokenizer.encode("Wait, let me check: 3 * 5 = 15.")])
    with torch.no_grad():
        with adapter.recording([1, 3]) as first:
            adapter.model(input_ids=ids)
            a = {k: v.clone() for k, v in first.items()}
        with again.recording([1, 3]) as second:
            again.model(input_ids=ids)
            b = {k: v.clone() for k, v in second.items()}
    for layer in (1, 3):
        torch.testing.assert_close(a[layer], b[layer])
        assert (a[layer] > 0).any()


def test_branch_off_gives_the_hybrid_model(collected: CollectedDemo) -> None:
    adapter, tokenizer, _ = load_adapter(str(collected.paths.checkpoint), "cpu", "float32")
    ids = torch.tensor([tokenizer.encode("Hmm, maybe x = 5. Wait, actually x = 4.")])
    with torch.no_grad():
        on = adapter.model(input_ids=ids).logits
        adapter.set_enabled(False)
        off = adapter.model(input_ids=ids).logits
        adapter.set_enabled(True)
    assert not torch.allclose(on, off)
