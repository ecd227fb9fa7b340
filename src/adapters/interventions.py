"""Interventions on the branch's features during a forward pass or generation.

An :class:`Intervention` scales the whole branch (1: the adapter model, 0: the hybrid
model, -0.5: the paper's negated transfer) and edits chosen features at their layers:

- ``ablate``: the feature contributes nothing;
- ``scale``: its activation times ``value``;
- ``clamp``: its activation set to ``value`` wherever it is active (a feature that does
  not fire stays off), or everywhere with ``everywhere=True``;
- ``keep``: its activation as it is, whatever the branch's scale (with the branch off,
  the selection added to the hybrid model).

An edited feature's contribution is its edited activation times its decoder column,
never scaled with the branch, so with ``branch`` *s* a layer's MLP output becomes::

    mlp(x) + s * dec(f) + sum over edited i of (f'_i - s * f_i) * d_i

Only the edited features' decoder columns are gathered for the correction, so an
intervention costs a small matmul per layer on top of the branch (with the branch off,
only the edited features' encoder rows are computed).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from adapters.branch import AdapterModel

Operation = Literal["ablate", "scale", "clamp", "keep"]


@dataclass(frozen=True)
class FeatureEdit:
    """One operation on some features of one layer."""

    layer: int
    features: tuple[int, ...]
    operation: Operation
    value: float = 0.0
    """The factor of ``scale``, the activation of ``clamp``."""
    everywhere: bool = False
    """``clamp`` at every position, not only where the feature fires."""


@dataclass(frozen=True)
class Intervention:
    edits: tuple[FeatureEdit, ...] = ()
    branch: float = 1.0
    """The scale of the whole branch: 1 on, 0 off (the hybrid model)."""

    @staticmethod
    def ablating(features: Sequence[tuple[int, int]]) -> Intervention:
        """The adapter model with these (layer, index) features ablated."""
        return Intervention(_edits(features, "ablate"))

    @staticmethod
    def added_to_hybrid(features: Sequence[tuple[int, int]]) -> Intervention:
        """The hybrid model (branch off) with only these features' contributions."""
        return Intervention(_edits(features, "keep"), branch=0.0)


def _edits(features: Sequence[tuple[int, int]], operation: Operation) -> tuple[FeatureEdit, ...]:
    by_layer: dict[int, list[int]] = {}
    for layer, index in features:
        by_layer.setdefault(layer, []).append(index)
    return tuple(
        FeatureEdit(layer, tuple(sorted(set(indices))), operation)
        for layer, indices in sorted(by_layer.items())
    )


@dataclass
class LayerEdit:
    """An intervention's work at one layer, its tensors ready on the model's device."""

    branch: float
    index: torch.Tensor | None = None
    """The edited features (None: only the branch's scale)."""
    factor: torch.Tensor | None = None
    """Per edited feature: what its activation is multiplied by (ablate 0, scale v,
    keep 1); NaN where it is clamped instead."""
    clamp: torch.Tensor | None = None
    everywhere: torch.Tensor | None = None
    enc_weight: torch.Tensor | None = None
    enc_bias: torch.Tensor | None = None
    dec_columns: torch.Tensor | None = field(default=None)
    scaled_columns: torch.Tensor | None = None
    """When nothing is clamped, the change is ``picked @ (d_i * (factor_i - branch))``:
    the decoder columns scaled once here, so a step costs one small matmul."""

    def apply(
        self, output: torch.Tensor, x: torch.Tensor, features: torch.Tensor | None,
        dec: torch.nn.Linear,
    ) -> torch.Tensor:  # fmt: skip
        """The MLP's output with the branch at its scale and the edits applied;
        ``features`` are the layer's activations when already computed."""
        if self.branch != 0.0:
            assert features is not None
            branch = dec(features)
            output = output + (branch if self.branch == 1.0 else self.branch * branch)
        if self.index is None:
            return output
        assert self.factor is not None and self.clamp is not None
        assert self.everywhere is not None and self.dec_columns is not None
        if features is not None:
            picked = features.index_select(-1, self.index)
        else:  # the branch off: only the edited features' encoder rows
            assert self.enc_weight is not None and self.enc_bias is not None
            picked = torch.relu(torch.nn.functional.linear(x, self.enc_weight, self.enc_bias))
        if self.scaled_columns is not None:  # no clamp: linear in the activations
            return output + torch.nn.functional.linear(picked, self.scaled_columns)
        clamped = torch.isnan(self.factor)
        edited = torch.where(clamped, 0.0, picked * torch.nan_to_num(self.factor))
        where = self.everywhere | (picked > 0)
        edited = torch.where(clamped & where, self.clamp, edited)
        change = edited - self.branch * picked
        return output + torch.nn.functional.linear(change, self.dec_columns)


def prepare(adapter: AdapterModel, intervention: Intervention) -> dict[int, LayerEdit]:
    """Each layer's work, once (the hook then does no Python-side set-up per token)."""
    for edit in intervention.edits:
        if not 0 <= edit.layer < adapter.n_layers:
            raise ValueError(f"layer {edit.layer}: the adapter has {adapter.n_layers} layers")
        bad = [i for i in edit.features if not 0 <= i < adapter.width]
        if bad:
            raise ValueError(f"layer {edit.layer}: no feature {bad[0]} (width {adapter.width})")
    plan = {layer: LayerEdit(intervention.branch) for layer in range(adapter.n_layers)}
    grouped: dict[int, list[FeatureEdit]] = {}
    for edit in intervention.edits:
        grouped.setdefault(edit.layer, []).append(edit)
    for layer, edits in grouped.items():
        enc, dec = adapter.enc_dec(layer)
        factors: dict[int, tuple[float, float, bool]] = {}  # index -> (factor, clamp, every)
        for edit in edits:  # a later edit of the same feature wins
            factor = {"ablate": 0.0, "scale": edit.value, "keep": 1.0}.get(edit.operation)
            for i in edit.features:
                factors[i] = (
                    float("nan") if factor is None else factor,
                    edit.value,
                    edit.everywhere,
                )
        index = sorted(factors)
        device, dtype = dec.weight.device, dec.weight.dtype
        at = torch.tensor(index, device=device)
        factor_of = torch.tensor([factors[i][0] for i in index], device=device, dtype=dtype)
        plan[layer] = LayerEdit(
            branch=intervention.branch,
            index=at,
            factor=factor_of,
            scaled_columns=None
            if torch.isnan(factor_of).any()
            else (dec.weight.detach().index_select(1, at) * (factor_of - intervention.branch)),
            clamp=torch.tensor([factors[i][1] for i in index], device=device, dtype=dtype),
            everywhere=torch.tensor([factors[i][2] for i in index], device=device),
            enc_weight=enc.weight.detach().index_select(0, at),
            enc_bias=enc.bias.detach().index_select(0, at),
            dec_columns=dec.weight.detach().index_select(1, at),
        )
    return plan


@contextlib.contextmanager
def intervening(adapter: AdapterModel, intervention: Intervention) -> Iterator[None]:
    """Within the block, every forward pass (generation included) runs with the
    intervention; the branch is as it was afterwards."""
    previous = adapter.state.edits
    adapter.state.edits = prepare(adapter, intervention)
    try:
        yield
    finally:
        adapter.state.edits = previous
