"""Random-weight decoders with a calibrated random adapter, of any supported architecture.

For tests and benchmarks: a model of a given shape (Qwen2 or Llama, tiny or the paper's
28 x 3584 x 8192) whose features fire about ``l0`` times per token per layer, as real
adapters do (the released ones have L0 between 0.1 and 10). Each encoder bias is set
from the measured pre-activations of a calibration batch so that the feature is active
on a ``l0 / n_features`` share of its tokens. The calibration ids must come from the
tokenizer as ``collect`` will load it from the saved folder
(``adapters.tokenizer_loading.load_tokenizer``), or the adapter fires at another rate there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from adapters.branch import AdapterModel, attach_branch, mlp_of
from adapters.checkpoint import TranscoderConfig

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
    def scaled(cls, n_layers: int, d_model: int, n_features: int, vocab_size: int) -> ModelShape:
        """A Qwen2 shape of this width with the usual proportions: an MLP 4x as wide,
        heads of 64 dimensions, one key-value head per two query heads."""
        return cls("qwen2", n_layers, d_model, 4 * d_model, max(1, d_model // 64),
                   max(1, d_model // 128), vocab_size, n_features)  # fmt: skip

    @classmethod
    def paper(cls, vocab_size: int = 152_064) -> ModelShape:
        """DeepSeek-R1-Distill-Qwen-7B's shape with the paper's 8192 features per layer."""
        return cls("qwen2", 28, 3584, 18944, 28, 4, vocab_size, 8192, 32_768)


def random_decoder(shape: ModelShape, seed: int, dtype: torch.dtype = torch.float32) -> Any:
    """A random-weight causal LM of ``shape`` (no adapter)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    if shape.arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {shape.arch!r}; choose {ARCHITECTURES}")
    config_cls: Any
    model_cls: Any
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
    calibration: Sequence[torch.Tensor] | torch.Tensor,
    l0: float = 4.0,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> AdapterModel:
    """A random decoder with a random adapter whose features fire about ``l0`` times per
    token per layer on text like ``calibration`` (token-id sequences, or the rows of a
    [batch, seq] tensor; each runs alone, from its start, as collection runs them).

    Layers are calibrated in order, each with the branches below it already on, from the
    MLP inputs it really sees: every feature's pre-activation is standardized by its own
    mean and spread, and one threshold on the pooled standardized values gives the share
    ``l0 / n_features`` of active (token, feature) pairs.
    """
    model = random_decoder(shape, seed, dtype).to(device)
    config = TranscoderConfig(shape.n_features, True, shape.n_layers, shape.d_model)
    adapter = attach_branch(model, config)  # zero branches: calibration turns them on
    generator = torch.Generator().manual_seed(seed + 1)
    share = min(l0 / shape.n_features, 1.0)
    for layer in range(shape.n_layers):
        captured: list[torch.Tensor] = []
        handle = mlp_of(model, layer).register_forward_pre_hook(
            lambda _m, args, into=captured: into.append(args[0].detach())
        )
        with torch.no_grad():
            for sequence in calibration:
                model(input_ids=sequence.reshape(1, -1).to(device))
        handle.remove()
        x = torch.cat([c.reshape(-1, shape.d_model).float() for c in captured])
        enc_w = torch.randn(shape.n_features, shape.d_model, generator=generator).to(device)
        pre = x @ enc_w.T  # [tokens, F]
        mean, std = pre.mean(0), pre.std(0).clamp(min=1e-6)
        z = (pre - mean) / std
        sample = z.flatten()[torch.randperm(z.numel(), generator=generator)[:4_000_000]]
        threshold = torch.quantile(sample.cpu(), 1 - share).item()
        enc, dec = adapter.enc_dec(layer)
        with torch.no_grad():
            enc.weight.copy_(enc_w / std[:, None])
            enc.bias.copy_(-mean / std - threshold)
            dec.weight.copy_(
                torch.randn(shape.d_model, shape.n_features, generator=generator) * 0.01
            )
    return adapter
