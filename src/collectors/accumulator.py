"""Running per-feature statistics and example reservoirs of one layer.

An update touches only the batch's nonzero activations: one pass over the layer's
features finds them, and every statistic is a scatter or a bincount over that list.
Everything stays on the device. Two accumulators of the same layer combine exactly
(integer counts, a fixed-point activation sum, max/min, and reservoirs ordered by a
total order), so shards and resumed runs reproduce an uninterrupted run bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

from collectors.batching import Batch
from collectors.reservoirs import (
    Reservoir,
    WindowGatherer,
    combine_reservoirs,
    hash_keys,
)
from collectors.run_format import REGIONS, THINK_BINS, CollectParams

# Activations are summed as integers in units of 2**-20, so sums do not depend on the
# order of addition; int64 leaves room for about 10**10 activations of size 1000.
FIXED_POINT_SCALE = float(2**20)


@dataclass(frozen=True)
class NegativeWindows:
    """The negative windows that fall in one batch: their numbers, and their tokens' flat
    indices into the batch [m, window] (-1 past a short window's end)."""

    window_ids: torch.Tensor
    flat_index: torch.Tensor


@dataclass
class LayerAccumulator:
    """Running statistics and reservoirs of one layer's units (features or neurons)."""

    layer: int
    units: torch.Tensor  # [F] unit index of each column
    top: Reservoir
    sample: Reservoir
    count: torch.Tensor  # [F] int64
    act_sum: torch.Tensor  # [F] int64, fixed point (FIXED_POINT_SCALE)
    act_max: torch.Tensor  # [F] float32
    act_min: torch.Tensor  # [F] float32, +inf before the first activation
    by_domain: torch.Tensor  # [D, F] int64
    by_region: torch.Tensor  # [R, F] int64
    by_think_bin: torch.Tensor  # [THINK_BINS, F] int64
    negatives: list[torch.Tensor] = field(default_factory=list)  # [m, 2] (window, column)

    @classmethod
    def create(
        cls,
        layer: int,
        units: torch.Tensor,
        n_domains: int,
        params: CollectParams,
        device: torch.device,
    ) -> LayerAccumulator:
        n = int(units.numel())
        window = params.context_before + params.context_after + 1

        def zeros(*shape: int) -> torch.Tensor:
            return torch.zeros(shape, dtype=torch.int64, device=device)

        return cls(
            layer=layer,
            units=units.to(device=device, dtype=torch.int64),
            top=Reservoir.empty(n, params.top_k, window, torch.float32, device),
            sample=Reservoir.empty(n, params.sample_size, window, torch.int64, device),
            count=zeros(n),
            act_sum=zeros(n),
            act_max=torch.zeros(n, dtype=torch.float32, device=device),
            act_min=torch.full((n,), float("inf"), dtype=torch.float32, device=device),
            by_domain=zeros(n_domains, n),
            by_region=zeros(len(REGIONS), n),
            by_think_bin=zeros(THINK_BINS, n),
        )

    @property
    def n_units(self) -> int:
        return int(self.units.numel())

    def update(
        self,
        features: torch.Tensor,
        batch: Batch,
        negatives: NegativeWindows | None,
        params: CollectParams,
    ) -> None:
        """Fold one batch's activations [B, T, F] of this layer in."""
        f = features.reshape(-1, features.shape[-1])
        flat, col = (f > 0).nonzero(as_tuple=True)
        real = batch.positions[flat] >= 0
        flat, col = flat[real], col[real]
        if flat.numel() == 0:
            return
        n = self.n_units
        act = f[flat, col].float()
        pos = batch.positions[flat]
        self.count += torch.bincount(col, minlength=n)
        self.act_sum.index_add_(0, col, torch.round(act.double() * FIXED_POINT_SCALE).long())
        self.act_max.scatter_reduce_(0, col, act, reduce="amax")
        self.act_min.scatter_reduce_(0, col, act, reduce="amin")
        self._count_by(self.by_region, batch.regions[flat], col)
        self._count_by(self.by_domain, batch.domains[flat], col)
        bins = batch.think_bins[flat]
        thinking = bins >= 0
        self._count_by(self.by_think_bin, bins[thinking], col[thinking])
        if negatives is not None:
            self._record_negatives(f, negatives)
        windows = WindowGatherer(
            f, batch.row_start, batch.row_end, params.context_before, params.context_after
        )
        self.top.merge(col, -act, act, pos, flat, windows)
        keys = hash_keys(params.seed, self.layer, pos, self.units[col])
        self.sample.merge(col, keys, act, pos, flat, windows)

    @staticmethod
    def _count_by(table: torch.Tensor, group: torch.Tensor, col: torch.Tensor) -> None:
        n_groups, n = table.shape
        table += torch.bincount(group * n + col, minlength=n_groups * n).view(n_groups, n)

    def _record_negatives(self, f: torch.Tensor, windows: NegativeWindows) -> None:
        """For each negative window in the batch, the units active anywhere in it."""
        idx = windows.flat_index
        hits = ((f[idx.clamp(min=0)] > 0) & (idx >= 0).unsqueeze(-1)).any(1)
        w, col = hits.nonzero(as_tuple=True)
        if w.numel():
            self.negatives.append(torch.stack([windows.window_ids[w], col], dim=1).cpu())

    def negative_pairs(self) -> torch.Tensor:
        """Every (window, column) pair seen, sorted and without repeats: [m, 2]."""
        if not self.negatives:
            return torch.zeros((0, 2), dtype=torch.int64)
        pairs: torch.Tensor = torch.unique(torch.cat(self.negatives), dim=0)
        return pairs

    def combine(self, other: LayerAccumulator) -> None:
        """Fold in another accumulator of the same layer (a shard of the same corpus)."""
        self.top = combine_reservoirs(self.top, other.top)
        self.sample = combine_reservoirs(self.sample, other.sample)
        self.count += other.count
        self.act_sum += other.act_sum
        self.act_max = torch.maximum(self.act_max, other.act_max)
        self.act_min = torch.minimum(self.act_min, other.act_min)
        self.by_domain += other.by_domain
        self.by_region += other.by_region
        self.by_think_bin += other.by_think_bin
        self.negatives = [self.negative_pairs(), other.negative_pairs()]

    # -- state files ---------------------------------------------------------------------

    def tensors(self) -> dict[str, torch.Tensor]:
        """Everything as named CPU tensors (for a state file)."""
        out: dict[str, torch.Tensor] = {"units": self.units, "negatives": self.negative_pairs()}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Reservoir):
                for part in ("key", "act", "pos", "context"):
                    out[f"{f.name}.{part}"] = getattr(value, part)
            elif isinstance(value, torch.Tensor):
                out[f.name] = value
        return {f"{self.layer}.{name}": t.detach().cpu().contiguous() for name, t in out.items()}

    @classmethod
    def from_tensors(
        cls, layer: int, tensors: dict[str, torch.Tensor], device: torch.device
    ) -> LayerAccumulator:
        def get(name: str) -> torch.Tensor:
            return tensors[f"{layer}.{name}"].to(device)

        def reservoir(name: str) -> Reservoir:
            return Reservoir(*(get(f"{name}.{part}") for part in ("key", "act", "pos", "context")))

        return cls(
            layer=layer,
            units=get("units"),
            top=reservoir("top"),
            sample=reservoir("sample"),
            count=get("count"),
            act_sum=get("act_sum"),
            act_max=get("act_max"),
            act_min=get("act_min"),
            by_domain=get("by_domain"),
            by_region=get("by_region"),
            by_think_bin=get("by_think_bin"),
            negatives=[tensors[f"{layer}.negatives"]],
        )
