"""Random-weight decoders with a calibrated random adapter, of any supported architecture.

For tests and benchmarks: a model of a given shape (Qwen2 or Llama, tiny or the paper's
28 x 3584 x 8192) whose features fire about ``l0`` times per token per layer, as real
adapters do (the released ones have L0 between 0.1 and 10). Each encoder bias is set
from the measured pre-activations of a calibration batch so that the feature is active
on a ``l0 / n_features`` share of its tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from adapters.branch import AdapterModel, attach_branch, mlp_of
from adapters.checkpoint import LayerWeights, TranscoderConfig

ARCHITECTURES = ("qwen2", "llama")


@dataclass(frozen=True)
class ModelShape:
    arch: str = "qwen2"
    n_layers: int = 4
    d_model: int = 128
    intermediate: int = 256
    n_heads: int = 4
    n_kv_heads: int = 2
    vocab_size: int = 1200
    n_features: int = 512
    max_positions: int = 4096

    @classmethod
    def paper(cls, vocab_size: int = 152_064) -> ModelShape:
        """DeepSeek-R1-Distill-Qwen-7B's shape with the paper's 8192 features per layer."""
        return cls("qwen2", 28, 3584, 18944, 28, 4, vocab_size, 8192, 32_768)


def random_decoder(shape: ModelShape, seed: int, dtype: torch.dtype = torch.float32) -> Any:
    """A random-weight causal LM of ``shape`` (no adapter)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    if shape.arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {shape.arch!r}; choose {ARCHITECTURES}")
    config_cls, model_cls = (
        (Qwen2Config, Qwen2ForCausalLM)
        if shape.arch == "qwen2"
        else (LlamaConfig, LlamaForCausalLM)
    )
    config = config_cls(
        vocab_size=shape.vocab_size,
        hidden_size=shape.d_model,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.n_layers,
        num_attention_heads=shape.n_heads,
        num_key_value_heads=shape.n_kv_heads,
        max_position_embeddings=shape.max_positions,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = model_cls(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def random_adapter(
    shape: ModelShape,
    calibration_ids: torch.Tensor,
    l0: float = 4.0,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> AdapterModel:
    """A random decoder with a random adapter whose features fire about ``l0`` times per
    token per layer on text like ``calibration_ids`` [batch, seq]."""
    model = random_decoder(shape, seed, dtype).to(device)
    config = TranscoderConfig(shape.n_features, True, shape.n_layers, shape.d_model)
    generator = torch.Generator().manual_seed(seed + 1)
    enc = {
        layer: torch.randn(shape.n_features, shape.d_model, generator=generator)
        / shape.d_model**0.5
        for layer in range(shape.n_layers)
    }
    inputs: dict[int, torch.Tensor] = {}
    handles = [
        mlp_of(model, layer).register_forward_pre_hook(
            lambda _m, args, la=layer: inputs.__setitem__(la, args[0].detach())
        )
        for layer in range(shape.n_layers)
    ]
    with torch.no_grad():
        model(input_ids=calibration_ids.to(device))
    for handle in handles:
        handle.remove()
    share = min(l0 / shape.n_features, 1.0)
    weights = {}
    for layer in range(shape.n_layers):
        x = inputs[layer].reshape(-1, shape.d_model).float().cpu()
        pre = x @ enc[layer].T  # [tokens, F]
        threshold = torch.quantile(pre[: min(len(pre), 4096)], 1 - share, dim=0)
        weights[layer] = LayerWeights(
            enc_weight=enc[layer],
            enc_bias=-threshold,
            dec_weight=torch.randn(shape.d_model, shape.n_features, generator=generator) * 0.01,
            dec_bias=torch.zeros(shape.d_model),
        )
    return attach_branch(model, config, weights)
