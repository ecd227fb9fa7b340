"""The control adapter: the run's model with a random branch whose features fire as often
as the run's do.

Auto-interpretation scores of features from random networks come close to those of
trained ones (Heap et al. 2025, "Sparse Autoencoders Can Interpret Randomly Initialized
Transformers", arXiv 2501.17727), so a score is read against features that mean nothing
but look alike to a judge. What a judge sees most is how often a feature fires: a
feature that fires on a third of the tokens is labeled differently from one that fires
once in ten thousand. The control keeps that and nothing else.

Per layer, control feature ``i`` is paired with the run's feature ``perm[i]`` (a seeded
permutation within the layer) and takes its activation frequency, its encoder row's norm
and its decoder column's norm; the directions are random. Its encoder bias is then set
from the MLP inputs of a slice of the corpus so that it fires on that share of the slice's
tokens: the control's frequencies are the run's, quantile for quantile, and a dead
feature of the run stays dead. Layers are set in order, each from the inputs it sees
with the control branches below it already on, as collection runs them. A decoder bias,
where the checkpoint has one, is kept: it is no feature.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from adapters.branch import AdapterModel, mlp_of
from collectors.batching import make_batch, plan_batches
from collectors.corpus import TokenizedCorpus

if TYPE_CHECKING:
    from collectors.run_format import CollectParams

log = logging.getLogger(__name__)

CHUNK = 1024
"""Features whose pre-activations are sorted at once ([tokens, CHUNK] floats)."""


class _Captured(Exception):
    """Raised from the hook once the layer's MLP input is captured: the rest of the
    forward pass would be wasted."""


@dataclass(frozen=True)
class LayerTargets:
    """What one layer of the control copies from the run, per run feature index."""

    frequency: np.ndarray  # [n_features] the run's activation frequency (0: dead)
    enc_norm: np.ndarray  # [n_features] the run's encoder row norms
    dec_norm: np.ndarray  # [n_features] the run's decoder column norms


@dataclass(frozen=True)
class LayerMatch:
    """How one control layer was set: its permutation and what the slice says."""

    layer: int
    permutation: list[int]
    """control feature i copies the run's feature permutation[i]."""
    target_median: float
    """median target frequency of the alive features"""
    calibrated_median: float
    """median frequency of the same features on the calibration slice"""


def calibration_sequences(corpus: TokenizedCorpus, n_tokens: int, seed: int) -> np.ndarray:
    """A seeded random slice of whole sequences with at least ``n_tokens`` tokens (or the
    whole corpus when it has fewer)."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(corpus.n_sequences)
    lengths = corpus.lengths()[order]
    enough = int(np.searchsorted(np.cumsum(lengths), n_tokens)) + 1
    return np.sort(order[:enough])


def mlp_inputs(
    adapter: AdapterModel,
    corpus: TokenizedCorpus,
    sequences: np.ndarray,
    layer: int,
    batch_tokens: int,
) -> torch.Tensor:
    """The MLP inputs of ``layer`` at every real token of ``sequences`` [tokens, d_model],
    in float32, with the branches as they are now."""
    captured: list[torch.Tensor] = []
    mask: list[torch.Tensor] = []

    def hook(_module: object, args: tuple[torch.Tensor, ...]) -> None:
        captured.append(args[0].detach().float().reshape(-1, args[0].shape[-1]))
        raise _Captured

    decoder = adapter.model.get_decoder()
    handle = mlp_of(adapter.model, layer).register_forward_pre_hook(hook)
    try:
        for rows in plan_batches(corpus.lengths()[sequences], batch_tokens):
            batch = make_batch(corpus, sequences[rows], adapter.device)
            try:
                with torch.no_grad():
                    decoder(
                        input_ids=batch.input_ids,
                        attention_mask=batch.attention_mask,
                        use_cache=False,
                    )
            except _Captured:
                pass
            mask.append(batch.attention_mask.reshape(-1).bool())
    finally:
        handle.remove()
    x = torch.cat(captured)
    return x[torch.cat(mask)]


def firing_bias(pre: torch.Tensor, frequency: torch.Tensor) -> torch.Tensor:
    """Biases that make each column of ``pre`` [tokens, F] positive on its
    ``frequency`` share of the tokens: midway between the k-th and (k+1)-th largest
    values, k = round(frequency x tokens), at least 1 for a feature that fires at all.
    A zero frequency gives a bias below every value (the feature stays dead)."""
    n_tokens = pre.shape[0]
    ranked = pre.sort(dim=0, descending=True).values  # [T, F]
    k = (frequency * n_tokens).round().long()
    k = torch.where(frequency > 0, k.clamp(min=1), torch.zeros_like(k))
    k = k.clamp(max=n_tokens)
    cols = torch.arange(pre.shape[1], device=pre.device)
    above = ranked[(k - 1).clamp(min=0), cols]  # the k-th largest: fires
    below = ranked[k.clamp(max=n_tokens - 1), cols]  # the (k+1)-th: does not
    spread = (ranked[0] - ranked[-1]).abs() + 1.0
    threshold = torch.where(k >= n_tokens, ranked[-1] - spread, (above + below) / 2)
    threshold = torch.where(k == 0, ranked[0] + spread, threshold)
    return -threshold


def _unit_rows(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    rows = torch.randn(*shape, generator=generator)
    unit: torch.Tensor = rows / rows.norm(dim=1, keepdim=True).clamp(min=1e-12)
    return unit


def set_control_layer(
    adapter: AdapterModel,
    x: torch.Tensor,
    layer: int,
    targets: LayerTargets,
    generator: torch.Generator,
) -> LayerMatch:
    """Replace ``layer``'s branch with a random one matched to ``targets`` on the MLP
    inputs ``x`` [tokens, d_model]."""
    n, d = adapter.config.n_features, adapter.config.d_model
    perm = torch.randperm(n, generator=generator)
    freq = torch.from_numpy(targets.frequency).float()[perm]
    enc = _unit_rows((n, d), generator) * torch.from_numpy(targets.enc_norm).float()[perm, None]
    dec = _unit_rows((n, d), generator) * torch.from_numpy(targets.dec_norm).float()[perm, None]
    device = x.device
    enc = enc.to(device)
    bias = torch.empty(n, device=device)
    fired = torch.empty(n, device=device)
    for start in range(0, n, CHUNK):
        part = slice(start, min(start + CHUNK, n))
        pre = x @ enc[part].T
        bias[part] = firing_bias(pre, freq[part].to(device))
        fired[part] = ((pre + bias[part]) > 0).float().mean(0)
    enc_layer, dec_layer = adapter.enc_dec(layer)
    with torch.no_grad():
        enc_layer.weight.copy_(enc)
        enc_layer.bias.copy_(bias)
        dec_layer.weight.copy_(dec.T)
    alive = freq > 0
    return LayerMatch(
        layer=layer,
        permutation=[int(i) for i in perm],
        target_median=float(freq[alive].median()) if alive.any() else 0.0,
        calibrated_median=float(fired.cpu()[alive].median()) if alive.any() else 0.0,
    )


def silence_layer(adapter: AdapterModel, layer: int) -> None:
    """A branch that never fires and adds nothing (a layer the run did not collect)."""
    enc_layer, dec_layer = adapter.enc_dec(layer)
    with torch.no_grad():
        enc_layer.weight.zero_()
        enc_layer.bias.fill_(-1.0)
        dec_layer.weight.zero_()


def layer_targets(adapter: AdapterModel, layer: int, frequency: np.ndarray) -> LayerTargets:
    """The run's frequencies with the run's own weight norms at ``layer``."""
    enc, dec = adapter.enc_dec(layer)
    return LayerTargets(
        frequency=frequency,
        enc_norm=enc.weight.detach().float().norm(dim=1).cpu().numpy(),
        dec_norm=dec.weight.detach().float().norm(dim=0).cpu().numpy(),
    )


def make_control(
    adapter: AdapterModel,
    corpus: TokenizedCorpus,
    params: CollectParams,
    frequencies: dict[int, np.ndarray],
    seed: int,
    calibration_tokens: int,
    on_layer: Callable[[LayerMatch], None] | None = None,
) -> list[LayerMatch]:
    """Turn ``adapter`` (the run's, loaded) into its control, in place: every layer in
    ``frequencies`` matched to the run's frequencies there, the others silenced."""
    sequences = calibration_sequences(corpus, calibration_tokens, seed)
    generator = torch.Generator().manual_seed(seed)
    for layer in range(adapter.n_layers):
        if layer not in frequencies:
            silence_layer(adapter, layer)
    matches = []
    for layer in sorted(frequencies):
        targets = layer_targets(adapter, layer, frequencies[layer])
        x = mlp_inputs(adapter, corpus, sequences, layer, params.batch_tokens)
        match = set_control_layer(adapter, x, layer, targets, generator)
        log.info("control layer %d: median frequency %.4g (run %.4g) on %d tokens",
                 layer, match.calibrated_median, match.target_median, x.shape[0])  # fmt: skip
        matches.append(match)
        if on_layer is not None:
            on_layer(match)
    return matches
