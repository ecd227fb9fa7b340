"""A feature's activation distribution, estimated from its random examples (a uniform
sample of the tokens where it fires): percentiles and an equal-bin histogram, as the
circuit-tracer viewer's feature files and the feature page show it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PERCENTILES = 100
HISTOGRAM_BINS = 32


@dataclass(frozen=True)
class Spread:
    """A feature's activation distribution as the viewer's histogram shows it."""

    quantile_values: list[float]
    histogram: list[float]


def activation_spread(sample: list[float], act_min: float, act_max: float, count: int) -> Spread:
    """Percentiles 1..100 and a histogram of a feature's activations on the tokens where it
    fires, estimated from ``sample`` (its random examples: a uniform sample of those tokens).

    The histogram has HISTOGRAM_BINS equal bins over [act_min, act_max] (how the viewer draws
    it), each the estimated number of activating tokens, so the bins sum to ``count``. The
    100th percentile is ``act_max`` itself. Without a sample both lists are empty."""
    if not sample:
        return Spread([], [])
    values = np.clip(np.asarray(sample, dtype=np.float64), act_min, act_max)
    percentiles = np.quantile(values, np.arange(1, PERCENTILES + 1) / PERCENTILES)
    percentiles[-1] = act_max
    percentiles = np.maximum.accumulate(percentiles)
    span = act_max - act_min
    if span > 0:
        bins = np.minimum(((values - act_min) / span * HISTOGRAM_BINS).astype(np.int64),
                          HISTOGRAM_BINS - 1)  # fmt: skip
    else:
        bins = np.zeros(len(values), dtype=np.int64)
    heights = np.bincount(bins, minlength=HISTOGRAM_BINS) * (count / len(values))
    return Spread(
        [float(np.float32(v)) for v in percentiles], [round(float(h), 3) for h in heights]
    )
