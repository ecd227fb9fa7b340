"""What to label: the planned features and, per feature, the detection negatives."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from labeler.judges.scorers import INTRUDER_TRIALS
from labeler.run.data import RunData
from labeler.run.schemas import FeatureRecord, Snippet

N_NEGATIVES = 5
RECORD_CHUNK = 128
WORK_BLOCK = 32
"""At most this many consecutive features of a layer are labeled together (their records
lie close together in the examples file, and are read together)."""
MIN_BLOCKS = 16
"""Each layer is cut into at least this many blocks, so that a labeling stopped early
has labeled each layer in proportion to within a sixteenth of it."""


def plan_features(
    run: RunData, sample_per_layer: int | None, seed: int
) -> list[tuple[str, int, int]]:
    """All alive features, or ``sample_per_layer`` of them per layer uniformly at random
    (seeded, so a re-run plans the same sample)."""
    return select_features(run, [], sample_per_layer, seed).features


@dataclass(frozen=True)
class Selection:
    """What one labeling asked for: ``features`` (in layer and index order), of which
    ``added`` were not in the stored plan before it."""

    features: list[tuple[str, int, int]]
    added: list[tuple[str, int, int]]

    def added_by_layer(self) -> dict[int, int]:
        counts: dict[int, int] = {}
        for _, layer, _ in self.added:
            counts[layer] = counts.get(layer, 0) + 1
        return counts


def select_features(
    run: RunData, stored: list[tuple[str, int, int]], sample_per_layer: int | None, seed: int
) -> Selection:
    """The features one labeling asks for, given the run's stored plan.

    Without ``sample_per_layer``: every alive feature. With it, per layer: a seeded
    uniform sample of that size from the layer's stored plan when it holds that many (a
    smaller labeling never pays for more than it asked, whatever earlier labelings
    planned), else the stored plan extended by a seeded uniform sample of the layer's
    other alive features up to that size. A sample drawn from a plan that holds every
    alive feature is the sample drawn from the alive features, and a labeling asked
    again selects the same features, so a re-run resumes what it started."""
    alive = run.alive().select("feature_id", "layer", "index").sort("layer", "index")
    by_layer: dict[int, set[str]] = {}
    for fid, layer, _ in stored:
        by_layer.setdefault(layer, set()).add(fid)
    features: list[tuple[str, int, int]] = []
    added: list[tuple[str, int, int]] = []
    for (layer,), group in alive.group_by("layer", maintain_order=True):
        rows = [(str(f), int(la), int(i)) for f, la, i in group.rows()]
        key = int(str(layer))
        have = by_layer.get(key, set())
        in_plan = [r for r in rows if r[0] in have]
        if sample_per_layer is None or sample_per_layer >= len(rows):
            chosen = rows
        elif len(in_plan) >= sample_per_layer:
            chosen = _sample(in_plan, sample_per_layer, [seed, key])
        else:
            rest = [r for r in rows if r[0] not in have]
            extend_seed = [seed, key, len(in_plan)] if in_plan else [seed, key]
            more = _sample(rest, sample_per_layer - len(in_plan), extend_seed)
            chosen = sorted(in_plan + more, key=lambda r: r[2])
        features.extend(chosen)
        added.extend(r for r in chosen if r[0] not in have)
    return Selection(features, added)


def _sample(
    rows: list[tuple[str, int, int]], size: int, seed: list[int]
) -> list[tuple[str, int, int]]:
    """``size`` of ``rows`` uniformly at random, in their order (seeded); a seed of
    ``[seed, layer]`` over every alive feature of a layer gives the sample planned on a
    run with no plan yet."""
    if size >= len(rows):
        return rows
    pick = np.sort(np.random.default_rng(seed).choice(len(rows), size=size, replace=False))
    return [rows[i] for i in pick]


def work_order(features: list[tuple[str, int, int]], seed: int) -> list[str]:
    """The planned features in the order to label them, so that wherever a labeling
    stops (its budget spent, Ctrl-C) what it labeled is spread over the layers in
    proportion to what each has planned, and over each layer's features.

    Each layer's features, in index order, are cut into blocks of consecutive features
    (``WORK_BLOCK`` at most, and at least ``MIN_BLOCKS`` blocks a layer) taken in a
    seeded random order; the layers' blocks are interleaved so that after any number of
    blocks each layer has had its share, to within one block. A block's records are read
    together, so a chunk of records spans a few short runs of the examples file rather
    than every layer's whole span. The order depends only on the plan and the seed: a
    re-run with the same seed goes through the features left in the same order."""
    by_layer: dict[int, list[str]] = {}
    for fid, layer, _ in features:
        by_layer.setdefault(layer, []).append(fid)
    keyed: list[tuple[float, int, list[str]]] = []
    for layer, fids in by_layer.items():
        size = max(1, min(WORK_BLOCK, len(fids) // MIN_BLOCKS))
        blocks = [fids[i : i + size] for i in range(0, len(fids), size)]
        order = np.random.default_rng([seed, layer]).permutation(len(blocks))
        keyed.extend(
            ((k + 0.5) / len(blocks), layer, blocks[b]) for k, b in enumerate(order.tolist())
        )
    keyed.sort(key=lambda t: (t[0], t[1]))
    return [fid for _, _, block in keyed for fid in block]


def negatives_for(
    run: RunData, record: FeatureRecord, seed: int, scorers: tuple[str, ...] = ()
) -> dict[str, list[Snippet]]:
    """Corpus windows checked not to activate the feature, per detection set, and the
    intruder trials' intruders (under ``intruder``) when that scorer is asked for."""
    out = {
        kind: run.negative_snippets(record, N_NEGATIVES, seed + offset)
        for offset, kind in enumerate(("top", "random"))
    }
    if "intruder" in scorers:
        out["intruder"] = run.negative_snippets(record, INTRUDER_TRIALS, seed + 2)
    return out


def records_of(
    run: RunData, todo: list[tuple[str, str]], chunk: int = RECORD_CHUNK
) -> Iterator[tuple[str, str, FeatureRecord]]:
    """(feature, judge, record) for each pair, reading the records a chunk at a time."""
    n_judges = max(1, len({j for _, j in todo}))
    for start in range(0, len(todo), chunk * n_judges):
        part = todo[start : start + chunk * n_judges]
        fids = list(dict.fromkeys(f for f, _ in part))
        records = {r.feature_id: r for r in run.records(fids)}
        for fid, judge in part:
            yield fid, judge, records[fid]
