"""Which features an intervention acts on: a selection by final label, and random
controls matched to it.

A selection is one or more groups of label conditions, ``category=reasoning,
subcategory=hesitation,mechanism=output``: a feature is selected when its final label
meets every condition of any group. A control draws, for each selected feature, an alive
unselected feature of the same layer and the same activation-frequency bin (the layer's
alive features cut into frequency deciles), so controls match the selection in number,
in per-layer counts and in how often their features fire.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import polars as pl

from labeler.errors import UserError
from labeler.reporting.final_labels import LABEL_FIELDS
from prompts import CATEGORIES, DOMAIN_TYPES, MECHANISMS, SUBCATEGORIES

ALLOWED = {"category": CATEGORIES, "subcategory": SUBCATEGORIES, "mechanism": MECHANISMS,
           "domain_type": DOMAIN_TYPES}  # fmt: skip
FREQUENCY_BINS = 10

Group = dict[str, str]
Feature = tuple[int, int]


def parse_group(spec: str) -> Group:
    """``FIELD=VALUE,FIELD=VALUE`` as conditions; a field or value outside the taxonomy is
    one clear error naming it."""
    group: Group = {}
    for part in (p.strip() for p in spec.split(",")):
        name, sep, value = part.partition("=")
        name, value = name.strip(), value.strip()
        if not sep or not name or not value:
            raise UserError(f"--select {spec!r}: expected FIELD=VALUE[,FIELD=VALUE...]")
        if name not in LABEL_FIELDS:
            raise UserError(f"--select {spec!r}: no label field {name!r}; the fields are "
                            f"{', '.join(LABEL_FIELDS)}")  # fmt: skip
        if value not in ALLOWED[name]:
            raise UserError(f"--select {spec!r}: {name} is one of {', '.join(ALLOWED[name])}, "
                            f"not {value!r}")  # fmt: skip
        group[name] = value
    return group


def select(final: pl.DataFrame, groups: Sequence[Group]) -> pl.DataFrame:
    """The final-label rows that meet every condition of any group, in layer and index
    order."""
    if not groups:
        raise ValueError("select: no group of conditions")
    matches = [pl.all_horizontal([pl.col(k) == v for k, v in g.items()]) for g in groups]
    return final.filter(pl.any_horizontal(matches)).sort("layer", "index")


def matched_controls(
    features: pl.DataFrame, selected: Sequence[Feature], k: int, seed: int = 0
) -> list[list[Feature]]:
    """``k`` random selections matched to ``selected``: per layer as many alive features
    not selected, each drawn from the frequency bin of a selected feature (a bin that
    runs out lends from its nearest bins)."""
    chosen = set(selected)
    alive = features.filter(pl.col("alive")).select("layer", "index", "frequency")
    pools: dict[int, list[list[Feature]]] = {}
    bin_of: dict[Feature, int] = {}
    for (layer,), part in alive.sort("layer", "frequency", "index").group_by(
        "layer", maintain_order=True
    ):
        rows = [(int(layer), int(i)) for i in part["index"]]  # type: ignore[call-overload]
        bins: list[list[Feature]] = [[] for _ in range(FREQUENCY_BINS)]
        for rank, feature in enumerate(rows):
            b = rank * FREQUENCY_BINS // len(rows)
            bin_of[feature] = b
            if feature not in chosen:
                bins[b].append(feature)
        pools[int(layer)] = bins  # type: ignore[call-overload]
    missing = [f for f in selected if f not in bin_of]
    if missing:
        raise ValueError(f"selected features not alive in the run: {missing[:3]}")
    rng = random.Random(seed)
    controls = []
    for _ in range(k):
        taken: set[Feature] = set()
        control: list[Feature] = []
        for feature in sorted(selected):
            control.append(_draw(pools[feature[0]], bin_of[feature], taken, rng, feature))
        controls.append(sorted(control))
    return controls


def _draw(bins: list[list[Feature]], home: int, taken: set[Feature], rng: random.Random,
          feature: Feature) -> Feature:  # fmt: skip
    for distance in range(FREQUENCY_BINS):
        for b in sorted({home - distance, home + distance}):
            if 0 <= b < FREQUENCY_BINS:
                free = [f for f in bins[b] if f not in taken]
                if free:
                    pick = rng.choice(free)
                    taken.add(pick)
                    return pick
    raise ValueError(f"layer {feature[0]}: too few unselected alive features to match")
