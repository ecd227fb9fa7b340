"""Token-budget batches of whole sequences, and the shards of a collection.

The batch plan depends only on the corpus and the token budget, so a shard (a subset of
the plan's batches), a resumed collection and an uninterrupted one run the same batches
with the same shapes, and so see bit-identical activations.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from collectors.corpus import TokenizedCorpus
from collectors.errors import CollectError


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count`` (1-based): every ``count``-th batch of the plan."""

    index: int
    count: int

    @classmethod
    def parse(cls, spec: str) -> Shard:
        try:
            index_text, count_text = spec.split("/")
            index, count = int(index_text), int(count_text)
        except ValueError as exc:
            raise CollectError(f"--shard {spec!r}: expected i/n, for example 2/8") from exc
        if count < 1 or not 1 <= index <= count:
            raise CollectError(f"--shard {spec!r}: i must be between 1 and n (1/{max(count, 1)} .. "
                            f"{max(count, 1)}/{max(count, 1)})")  # fmt: skip
        return cls(index, count)

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def batches(self, n_batches: int) -> list[int]:
        """This shard's batch numbers. Batches are planned longest first, so taking every
        n-th one gives each shard about the same number of tokens."""
        return list(range(self.index - 1, n_batches, self.count))


WHOLE = Shard(1, 1)


@dataclass(frozen=True)
class Batch:
    """A padded batch of whole sequences (right padding); per-token arrays are flat
    [B*T] in row-major order."""

    sequences: np.ndarray  # [B] sequence indices
    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    positions: torch.Tensor  # [B*T] global corpus position, -1 on padding
    regions: torch.Tensor  # [B*T] region code, 0 on padding
    think_bins: torch.Tensor  # [B*T] thinking tenth, -1 outside thinking and on padding
    domains: torch.Tensor  # [B*T] domain code
    row_start: torch.Tensor  # [B*T] flat index of the row's first token
    row_end: torch.Tensor  # [B*T] flat index one past the row's last real token

    @property
    def n_tokens(self) -> int:
        return int(self.attention_mask.sum())


def plan_batches(lengths: np.ndarray, batch_tokens: int) -> list[np.ndarray]:
    """Length bucketing under a token budget: sequences sorted longest first, grouped so
    that rows x longest row <= ``batch_tokens`` (a longer sequence gets a batch alone)."""
    order = np.argsort(-lengths, kind="stable")
    batches: list[np.ndarray] = []
    current: list[int] = []
    for seq in order:
        width = int(lengths[current[0]]) if current else int(lengths[seq])
        if current and (len(current) + 1) * width > batch_tokens:
            batches.append(np.asarray(current))
            current = []
        current.append(int(seq))
    if current:
        batches.append(np.asarray(current))
    return batches


def make_batch(corpus: TokenizedCorpus, sequences: np.ndarray, device: torch.device) -> Batch:
    lengths = corpus.lengths()[sequences]
    width = int(lengths.max())
    n_rows = len(sequences)
    cols = np.arange(width)
    real = cols[None, :] < lengths[:, None]
    starts = corpus.offsets[sequences][:, None]
    positions = np.where(real, starts + cols[None, :], -1)
    safe = np.where(real, positions, 0)
    row_start = np.repeat(np.arange(n_rows) * width, width)

    def tensor(a: np.ndarray, dtype: torch.dtype = torch.int64) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(device=device, dtype=dtype)

    return Batch(
        sequences=sequences,
        input_ids=tensor(np.where(real, corpus.token_ids[safe], 0)),
        attention_mask=tensor(real),
        positions=tensor(positions.reshape(-1)),
        regions=tensor(np.where(real, corpus.regions[safe], 0).reshape(-1)),
        think_bins=tensor(np.where(real, corpus.think_bins[safe], -1).reshape(-1)),
        domains=tensor(np.repeat(corpus.domains[sequences], width)),
        row_start=tensor(row_start),
        row_end=tensor(row_start + np.repeat(lengths, width)),
    )
