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
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from adapters.branch import AdapterModel, attach_branch, mlp_of
from adapters.checkpoint import TranscoderConfig
from adapters.errors import CheckpointError

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


# A trial adapter of one's own shape (``labeler make-adapter``): random weights, for trying
# the pipeline on a model of that shape, not for real labels.

TRIAL_NOTE = "random weights: for trying the pipeline on a model of this shape, not for real labels"
TRIAL_FILE = "trial_adapter.json"
"""Written beside the weights: the shape, the seed and where the tokenizer came from."""
_TRAINING_TRACES = 400  # synthetic traces the tiny tokenizer is trained on
_CALIBRATION = (32, 128)  # sequences x tokens that set the features' firing rates


def shape_from_config(raw: dict[str, Any], source: str) -> ModelShape:
    """The shape of a Hugging Face ``config.json`` (Qwen2 or Llama); ``source`` names it in
    errors."""
    arch = raw.get("model_type")
    if arch not in ARCHITECTURES:
        raise CheckpointError(f"{source}: model_type {arch!r} is not supported; a trial adapter "
                              f"can be made for {', '.join(ARCHITECTURES)} models")  # fmt: skip
    keys = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads")
    missing = [k for k in keys if not isinstance(raw.get(k), int)]
    if missing:
        raise CheckpointError(f"{source}: config.json lacks {', '.join(missing)}")
    heads = int(raw["num_attention_heads"])
    return ModelShape(
        arch=str(arch),
        n_layers=int(raw["num_hidden_layers"]),
        d_model=int(raw["hidden_size"]),
        intermediate=int(raw["intermediate_size"]),
        n_heads=heads,
        n_kv_heads=int(raw.get("num_key_value_heads") or heads),
        vocab_size=int(raw.get("vocab_size") or 0),
        max_positions=int(raw.get("max_position_embeddings") or 4096),
    )


def trial_shape(
    like: ModelShape | None, arch: str | None = None, n_layers: int | None = None,
    d_model: int | None = None, intermediate: int | None = None, n_heads: int | None = None,
    n_kv_heads: int | None = None, n_features: int = 512,
) -> ModelShape:  # fmt: skip
    """The shape asked for: ``like``'s (a model's config) with the given values in place of
    its own; without ``like``, a Qwen2 of 4 layers x 128. A width of one's own gets the
    usual proportions for what is not given: an MLP 4x as wide, heads of 64 dimensions,
    half as many key-value heads."""
    base = like or ModelShape()
    if d_model is not None or like is None:
        d = d_model or base.d_model
        heads = n_heads or max(1, d // 64)
        kv_heads = n_kv_heads or max(1, heads // 2)
        widths = {"d_model": d, "intermediate": intermediate or 4 * d, "n_heads": heads,
                  "n_kv_heads": kv_heads}  # fmt: skip
    else:
        widths = {"d_model": base.d_model, "intermediate": intermediate or base.intermediate,
                  "n_heads": n_heads or base.n_heads,
                  "n_kv_heads": n_kv_heads or base.n_kv_heads}  # fmt: skip
    return replace(base, arch=arch or base.arch, n_layers=n_layers or base.n_layers,
                   n_features=n_features, **widths)  # fmt: skip


def n_parameters(shape: ModelShape) -> int:
    """Parameters of the decoder and its adapter (embeddings and unembedding untied)."""
    head_dim = shape.d_model // shape.n_heads
    attention = 2 * shape.d_model * shape.d_model + 2 * shape.d_model * shape.n_kv_heads * head_dim
    mlp = 3 * shape.d_model * shape.intermediate
    adapter = 2 * shape.n_features * shape.d_model + shape.n_features + shape.d_model
    return 2 * shape.vocab_size * shape.d_model + shape.n_layers * (attention + mlp + adapter)


def _training_texts() -> list[str]:
    from collectors.synthetic_corpus import generate_traces

    texts: list[str] = []
    for record in generate_traces(_TRAINING_TRACES, seed=0):
        turns = record["conversations"]
        assert isinstance(turns, list)
        texts.extend(str(turn["value"]) for turn in turns)
    return texts


def tiny_tokenizer(vocab_size: int, chat_format: str = "deepseek") -> Any:
    """A byte-level BPE trained on the built-in synthetic reasoning traces, with the
    markers of ``chat_format`` (``deepseek`` or ``qwen``) and ``<think>``, ``</think>`` as
    single tokens (only that format's, so ``collect --chat-format auto`` finds it)."""
    from adapters.tiny_tokenizer import train_bpe_tokenizer
    from collectors.corpus import (
        BOS,
        ENDOFTEXT,
        EOS,
        IM_END,
        IM_START,
        PAD,
        SPECIAL_TOKENS,
        THINK_END,
        THINK_START,
    )  # fmt: skip

    texts = _training_texts()
    if chat_format == "qwen":
        specials = (ENDOFTEXT, IM_START, IM_END, THINK_START, THINK_END)
        return train_bpe_tokenizer(texts, specials, vocab_size, ENDOFTEXT, IM_END, ENDOFTEXT)
    return train_bpe_tokenizer(texts, SPECIAL_TOKENS, vocab_size, BOS, EOS, PAD)


def _calibration(tokenizer: Any) -> list[torch.Tensor]:
    n, length = _CALIBRATION
    sequences = []
    for text in _training_texts()[1::2]:  # the responses: thinking and answers
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:length]
        if len(ids) >= 8:
            sequences.append(torch.tensor(ids, dtype=torch.long))
        if len(sequences) == n:
            break
    return sequences


def make_trial_adapter(
    out: Path, shape: ModelShape, tokenizer: Any, l0: float, seed: int, tokenizer_source: str
) -> None:
    """Write a checkpoint folder that ``collect --adapter`` loads: a random decoder of
    ``shape`` with an adapter calibrated to about ``l0`` active features per token per
    layer on the built-in text, and ``tokenizer``. Written beside ``out`` and moved there
    whole."""
    import json
    import shutil

    from adapters.branch import save_adapter
    from adapters.tokenizer_loading import load_tokenizer

    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        tokenizer.save_pretrained(partial)  # calibrate on the ids collect will see
        reloaded = load_tokenizer(partial)
        adapter = random_adapter(shape, _calibration(reloaded), l0=l0, seed=seed)
        save_adapter(adapter, reloaded, partial)
        note = {"note": TRIAL_NOTE, "shape": asdict(shape), "l0": l0, "seed": seed,
                "tokenizer": tokenizer_source}  # fmt: skip
        (partial / TRIAL_FILE).write_text(json.dumps(note, indent=1) + "\n", encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        partial.rename(out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
