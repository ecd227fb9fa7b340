"""The neuron baseline: plain MLP neurons of a decoder, recorded like adapter features.

A neuron's activation is its entry of the input to the MLP's down projection
(``act_fn(gate_proj(x)) * up_proj(x)`` in Qwen2 and Llama); it counts as active where it
is positive, and its logit lens reads its column of ``down_proj``. A seeded sample of
``n_per_layer`` neurons per layer keeps the run comparable in size to an adapter's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adapters.branch import (
    FeatureSink,
    decoder_layers,
    final_norm_of,
    load_causal_lm,
    mlp_of,
    unembedding_of,
)
from adapters.checkpoint import resolve_checkpoint
from adapters.errors import CheckpointError


def _down_proj(model: Any, layer: int) -> nn.Linear:
    down = getattr(mlp_of(model, layer), "down_proj", None)
    if not isinstance(down, nn.Linear):
        raise CheckpointError(
            f"{type(model).__name__}: layer {layer}'s mlp has no 'down_proj' linear; "
            "--neurons needs a gated MLP (Qwen2, Llama, Mistral, ...)"
        )
    return down


def sample_neurons(width: int, n_per_layer: int, layer: int, seed: int) -> torch.Tensor:
    """A seeded, sorted sample of ``n_per_layer`` neuron indices of one layer."""
    if n_per_layer >= width:
        return torch.arange(width)
    generator = torch.Generator().manual_seed(seed * 100_003 + layer)
    return torch.randperm(width, generator=generator)[:n_per_layer].sort().values


@dataclass
class NeuronModel:
    """A causal LM whose sampled MLP neurons are recorded (no adapter involved)."""

    model: Any
    n_per_layer: int
    seed: int = 0
    _units: dict[int, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        layers = decoder_layers(self.model)
        for layer in range(len(layers)):
            self._units[layer] = sample_neurons(self.width, self.n_per_layer, layer, self.seed).to(
                self.device
            )

    @property
    def n_layers(self) -> int:
        return len(decoder_layers(self.model))

    @property
    def device(self) -> torch.device:
        param: torch.Tensor = next(self.model.parameters())
        return param.device

    @property
    def width(self) -> int:
        """The MLP's intermediate size."""
        return int(_down_proj(self.model, 0).in_features)

    def units(self, layer: int) -> torch.Tensor:
        return self._units[layer]

    def decoder_columns(self, layer: int) -> torch.Tensor:
        return _down_proj(self.model, layer).weight[:, self._units[layer]]

    def unembedding(self) -> torch.Tensor:
        return unembedding_of(self.model)

    def final_norm(self) -> nn.Module | None:
        return final_norm_of(self.model)

    @contextlib.contextmanager
    def recording(self, layers: list[int], sink: FeatureSink | None = None) -> Iterator[None]:
        """Hand each listed layer's sampled neurons [batch, seq, n] to ``sink``."""
        if sink is None:
            raise ValueError("NeuronModel.recording needs a sink")
        handles = []
        for layer in layers:
            units = self._units[layer]

            def hook(_module: Any, args: tuple[torch.Tensor, ...], la: int = layer,
                     idx: torch.Tensor = units) -> None:  # fmt: skip
                sink(la, args[0].index_select(-1, idx))

            handles.append(_down_proj(self.model, layer).register_forward_pre_hook(hook))
        try:
            yield None
        finally:
            for handle in handles:
                handle.remove()


def load_neuron_model(
    path_or_id: str,
    n_per_layer: int,
    seed: int,
    device: str = "auto",
    dtype: str = "auto",
    tokenizer: str | None = None,
) -> tuple[NeuronModel, Any, Path]:
    """Load any Hugging Face causal LM (an adapter checkpoint loads as its plain model,
    the branch left out) for the neuron baseline: (model, tokenizer, local folder).

    The tokenizer is the folder's own as saved, or the one at ``tokenizer`` (a folder or
    hub id) when given."""
    if n_per_layer <= 0:
        raise CheckpointError(f"--neurons {n_per_layer}: must be a positive number per layer")
    folder = resolve_checkpoint(path_or_id)
    model, loaded_tokenizer = load_causal_lm(folder, device, dtype, tokenizer)
    return NeuronModel(model, n_per_layer, seed), loaded_tokenizer, folder
