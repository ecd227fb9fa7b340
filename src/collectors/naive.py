"""A straightforward reference collector: one sequence per forward pass, and a Python loop
over every nonzero activation, as the paper's own collection code does.

It exists to check the vectorized collector (the tests compare the two) and to measure
how much faster that one is (benchmarks/bench_collect.py). It keeps the same statistics
and the same examples: the top ``k`` by activation (ties by earlier position), the
``sample_size`` activations with the smallest seeded hash key (ties by position), each
with its context window.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

import numpy as np
import torch

from collectors.corpus import TokenizedCorpus
from collectors.reservoirs import hash_keys
from collectors.run_format import REGIONS, THINK_BINS, CollectParams
from collectors.source import FeatureSource


@dataclass(order=True)
class NaiveExample:
    """A kept example; ordering puts the one to evict first."""

    sort_key: tuple[float, int]
    activation: float = field(compare=False)
    position: int = field(compare=False)
    context: np.ndarray = field(compare=False, repr=False)


@dataclass
class NaiveLayer:
    n: int
    n_domains: int
    count: np.ndarray = field(init=False)
    act_sum: np.ndarray = field(init=False)
    act_max: np.ndarray = field(init=False)
    act_min: np.ndarray = field(init=False)
    by_domain: np.ndarray = field(init=False)
    by_region: np.ndarray = field(init=False)
    by_think_bin: np.ndarray = field(init=False)
    top: list[list[NaiveExample]] = field(init=False)
    sample: list[list[NaiveExample]] = field(init=False)

    def __post_init__(self) -> None:
        self.count = np.zeros(self.n, dtype=np.int64)
        self.act_sum = np.zeros(self.n, dtype=np.float64)
        self.act_max = np.zeros(self.n, dtype=np.float32)
        self.act_min = np.full(self.n, np.inf, dtype=np.float32)
        self.by_domain = np.zeros((self.n_domains, self.n), dtype=np.int64)
        self.by_region = np.zeros((len(REGIONS), self.n), dtype=np.int64)
        self.by_think_bin = np.zeros((THINK_BINS, self.n), dtype=np.int64)
        self.top = [[] for _ in range(self.n)]
        self.sample = [[] for _ in range(self.n)]


def _keep(heap: list[NaiveExample], k: int, item: NaiveExample) -> None:
    """Keep the ``k`` items with the largest ``sort_key`` in a min-heap."""
    if len(heap) < k:
        heapq.heappush(heap, item)
    elif item.sort_key > heap[0].sort_key:
        heapq.heapreplace(heap, item)


def naive_collect(
    source: FeatureSource, corpus: TokenizedCorpus, params: CollectParams, layers: list[int]
) -> dict[int, NaiveLayer]:
    out = {
        layer: NaiveLayer(int(source.units(layer).numel()), len(corpus.domain_names))
        for layer in layers
    }
    units = {layer: source.units(layer).cpu() for layer in layers}
    before, after = params.context_before, params.context_after
    captured: dict[int, torch.Tensor] = {}

    def sink(layer: int, features: torch.Tensor) -> None:
        captured[layer] = features[0].float().cpu()

    for s in range(corpus.n_sequences):
        start = int(corpus.offsets[s])
        ids = torch.from_numpy(corpus.sequence(s)).unsqueeze(0).to(source.device)
        with torch.no_grad(), source.recording(layers, sink):
            source.model.get_decoder()(input_ids=ids, use_cache=False)
        domain = int(corpus.domains[s])
        for layer in layers:
            acc, feats = out[layer], captured[layer].numpy()
            length = feats.shape[0]
            ts, fs = np.nonzero(feats > 0)
            keys = hash_keys(
                params.seed, layer, torch.from_numpy(ts + start), units[layer][fs]
            ).numpy()
            for t, f, key in zip(ts.tolist(), fs.tolist(), keys.tolist(), strict=True):
                a = float(feats[t, f])
                pos = start + t
                acc.count[f] += 1
                acc.act_sum[f] += a
                acc.act_max[f] = max(acc.act_max[f], a)
                acc.act_min[f] = min(acc.act_min[f], a)
                acc.by_domain[domain, f] += 1
                acc.by_region[corpus.regions[pos], f] += 1
                if corpus.think_bins[pos] >= 0:
                    acc.by_think_bin[corpus.think_bins[pos], f] += 1
                window = np.zeros(before + after + 1, dtype=np.float32)
                lo, hi = max(t - before, 0), min(t + after + 1, length)
                window[lo - (t - before) : hi - (t - before)] = feats[lo:hi, f]
                _keep(acc.top[f], params.top_k, NaiveExample((a, -pos), a, pos, window))
                _keep(acc.sample[f], params.sample_size, NaiveExample((-key, -pos), a, pos, window))
    for acc in out.values():
        for heaps in (acc.top, acc.sample):
            for i, heap in enumerate(heaps):
                heaps[i] = sorted(heap, reverse=True)
    return out
