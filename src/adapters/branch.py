"""Attach the sparse branch to a decoder's MLPs and read feature activations.

The branch modules are added to each layer's ``mlp`` as ``transcoder_enc`` and
``transcoder_dec``, so the model's state dict carries exactly the paper's tensor names.
One forward hook per MLP computes the features once, records them when asked, and adds
the decoded branch to the MLP's output while the branch is on.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from adapters.checkpoint import (
    ARCHITECTURE,
    LayerWeights,
    TranscoderConfig,
    load_layer_weights,
    read_config,
    resolve_checkpoint,
)
from adapters.errors import CheckpointError
from adapters.threads import configure_torch_threads
from adapters.tokenizer_loading import load_tokenizer

if TYPE_CHECKING:
    from adapters.interventions import LayerEdit

log = logging.getLogger(__name__)


def decoder_layers(model: Any) -> nn.ModuleList:
    """The decoder's layer list (``model.model.layers`` for Qwen2 and Llama)."""
    get_decoder = getattr(model, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else getattr(model, "model", model)
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList) or not all(hasattr(la, "mlp") for la in layers):
        raise CheckpointError(
            f"{type(model).__name__}: cannot find decoder layers with an 'mlp' to attach to"
        )
    return layers


def mlp_of(model: Any, layer: int) -> nn.Module:
    """The ``mlp`` module of decoder layer ``layer``."""
    return cast(nn.Module, decoder_layers(model)[layer].mlp)


FeatureSink = Callable[[int, torch.Tensor], None]


def unembedding_of(model: Any) -> torch.Tensor:
    """A causal LM's unembedding matrix [vocab, d_model] (for the logit lens)."""
    head = model.get_output_embeddings()
    if head is None:
        raise CheckpointError("the model has no output embeddings for the logit lens")
    weight: torch.Tensor = head.weight
    return weight


def final_norm_of(model: Any) -> nn.Module | None:
    """The norm a causal LM applies before its unembedding, where it has one."""
    norm = getattr(model.get_decoder(), "norm", None)
    return norm if isinstance(norm, nn.Module) else None


@dataclass
class _BranchState:
    enabled: bool = True
    recording: frozenset[int] = frozenset()
    captured: dict[int, torch.Tensor] = field(default_factory=dict)
    sink: FeatureSink | None = None
    edits: dict[int, LayerEdit] | None = None
    """An intervention's work per layer (``adapters.interventions``); while set, it
    decides the branch's scale, not ``enabled``."""

    def record(self, layer: int, features: torch.Tensor) -> None:
        if self.sink is not None:
            self.sink(layer, features)
        else:
            self.captured[layer] = features


@dataclass
class AdapterModel:
    """A causal LM with a transcoder adapter on every MLP."""

    model: Any  # a transformers PreTrainedModel
    config: TranscoderConfig
    state: _BranchState = field(default_factory=_BranchState)

    @property
    def n_layers(self) -> int:
        return self.config.n_layers

    @property
    def device(self) -> torch.device:
        param: torch.Tensor = next(self.model.parameters())
        return param.device

    def enc_dec(self, layer: int) -> tuple[nn.Linear, nn.Linear]:
        mlp = mlp_of(self.model, layer)
        return cast(nn.Linear, mlp.transcoder_enc), cast(nn.Linear, mlp.transcoder_dec)

    def unembedding(self) -> torch.Tensor:
        """The unembedding matrix [vocab, d_model]."""
        return unembedding_of(self.model)

    def set_enabled(self, enabled: bool) -> None:
        """Branch on (the adapter model) or off (the hybrid model)."""
        self.state.enabled = enabled

    @property
    def width(self) -> int:
        """Features per layer."""
        return self.config.n_features

    def units(self, layer: int) -> torch.Tensor:
        """The feature indices collected at ``layer``: all of them."""
        return torch.arange(self.config.n_features)

    def decoder_columns(self, layer: int) -> torch.Tensor:
        """Each feature's decoder column: [d_model, n_features]."""
        weight: torch.Tensor = self.enc_dec(layer)[1].weight
        return weight

    def final_norm(self) -> nn.Module | None:
        """The norm applied before the unembedding, where the model has one."""
        return final_norm_of(self.model)

    @contextlib.contextmanager
    def recording(
        self, layers: list[int], sink: FeatureSink | None = None
    ) -> Iterator[dict[int, torch.Tensor]]:
        """Within the block, each forward hands every listed layer's features
        [batch, seq, n_features] to ``sink(layer, features)`` as soon as the layer has run,
        or, without a sink, stores them in the yielded dict (overwritten by the next
        forward)."""
        self.state.recording = frozenset(layers)
        self.state.captured = {}
        self.state.sink = sink
        try:
            yield self.state.captured
        finally:
            self.state.recording = frozenset()
            self.state.captured = {}
            self.state.sink = None


def _make_hook(layer: int, state: _BranchState) -> Any:
    def hook(module: Any, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> Any:
        record = layer in state.recording
        if state.edits is not None:
            work = state.edits[layer]
            features = None
            if record or work.branch != 0.0:
                features = torch.relu(module.transcoder_enc(args[0]))
                if record:
                    state.record(layer, features)
            return work.apply(output, args[0], features, module.transcoder_dec)
        if not (record or state.enabled):
            return None
        features = torch.relu(module.transcoder_enc(args[0]))
        if record:
            state.record(layer, features)
        if state.enabled:
            return output + module.transcoder_dec(features)
        return None

    return hook


def attach_branch(
    model: Any, config: TranscoderConfig, weights: dict[int, LayerWeights] | None = None
) -> AdapterModel:
    """Add the branch modules to every MLP (zero-initialised unless ``weights`` are given)
    and register the hooks."""
    layers = decoder_layers(model)
    if len(layers) != config.n_layers:
        raise CheckpointError(
            f"the model has {len(layers)} layers, the adapter config says {config.n_layers}"
        )
    reference = next(model.parameters())
    state = _BranchState()
    for i in range(len(layers)):
        mlp = mlp_of(model, i)
        enc = nn.Linear(config.d_model, config.n_features, bias=True)
        dec = nn.Linear(config.n_features, config.d_model, bias=config.dec_bias)
        with torch.no_grad():
            if weights is None:
                for param in (*enc.parameters(), *dec.parameters()):
                    param.zero_()
            else:
                w = weights[i]
                enc.weight.copy_(w.enc_weight)
                enc.bias.copy_(w.enc_bias)
                dec.weight.copy_(w.dec_weight)
                if w.dec_bias is not None:
                    dec.bias.copy_(w.dec_bias)
        mlp.transcoder_enc = enc.to(device=reference.device, dtype=reference.dtype)
        mlp.transcoder_dec = dec.to(device=reference.device, dtype=reference.dtype)
        mlp.register_forward_hook(_make_hook(i, state))
    return AdapterModel(model=model, config=config, state=state)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise CheckpointError(f"unknown dtype {name!r}; choose auto, {', '.join(dtypes)}")
    return dtypes[name]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise CheckpointError("--device cuda was asked for, but no CUDA device is available")
    return torch.device(name)


def load_causal_lm(
    folder: Path, device: str = "auto", dtype: str = "auto", tokenizer: str | None = None
) -> tuple[Any, Any]:
    """A Hugging Face causal LM and its tokenizer from a local folder, in eval mode on
    ``device``; the transcoder tensors of an adapter checkpoint are left out quietly.

    The tokenizer is the folder's own as saved (``adapters.tokenizer_loading``), or the one
    at ``tokenizer`` (a folder or hub id) when given."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    configure_torch_threads()  # every command that loads a model comes through here
    torch_device = resolve_device(device)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the transcoder tensors are "unexpected" to the base class
    try:
        model: Any = AutoModelForCausalLM.from_pretrained(
            folder, dtype=resolve_dtype(dtype, torch_device)
        )
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{folder}: the model could not be loaded: {exc}") from exc
    finally:
        hf_logging.set_verbosity(verbosity)
    loaded_tokenizer = load_tokenizer(tokenizer if tokenizer is not None else folder)
    return model.to(torch_device).eval(), loaded_tokenizer


def load_adapter(
    path_or_id: str, device: str = "auto", dtype: str = "auto", tokenizer: str | None = None
) -> tuple[AdapterModel, Any, Path]:
    """Load a checkpoint in the paper's format: (adapter model, tokenizer, local folder).

    The tokenizer is the checkpoint's own as saved, or the one at ``tokenizer`` (a folder
    or hub id) when given."""
    folder = resolve_checkpoint(path_or_id)
    config, raw = read_config(folder)
    weights = load_layer_weights(folder, config)
    if ARCHITECTURE not in raw.get("architectures", [ARCHITECTURE]):
        log.info(
            "%s: architectures is %s (not the paper's Qwen2)", folder, raw.get("architectures")
        )
    model, loaded_tokenizer = load_causal_lm(folder, device, dtype, tokenizer)
    return attach_branch(model, config, weights), loaded_tokenizer, folder


@contextlib.contextmanager
def _quiet_progress() -> Iterator[None]:
    """transformers' progress bars off for the block, as they were after it."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def save_adapter(adapter: AdapterModel, tokenizer: Any, folder: Path) -> None:
    """Write a checkpoint folder in the paper's format (config keys and tensor names)."""
    cfg = adapter.model.config
    cfg.transcoder_n_features = adapter.config.n_features
    cfg.transcoder_dec_bias = adapter.config.dec_bias
    architecture = f"{type(adapter.model).__name__}WithTranscoder"
    cfg.architectures = [architecture]
    folder.mkdir(parents=True, exist_ok=True)
    with _quiet_progress():  # transformers' bar over one shard says nothing
        adapter.model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    # save_pretrained writes the class name of the base model; restore the paper's
    # (Qwen2ForCausalLMWithTranscoder for a Qwen2 model).
    config_path = folder / "config.json"
    raw = json.loads(config_path.read_text(encoding="utf-8"))
    raw["architectures"] = [architecture]
    config_path.write_text(json.dumps(raw, indent=2) + "\n", encoding="utf-8")
