"""Per-feature example reservoirs kept on the device and merged batch by batch.

Two reservoirs share one mechanism: keep, for every feature, the ``k`` activations with
the smallest key, ties broken by the earlier corpus position. For the top examples the
key is minus the activation; for the uniform random sample it is a hash of
(seed, layer, position, feature), so the sample is a bottom-k sketch: uniform without
replacement, and the same whatever the batching, order, or split of the corpus.

All work is tensor operations over the batch's nonzero activations; nothing loops over
activations in Python.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

EMPTY_POS = torch.iinfo(torch.int64).max
_MASK63 = 0x7FFFFFFFFFFFFFFF
_MIX1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_MIX2 = 0x94D049BB133111EB - (1 << 64)
_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)


def _wrap64(value: int) -> int:
    """A Python int reduced to the signed int64 it wraps to."""
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


def hash_keys(seed: int, layer: int, pos: torch.Tensor, feat: torch.Tensor) -> torch.Tensor:
    """A splitmix64-style hash of (seed, layer, position, feature) as non-negative int64."""
    z = pos * 1_000_003 + feat + _wrap64((seed * 0x1F3 + layer + 1) * _GOLDEN)
    z = (z ^ (z >> 30)) * _MIX1
    z = (z ^ (z >> 27)) * _MIX2
    z = z ^ (z >> 31)
    return z & _MASK63


def empty_key(dtype: torch.dtype) -> float | int:
    """The key of an empty slot: larger than any real key."""
    return torch.finfo(dtype).max if dtype.is_floating_point else EMPTY_POS


def rank_within_groups(groups_sorted: torch.Tensor) -> torch.Tensor:
    """For a sorted 1-D tensor of group ids, each element's rank inside its group."""
    n = groups_sorted.numel()
    first = torch.searchsorted(groups_sorted, groups_sorted, right=False)
    return torch.arange(n, device=groups_sorted.device) - first


def lexsort(primary: torch.Tensor, secondary: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Indices sorting by ``primary`` ascending, ties by ``secondary`` ascending."""
    order = torch.sort(secondary, dim=dim, stable=True).indices
    step = torch.sort(torch.gather(primary, dim, order), dim=dim, stable=True).indices
    return torch.gather(order, dim, step)


@dataclass
class Reservoir:
    """The ``k`` smallest-key entries of every feature: key, activation, corpus position,
    and the feature's activations over the window around that position."""

    key: torch.Tensor  # [F, k]; +max when empty
    act: torch.Tensor  # [F, k] float32
    pos: torch.Tensor  # [F, k] int64; EMPTY_POS when empty
    context: torch.Tensor  # [F, k, W] float32

    @classmethod
    def empty(
        cls, n_features: int, k: int, window: int, key_dtype: torch.dtype, device: torch.device
    ) -> Reservoir:
        return cls(
            key=torch.full((n_features, k), empty_key(key_dtype), dtype=key_dtype, device=device),
            act=torch.zeros((n_features, k), dtype=torch.float32, device=device),
            pos=torch.full((n_features, k), EMPTY_POS, dtype=torch.int64, device=device),
            context=torch.zeros((n_features, k, window), dtype=torch.float32, device=device),
        )

    @property
    def k(self) -> int:
        return int(self.key.shape[1])

    def merge(
        self,
        feat: torch.Tensor,
        key: torch.Tensor,
        act: torch.Tensor,
        pos: torch.Tensor,
        flat: torch.Tensor,
        windows: WindowGatherer,
    ) -> None:
        """Merge a batch's candidate entries (one per nonzero activation): ``flat`` is each
        entry's index into the batch's flattened token grid, used to cut its context."""
        k = self.key.shape[1]
        # 1. Reduce the batch to at most k candidates per feature.
        order = lexsort(key, pos)
        order = order[torch.sort(feat[order], stable=True).indices]
        feat_sorted = feat[order]
        rank = rank_within_groups(feat_sorted)
        keep = rank < k
        order, feat_sorted, rank = order[keep], feat_sorted[keep], rank[keep]
        new_key = torch.full_like(self.key, empty_key(self.key.dtype))
        new_pos = torch.full_like(self.pos, EMPTY_POS)
        new_act = torch.zeros_like(self.act)
        new_flat = torch.zeros_like(self.pos)
        new_key[feat_sorted, rank] = key[order]
        new_pos[feat_sorted, rank] = pos[order]
        new_act[feat_sorted, rank] = act[order]
        new_flat[feat_sorted, rank] = flat[order]
        # 2. Merge with the reservoir: smallest key first, ties by earlier position.
        all_key = torch.cat([self.key, new_key], dim=1)
        all_pos = torch.cat([self.pos, new_pos], dim=1)
        perm = lexsort(all_key, all_pos, dim=1)[:, :k]
        from_new = perm >= k
        old_slot = perm.clamp(max=k - 1)
        new_slot = (perm - k).clamp(min=0)
        self.key = torch.gather(all_key, 1, perm)
        self.pos = torch.gather(all_pos, 1, perm)
        self.act = torch.where(
            from_new, torch.gather(new_act, 1, new_slot), torch.gather(self.act, 1, old_slot)
        )
        context = torch.gather(
            self.context, 1, old_slot.unsqueeze(-1).expand(-1, -1, self.context.shape[2])
        )
        rows, cols = from_new.nonzero(as_tuple=True)
        if rows.numel():
            context[rows, cols] = windows.cut(new_flat[rows, new_slot[rows, cols]], rows)
        self.context = context


@dataclass
class WindowGatherer:
    """Cuts one feature's activations around given positions out of a batch's features."""

    features: torch.Tensor  # [B*T, F] flattened batch
    row_start: torch.Tensor  # [B*T] flat index of the row's first token
    row_end: torch.Tensor  # [B*T] flat index one past the row's last real token
    before: int
    after: int

    def cut(self, flat: torch.Tensor, feat: torch.Tensor) -> torch.Tensor:
        offsets = torch.arange(-self.before, self.after + 1, device=flat.device)
        idx = flat.unsqueeze(1) + offsets
        valid = (idx >= self.row_start[flat].unsqueeze(1)) & (idx < self.row_end[flat].unsqueeze(1))
        idx = torch.where(valid, idx, flat.unsqueeze(1))
        values = self.features[idx, feat.unsqueeze(1).expand_as(idx)].float()
        return torch.where(valid, values, torch.zeros_like(values))


def combine_reservoirs(a: Reservoir, b: Reservoir) -> Reservoir:
    """The ``k`` smallest-key entries of two reservoirs of the same features (ties by the
    earlier position): the reservoir of the union of what both saw."""
    k = a.k
    all_key = torch.cat([a.key, b.key], dim=1)
    all_pos = torch.cat([a.pos, b.pos], dim=1)
    perm = lexsort(all_key, all_pos, dim=1)[:, :k]
    context = torch.cat([a.context, b.context], dim=1)
    return Reservoir(
        key=torch.gather(all_key, 1, perm),
        act=torch.gather(torch.cat([a.act, b.act], dim=1), 1, perm),
        pos=torch.gather(all_pos, 1, perm),
        context=torch.gather(context, 1, perm.unsqueeze(-1).expand(-1, -1, context.shape[2])),
    )
