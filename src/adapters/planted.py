"""Planting features with a known meaning into a transcoder adapter.

Given the MLP inputs ``X`` [n_tokens, d_model] a layer sees on a corpus and the token at
each position, a *token-set* feature gets an encoder direction pointing at the centroids
of its trigger tokens and a bias at the threshold that best separates those positions
from the rest, so it fires on the trigger tokens and (almost) nowhere else. Its measured
precision and recall on the corpus go into the ground truth. A *circuit* feature reads
both its trigger tokens and a direction an earlier feature writes there.
*Random-direction* features fire on whatever projects highest on a random direction;
*dead* features never fire.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class PlantedEncoder:
    weight: np.ndarray  # [d_model]
    bias: float
    precision: float
    recall: float
    fire_rate: float


def _best_threshold(scores: np.ndarray, positive: np.ndarray) -> float:
    """A threshold separating positive from negative scores: halfway between the classes
    when they separate, else the one maximizing (true positives - false positives)."""
    lowest_positive = scores[positive].min()
    highest_negative = scores[~positive].max() if (~positive).any() else lowest_positive - 1.0
    if highest_negative < lowest_positive:
        return float((lowest_positive + highest_negative) / 2)
    order = np.argsort(-scores, kind="stable")
    sorted_scores = scores[order]
    gain = np.cumsum(np.where(positive[order], 1, -1))
    best = int(np.argmax(gain))
    upper = sorted_scores[best]
    lower = sorted_scores[best + 1] if best + 1 < len(sorted_scores) else upper - 1.0
    return float((upper + lower) / 2)


def token_centroids(x: np.ndarray, tokens: np.ndarray, vocab_size: int) -> np.ndarray:
    """Per token id, the mean MLP input at its positions minus the overall mean [V, d]."""
    sums = np.zeros((vocab_size, x.shape[1]))
    np.add.at(sums, tokens, x)
    counts = np.bincount(tokens, minlength=vocab_size)[:, None]
    centroids: np.ndarray = np.where(counts > 0, sums / np.maximum(counts, 1), 0.0)
    centroids -= x.mean(axis=0)
    return centroids


def _encoder(
    direction: np.ndarray, threshold: float, x: np.ndarray, positive: np.ndarray, amplitude: float
) -> PlantedEncoder:
    scores = x @ direction
    fires = scores > threshold
    mean_excess = float((scores[fires] - threshold).mean()) if fires.any() else 1.0
    scale = amplitude / max(mean_excess, 1e-6)
    n_fire = int(fires.sum())
    true_pos = int((fires & positive).sum())
    return PlantedEncoder(
        weight=direction * scale,
        bias=-threshold * scale,
        precision=true_pos / n_fire if n_fire else 0.0,
        recall=true_pos / int(positive.sum()) if positive.any() else 0.0,
        fire_rate=n_fire / len(scores),
    )


def token_set_encoder(
    x: np.ndarray,
    tokens: np.ndarray,
    centroids: np.ndarray,
    trigger_ids: np.ndarray,
    amplitude: float,
) -> PlantedEncoder:
    """An encoder row that fires on the positions whose token is in ``trigger_ids``
    (``centroids`` from ``token_centroids``)."""
    positive = np.isin(tokens, trigger_ids)
    if not positive.any():
        raise ValueError("none of the trigger tokens occurs in the corpus")
    present = np.unique(tokens[positive])
    rows = centroids[present]
    direction = (rows / np.linalg.norm(rows, axis=1, keepdims=True)).sum(axis=0)
    direction /= np.linalg.norm(direction)
    threshold = _best_threshold(x @ direction, positive)
    return _encoder(direction, threshold, x, positive, amplitude)


def circuit_encoder(
    x: np.ndarray, tokens: np.ndarray, centroids: np.ndarray, trigger_ids: np.ndarray,
    circuit: np.ndarray, amplitude: float, boost: float,
) -> PlantedEncoder:  # fmt: skip
    """An encoder row that fires on the trigger tokens by itself, and ``1 + boost`` times
    as strongly where an earlier layer has written ``circuit`` there: it reads the
    triggers' centroid direction (``circuit`` projected out) with the threshold that best
    separates them, plus the circuit direction."""
    positive = np.isin(tokens, trigger_ids)
    if not positive.any():
        raise ValueError("none of the trigger tokens occurs in the corpus")
    unit = _unit(circuit)
    own = centroids[np.unique(tokens[positive])].mean(axis=0)
    own = _unit(own - (own @ unit) * unit)
    scores = x @ own
    threshold = _best_threshold(scores, positive)
    alone = float((scores[positive] - threshold).mean())
    written = float((x[positive] @ unit).mean())
    weight = own + (boost * alone / written if written > 0 else 0.0) * unit
    return _encoder(weight, threshold, x, positive, amplitude)


def random_direction_encoder(
    x: np.ndarray, rng: np.random.Generator, fire_rate: float, amplitude: float,
    avoid: np.ndarray | None = None,
) -> PlantedEncoder:  # fmt: skip
    """A random direction that fires on the top ``fire_rate`` share of positions, made
    orthogonal to the orthonormal rows of ``avoid`` (directions that other features
    write, which would pile positions up at one score)."""
    direction = rng.standard_normal((x.shape[1],))
    if avoid is not None:
        direction -= avoid.T @ (avoid @ direction)
    direction = _unit(direction)
    threshold = float(np.quantile(x @ direction, 1.0 - fire_rate))
    return _encoder(direction, threshold, x, np.zeros(len(x), dtype=bool), amplitude)


def dead_encoder(x: np.ndarray, rng: np.random.Generator) -> PlantedEncoder:
    """A direction whose bias keeps it below zero on every position, with a wide margin."""
    direction = _unit(rng.standard_normal(x.shape[1]))
    threshold = float((x @ direction).max()) * 2 + 10.0
    return PlantedEncoder(direction, -threshold, 0.0, 0.0, 0.0)


def random_decoder(d_model: int, rng: np.random.Generator, norm: float) -> np.ndarray:
    return norm * _unit(rng.standard_normal(d_model))


def _unit(v: Any) -> np.ndarray:
    out: np.ndarray = v / np.linalg.norm(v)
    return out
