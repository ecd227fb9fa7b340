"""The output score: what a feature does to the next-token distribution when it is
steered, measured on corpus contexts, against random directions of the same size.

A feature is steered by adding its decoder column, times its mean activation where it
fires (times ``strength``), to its layer's MLP output at every position of the run's
random corpus windows (its detection negatives). Measured against the unsteered model:

- ``logprob_change``: the mean change in log-probability of the tokens the feature names,
  its logit lens's top tokens and any word its explanation quotes, averaged over those
  tokens and over every position;
- ``mass_change``: the probability moved to its logit lens's top tokens;
- ``kl``: the mean KL divergence of the steered next-token distribution from the
  unsteered one;
- ``promoted``: the tokens whose log-probability rose most.

Any direction promotes its own logit-lens tokens a little, so the change is judged
against a null chosen the same way: per layer, random directions steered at a few sizes
spanning the steering sizes of all the layer's alive features, each one's mean change in
log-probability of its own logit lens's top tokens, interpolated (in log-size) to the
feature's size, against the feature's on its logit lens's top tokens. The null is
measured once per layer and kept (:class:`NullStore`): which features one invocation
scores never changes it, so a resumed run, or one scoring another selection, gives
every feature the p-value an uninterrupted run of all features would. A feature is
significant when it promotes the tokens it points at more than random directions of its
size promote theirs. ``p_value`` is ``(1 + k) / (1 + R)``, with ``k`` of ``R`` random
directions moving as much; the effect is ``significant`` when the p-value is at most
``level``.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Protocol

import numpy as np
import polars as pl
import torch
from pydantic import BaseModel

from adapters.branch import AdapterModel, mlp_of
from collectors.run_format import feature_id

_QUOTED = re.compile(r"""['"\u2018\u201c]([^'"\u2019\u201d]{1,24})['"\u2019\u201d]""")


@dataclass(frozen=True)
class ScoreSettings:
    contexts: int = 16
    """Corpus windows steered over."""
    strength: float = 1.0
    """The multiple of the feature's mean activation added."""
    lens_tokens: int = 5
    """Logit-lens tokens named per feature."""
    null_directions: int = 19
    null_levels: int = 6
    """Steering sizes the random directions are measured at (spanning the layer's)."""
    level: float = 0.05
    seed: int = 0

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


class OutputScore(BaseModel):
    feature_id: str
    layer: int
    size: float
    """The norm of the added vector."""
    tokens: list[str]
    logprob_change: float
    lens_change: float
    """The mean change in log-probability of its logit lens's top tokens, the statistic
    judged against the null."""
    mass_change: float
    """The probability moved to its logit lens's top tokens."""
    kl: float
    null_high: float
    """The largest change a random direction of this size made to its own lens tokens."""
    p_value: float
    significant: bool
    promoted: list[str]
    settings: str


@dataclass(frozen=True)
class Target:
    layer: int
    index: int
    size_factor: float
    """The activation the decoder column is multiplied by."""
    token_ids: list[int]


def quoted_words(explanation: str | None) -> list[str]:
    return [m.strip() for m in _QUOTED.findall(explanation or "") if m.strip()]


def named_token_ids(
    lens_ids: Sequence[int], explanation: str | None, vocabulary: dict[str, list[int]], k: int
) -> list[int]:
    """The feature's logit-lens top ``k`` and every token spelling a quoted word."""
    ids = list(dict.fromkeys(int(i) for i in list(lens_ids)[:k]))
    for word in quoted_words(explanation):
        ids += [i for i in vocabulary.get(word.lower(), []) if i not in ids]
    return ids


def windows(negatives: pl.DataFrame, n: int) -> torch.Tensor:
    """``n`` corpus windows of the most common length, as token ids [n, width]."""
    lengths = negatives["token_ids"].list.len()
    width = int(lengths.mode().max())  # type: ignore[arg-type]
    chosen = negatives.filter(lengths == width).head(n)
    return torch.tensor(chosen["token_ids"].to_list(), dtype=torch.long)


class _Steering:
    """A forward hook adding one vector per batch row to a layer's MLP output."""

    def __init__(self, adapter: AdapterModel, layer: int) -> None:
        self.vectors: torch.Tensor | None = None
        self.handle = mlp_of(adapter.model, layer).register_forward_hook(self._add)

    def _add(self, _module: torch.nn.Module, _args: object, output: torch.Tensor) -> torch.Tensor:
        if self.vectors is None:
            return output
        return output + self.vectors.to(output.dtype).unsqueeze(1)

    def close(self) -> None:
        self.handle.remove()


def _log_probs(adapter: AdapterModel, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        logits = adapter.model(input_ids=ids).logits.float()
    return torch.log_softmax(logits, dim=-1)


@dataclass(frozen=True)
class _Changes:
    logprob: torch.Tensor
    """Per steering vector and token, the mean change in log-probability [n, V]."""
    mass: torch.Tensor
    """Per steering vector and token, the mean change in probability [n, V]."""
    kl: torch.Tensor
    """Per steering vector, the mean KL from the unsteered distribution [n]."""


def _changes(
    adapter: AdapterModel, steering: _Steering, contexts: torch.Tensor, base: torch.Tensor,
    vectors: torch.Tensor, per_batch: int,
) -> _Changes:  # fmt: skip
    """What each steering vector changes, ``per_batch`` vectors a forward pass."""
    if len(vectors) > per_batch:
        parts = [_changes(adapter, steering, contexts, base, vectors[i : i + per_batch],
                          per_batch) for i in range(0, len(vectors), per_batch)]  # fmt: skip
        return _Changes(*(torch.cat([getattr(p, k) for p in parts])
                          for k in ("logprob", "mass", "kl")))  # fmt: skip
    n, c = len(vectors), len(contexts)
    steering.vectors = vectors.repeat_interleave(c, dim=0)
    try:
        steered = _log_probs(adapter, contexts.repeat(n, 1)).view(n, c, *base.shape[1:])
    finally:
        steering.vectors = None
    delta = steered - base.unsqueeze(0)
    probs = steered.exp()
    kl = (probs * delta).sum(-1).mean(dim=(1, 2))
    mass = (probs - base.exp().unsqueeze(0)).mean(dim=(1, 2))
    return _Changes(delta.mean(dim=(1, 2)), mass, kl)


@dataclass(frozen=True)
class LayerNull:
    """A layer's random directions: each one's change to its own logit lens's top tokens
    [levels, directions], at each steering size of ``grid`` [levels].

    It is measured once per layer, at sizes spanning all of the layer's alive features,
    and kept: every feature of the layer is judged against the same null, whichever
    invocation or selection scores it."""

    grid: np.ndarray
    values: np.ndarray

    def at(self, size: float) -> np.ndarray:
        """Each random direction's change at ``size``, interpolated in log-size."""
        if len(self.grid) == 1:
            scaled: np.ndarray = self.values[0] * (size / self.grid[0])
            return scaled
        where = np.log(np.clip(size, self.grid[0], self.grid[-1]))
        return np.array([np.interp(where, np.log(self.grid), self.values[:, j])
                         for j in range(self.values.shape[1])])  # fmt: skip

    def to_json(self) -> str:
        return json.dumps({"grid": self.grid.tolist(), "values": self.values.tolist()})

    @staticmethod
    def from_json(text: str) -> LayerNull:
        raw = json.loads(text)
        return LayerNull(np.array(raw["grid"], dtype=float), np.array(raw["values"], dtype=float))


class NullStore(Protocol):
    """Where measured nulls are kept between invocations, by layer."""

    def get(self, layer: int) -> LayerNull | None: ...

    def put(self, layer: int, null: LayerNull) -> None: ...


class _Layer:
    """One layer's steering: its decoder, the unsteered log-probabilities of the
    contexts, and a hook to add vectors to its MLP output."""

    def __init__(self, adapter: AdapterModel, layer: int, contexts: torch.Tensor,
                 rows_per_batch: int) -> None:  # fmt: skip
        self.adapter, self.layer = adapter, layer
        self.contexts = contexts.to(adapter.device)
        self.dec = adapter.decoder_columns(layer).detach().float()
        self.base = _log_probs(adapter, self.contexts)
        self.per_batch = max(1, rows_per_batch // len(contexts))
        self.steering = _Steering(adapter, layer)

    def changes(self, vectors: torch.Tensor) -> _Changes:
        return _changes(self.adapter, self.steering, self.contexts, self.base, vectors,
                        self.per_batch)  # fmt: skip

    def sizes(self, indices: Sequence[int], factors: torch.Tensor) -> torch.Tensor:
        """The norms of the vectors the features at ``indices`` are steered with."""
        norms: torch.Tensor = self.dec[:, list(indices)].norm(dim=0) * factors
        return norms


def _measure_null(steered: _Layer, layer_sizes: torch.Tensor, settings: ScoreSettings) -> LayerNull:
    """Random directions steered at sizes spanning ``layer_sizes`` (every alive feature's
    of the layer), each judged on its own logit lens's top tokens, as a feature is."""
    adapter, device = steered.adapter, steered.adapter.device
    grid = _size_grid(layer_sizes, settings.null_levels)
    generator = torch.Generator().manual_seed(settings.seed * 1000 + steered.layer)
    randoms = torch.randn(settings.null_directions, steered.dec.shape[0], generator=generator)
    randoms = (randoms / randoms.norm(dim=1, keepdim=True)).to(device)
    own = torch.topk(randoms @ adapter.unembedding().detach().float().T,
                     settings.lens_tokens, dim=1).indices  # fmt: skip
    values = np.stack([  # [levels, directions]
        steered.changes(randoms * size).logprob.gather(1, own).mean(dim=1).cpu().numpy()
        for size in grid
    ])  # fmt: skip
    return LayerNull(grid, values)


def score_layer(
    adapter: AdapterModel, layer: int, targets: Sequence[Target], contexts: torch.Tensor,
    settings: ScoreSettings, decode: Callable[[int], str], rows_per_batch: int = 256,
    layer_features: Sequence[tuple[int, float]] | None = None, nulls: NullStore | None = None,
) -> Iterator[list[OutputScore]]:  # fmt: skip
    """The layer's targets scored, a batch at a time, against the layer's null: the one
    in ``nulls``, else one measured at the sizes of ``layer_features`` ((index, mean
    activation) of every alive feature of the layer; the targets' own without it) and
    put there."""
    steered = _Layer(adapter, layer, contexts, rows_per_batch)
    device = adapter.device
    try:
        null = nulls.get(layer) if nulls is not None else None
        if null is None:
            everyone = layer_features or [(t.index, t.size_factor) for t in targets]
            factors = torch.tensor([f for _, f in everyone], device=device) * settings.strength
            null = _measure_null(steered, steered.sizes([i for i, _ in everyone], factors),
                                 settings)  # fmt: skip
            if nulls is not None:
                nulls.put(layer, null)
        sizes = torch.tensor([t.size_factor for t in targets], device=device) * settings.strength
        for start in range(0, len(targets), steered.per_batch):
            batch = targets[start : start + steered.per_batch]
            columns = steered.dec[:, [t.index for t in batch]].T
            vectors = columns * sizes[start : start + len(batch), None]
            yield _scored(batch, vectors, steered.changes(vectors), null, settings, decode)
    finally:
        steered.steering.close()


def _scored(
    batch: Sequence[Target], vectors: torch.Tensor, changes: _Changes, null: LayerNull,
    settings: ScoreSettings, decode: Callable[[int], str],
) -> list[OutputScore]:  # fmt: skip
    out = []
    for row, target in enumerate(batch):
        ids = torch.tensor(target.token_ids, device=vectors.device, dtype=torch.long)
        size = float(vectors[row].norm())
        stat = float(changes.logprob[row, ids].mean())
        # judged as the random directions are: on its logit lens's top tokens
        lens = ids[: settings.lens_tokens]
        mass = float(changes.mass[row, lens].sum())
        lens_change = float(changes.logprob[row, lens].mean())
        nulls = null.at(size)
        beyond = int((nulls >= lens_change).sum())
        p = (1 + beyond) / (1 + settings.null_directions)
        top = torch.topk(changes.logprob[row], 5).indices.tolist()
        out.append(OutputScore(
            feature_id=feature_id(target.layer, target.index), layer=target.layer, size=size,
            tokens=[decode(i) for i in target.token_ids], logprob_change=stat,
            lens_change=lens_change, mass_change=mass, kl=float(changes.kl[row]),
            null_high=float(nulls.max()), p_value=p, significant=p <= settings.level,
            promoted=[decode(i) for i in top], settings=settings.key(),
        ))  # fmt: skip
    return out


def score_features(
    adapter: AdapterModel, features: pl.DataFrame, explanations: dict[str, str],
    vocabulary: dict[str, list[int]], contexts: torch.Tensor, settings: ScoreSettings,
    decode: Callable[[int], str], rows_per_batch: int = 256,
    alive: pl.DataFrame | None = None, nulls: NullStore | None = None,
) -> Iterator[list[OutputScore]]:  # fmt: skip
    """Every listed feature (rows of the run's feature table) scored, layer by layer, a
    batch at a time. Each layer's null spans the sizes of its features in ``alive`` (the
    run's alive features; ``features`` without it) and is kept in ``nulls``."""
    ordered = features.sort("layer", "index")
    everyone = (alive if alive is not None else features).select("layer", "index", "act_mean")
    for layer in ordered["layer"].unique(maintain_order=True).to_list():
        part = ordered.filter(pl.col("layer") == layer)
        targets = []
        for index, act_mean, lens in part.select("index", "act_mean", "top_logit_ids").iter_rows():
            explanation = explanations.get(feature_id(layer, index))
            tokens = named_token_ids(lens, explanation, vocabulary, settings.lens_tokens)
            targets.append(Target(layer, index, float(act_mean), tokens))
        peers = everyone.filter(pl.col("layer") == layer).sort("index")
        layer_features = [(int(i), float(a)) for _, i, a in peers.iter_rows()]
        yield from score_layer(adapter, layer, targets, contexts, settings, decode,
                               rows_per_batch, layer_features, nulls)  # fmt: skip


def _size_grid(norms: torch.Tensor, levels: int) -> np.ndarray:
    """Steering sizes spanning the layer's, evenly in log-size."""
    low, high = float(norms.min()), float(norms.max())
    if not np.isfinite(low) or high <= 0:
        return np.array([1.0])
    low = max(low, high * 1e-4)
    return np.geomspace(low, high, levels) if high > low else np.array([high])


def auroc(positive: Sequence[float], negative: Sequence[float]) -> float:
    """The probability that a positive scores above a negative (ties count half)."""
    if not positive or not negative:
        raise ValueError("auroc: both classes need at least one score")
    neg = np.sort(np.asarray(negative))
    wins = 0.0
    for value in positive:
        below = np.searchsorted(neg, value, side="left")
        ties = np.searchsorted(neg, value, side="right") - below
        wins += below + ties / 2
    return float(wins / (len(positive) * len(negative)))
