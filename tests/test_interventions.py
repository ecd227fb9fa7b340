"""Interventions on the branch's features, checked against a naive reference that
recomputes every layer's MLP output by hand with the edited activations: ablating,
scaling, clamping and keeping features, the branch off (the hybrid) and scaled, during
a forward pass and during generation."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import pytest
import torch

from adapters.branch import AdapterModel, mlp_of
from adapters.interventions import FeatureEdit, Intervention, intervening, prepare
from adapters.random_adapter import ModelShape, random_adapter

SHAPE = ModelShape(n_layers=3, d_model=64, intermediate=128, n_features=256, vocab_size=300)


@pytest.fixture(scope="module")
def adapter() -> AdapterModel:
    calibration = torch.randint(
        0, SHAPE.vocab_size, (6, 48), generator=torch.Generator().manual_seed(1)
    )
    return random_adapter(SHAPE, calibration, l0=12.0, seed=3, dtype=torch.float64)


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, SHAPE.vocab_size, (2, 40), generator=torch.Generator().manual_seed(2))


Edit = Callable[[int, torch.Tensor], torch.Tensor]


def _reference(adapter: AdapterModel, ids: torch.Tensor, branch: float, edit: Edit) -> torch.Tensor:
    """Logits with each layer's MLP output replaced by mlp(x) + branch * dec(f) + the
    edited features' change, the activations edited by ``edit(layer, f)``."""
    handles = []
    saved = adapter.state.enabled
    adapter.set_enabled(False)  # the hooks below do the branch's work

    def hook_for(layer: int) -> Any:
        def hook(module: Any, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> Any:
            enc, dec = adapter.enc_dec(layer)
            f = torch.relu(enc(args[0]))
            edited = edit(layer, f.clone())
            changed = (edited != f).any(dim=(0, 1))
            scaled = torch.where(changed, edited, branch * f)
            bias = dec.bias if dec.bias is not None else 0.0
            return output + scaled @ dec.weight.T + branch * bias

        return hook

    for layer in range(adapter.n_layers):
        handles.append(mlp_of(adapter.model, layer).register_forward_hook(hook_for(layer)))
    try:
        with torch.no_grad():
            logits: torch.Tensor = adapter.model(input_ids=ids).logits
        return logits
    finally:
        for h in handles:
            h.remove()
        adapter.set_enabled(saved)


def _logits(
    adapter: AdapterModel, ids: torch.Tensor, intervention: Intervention | None = None
) -> torch.Tensor:
    with (
        torch.no_grad(),
        intervening(adapter, intervention) if intervention else contextlib.nullcontext(),
    ):
        logits: torch.Tensor = adapter.model(input_ids=ids).logits
    return logits


def _active(adapter: AdapterModel, ids: torch.Tensor, layer: int, n: int) -> list[int]:
    """The ``n`` features of ``layer`` that fire most on ``ids`` (so an edit matters)."""
    with torch.no_grad(), adapter.recording([layer]) as captured:
        adapter.model(input_ids=ids)
    counts = (captured[layer] > 0).sum(dim=(0, 1))
    return [int(i) for i in torch.argsort(counts, descending=True)[:n]]


def test_the_branch_on_off_and_every_feature_ablated(
    adapter: AdapterModel, ids: torch.Tensor
) -> None:
    everything = [(layer, i) for layer in range(SHAPE.n_layers) for i in range(SHAPE.n_features)]
    adapter.set_enabled(False)
    hybrid = _logits(adapter, ids)
    adapter.set_enabled(True)
    on = _logits(adapter, ids)
    assert not torch.allclose(on, hybrid)  # the branch matters on this model
    # ablating every feature leaves the decoder bias; the hybrid has none of the branch
    ablated = _logits(adapter, ids, Intervention.ablating(everything))
    assert torch.allclose(ablated, _reference(adapter, ids, 1.0, lambda _l, f: f * 0), atol=1e-9)
    assert torch.allclose(_logits(adapter, ids, Intervention()), on, atol=1e-12)
    assert torch.allclose(_logits(adapter, ids, Intervention(branch=0.0)), hybrid, atol=1e-12)


def test_each_operation_matches_the_reference(adapter: AdapterModel, ids: torch.Tensor) -> None:
    picked = {layer: _active(adapter, ids, layer, 5) for layer in range(SHAPE.n_layers)}
    cases: list[tuple[Intervention, float, Edit]] = []
    for op, value, everywhere in [("ablate", 0.0, False), ("scale", 3.0, False),
                                  ("clamp", 2.5, False), ("clamp", 1.5, True)]:  # fmt: skip
        edits = tuple(FeatureEdit(layer, tuple(fs), op, value, everywhere)  # type: ignore[arg-type]
                      for layer, fs in picked.items())  # fmt: skip

        def edit(layer: int, f: torch.Tensor, op: str = op, value: float = value,
                 everywhere: bool = everywhere) -> torch.Tensor:  # fmt: skip
            idx = torch.tensor(picked[layer])
            sub = f[..., idx]
            if op == "ablate":
                sub = sub * 0
            elif op == "scale":
                sub = sub * value
            else:
                sub = torch.where((sub > 0) | everywhere, torch.full_like(sub, value), sub)
            f[..., idx] = sub
            return f

        cases.append((Intervention(edits), 1.0, edit))
        cases.append((Intervention(edits, branch=-0.5), -0.5, edit))
    for intervention, branch, edit in cases:
        got = _logits(adapter, ids, intervention)
        want = _reference(adapter, ids, branch, edit)
        assert torch.allclose(got, want, atol=1e-9), intervention.edits[0]
        assert not torch.allclose(got, _logits(adapter, ids), atol=1e-6)


def test_a_selection_added_to_the_hybrid_only_adds_its_own_contribution(
    adapter: AdapterModel, ids: torch.Tensor
) -> None:
    picked = [
        (layer, i) for layer in range(SHAPE.n_layers) for i in _active(adapter, ids, layer, 8)
    ]
    got = _logits(adapter, ids, Intervention.added_to_hybrid(picked))

    # the hybrid plus exactly the picked features' activations times their columns
    handles = []

    def hook_for(layer: int) -> Any:
        def hook(module: Any, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> Any:
            enc, dec = adapter.enc_dec(layer)
            idx = torch.tensor([i for la, i in picked if la == layer])
            f = torch.relu(enc(args[0]))[..., idx]
            return output + f @ dec.weight[:, idx].T

        return hook

    adapter.set_enabled(False)
    for layer in range(SHAPE.n_layers):
        handles.append(mlp_of(adapter.model, layer).register_forward_hook(hook_for(layer)))
    try:
        with torch.no_grad():
            want = adapter.model(input_ids=ids).logits
    finally:
        for h in handles:
            h.remove()
        adapter.set_enabled(True)
    assert torch.allclose(got, want, atol=1e-9)
    assert not torch.allclose(got, _logits(adapter, ids, Intervention(branch=0.0)), atol=1e-6)


def test_generation_runs_with_the_intervention_and_the_branch_is_restored(
    adapter: AdapterModel, ids: torch.Tensor
) -> None:
    prompt = ids[:1, :12]
    settings: dict[str, Any] = {"max_new_tokens": 12, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        plain = adapter.model.generate(prompt, **settings)
        with intervening(adapter, Intervention(branch=0.0)):
            hybrid = adapter.model.generate(prompt, **settings)
        adapter.set_enabled(False)
        expected = adapter.model.generate(prompt, **settings)
        adapter.set_enabled(True)
        again = adapter.model.generate(prompt, **settings)
    assert torch.equal(hybrid, expected)
    assert torch.equal(again, plain)  # nothing left behind


def test_bad_edits_are_refused_with_the_layer_and_feature(adapter: AdapterModel) -> None:
    with pytest.raises(ValueError, match="layer 7: the adapter has 3 layers"):
        prepare(adapter, Intervention((FeatureEdit(7, (0,), "ablate"),)))
    with pytest.raises(ValueError, match="layer 1: no feature 999"):
        prepare(adapter, Intervention((FeatureEdit(1, (999,), "ablate"),)))
