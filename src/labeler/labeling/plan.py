"""What to label: the planned features and, per feature, the detection negatives."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from labeler.run.data import RunData
from labeler.run.schemas import FeatureRecord, Snippet

N_NEGATIVES = 5
RECORD_CHUNK = 128


def plan_features(
    run: RunData, sample_per_layer: int | None, seed: int
) -> list[tuple[str, int, int]]:
    """All alive features, or ``sample_per_layer`` of them per layer uniformly at random
    (seeded, so a re-run plans the same sample)."""
    alive = run.alive().select("feature_id", "layer", "index").sort("layer", "index")
    planned: list[tuple[str, int, int]] = []
    for (layer,), group in alive.group_by("layer", maintain_order=True):
        rows = group.rows()
        if sample_per_layer is not None and sample_per_layer < len(rows):
            rng = np.random.default_rng([seed, int(str(layer))])
            pick = np.sort(rng.choice(len(rows), size=sample_per_layer, replace=False))
            rows = [rows[i] for i in pick]
        planned.extend((str(f), int(la), int(i)) for f, la, i in rows)
    return planned


def negatives_for(run: RunData, record: FeatureRecord, seed: int) -> dict[str, list[Snippet]]:
    """Corpus windows checked not to activate the feature, per detection set."""
    return {
        kind: run.negative_snippets(record, N_NEGATIVES, seed + offset)
        for offset, kind in enumerate(("top", "random"))
    }


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
