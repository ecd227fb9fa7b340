"""Which features an intervention acts on: a selection by final label, and random
controls matched to it.

A selection is one or more groups of label conditions, ``category=reasoning,
subcategory=hesitation,mechanism=output``: a feature is selected when its final label
meets every condition of any group. A control draws, for each selected feature, an alive
unselected feature of the same layer and the same activation-frequency bin (the layer's
alive features cut into frequency deciles), so controls match the selection in number,
in per-layer counts and in how often their features fire.

Control selections are distinct sets: a draw that repeats an earlier set is drawn again.
Which decile each of a control's features comes from does not depend on the random
picks (a decile lends to the next only once it has run out), so the number of distinct
matched sets is the product, over layers and deciles, of "pool choose taken"; a pool
that holds fewer sets than asked gives every set it has, once. The sets come in one
seeded order, so ``k`` controls are the first ``k`` of any larger number.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations, product

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


@dataclass(frozen=True)
class ControlDraw:
    """Distinct control selections: ``controls`` (sorted feature lists), how many were
    ``asked`` for, and how many distinct matched sets the pool holds (``available``)."""

    controls: list[list[Feature]]
    asked: int
    available: int
    tightest: str = ""
    """Where the choices are, in words: the deciles a control chooses from."""

    @property
    def shortfall(self) -> str:
        """One line saying why fewer controls than asked were drawn; empty otherwise."""
        if len(self.controls) >= self.asked:
            return ""
        return (f"asked for {self.asked} controls, drew {len(self.controls)} distinct: only "
                f"{self.available} distinct matched control sets exist ({self.tightest}); "
                f"p-values are over the {len(self.controls)}")  # fmt: skip


Pools = dict[int, list[list[Feature]]]


def _pools(features: pl.DataFrame, selected: Sequence[Feature]) -> tuple[Pools, dict[Feature, int]]:
    """Per layer, the unselected alive features of each frequency decile; and each alive
    feature's decile."""
    chosen = set(selected)
    alive = features.filter(pl.col("alive")).select("layer", "index", "frequency")
    pools: Pools = {}
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
    return pools, bin_of


def _taken(
    pools: Pools, bin_of: dict[Feature, int], selected: Sequence[Feature]
) -> dict[tuple[int, int], int]:
    """How many features a control takes from each (layer, decile): what ``_draw`` does,
    on counts alone (its random picks never change which decile it takes from)."""
    left = {(layer, b): len(pool) for layer, bins in pools.items() for b, pool in enumerate(bins)}
    taken: dict[tuple[int, int], int] = {}
    for feature in sorted(selected):
        layer, home = feature[0], bin_of[feature]
        for b in _nearest_first(home):
            if left[layer, b]:
                left[layer, b] -= 1
                taken[layer, b] = taken.get((layer, b), 0) + 1
                break
        else:
            raise ValueError(f"layer {layer}: too few unselected alive features to match")
    return taken


def draw_controls(
    features: pl.DataFrame, selected: Sequence[Feature], k: int, seed: int = 0
) -> ControlDraw:
    """``k`` distinct random selections matched to ``selected`` (as many as exist when
    the pool holds fewer): per layer as many alive features not selected, each drawn
    from the frequency decile of a selected feature (a decile that runs out lends from
    its nearest deciles)."""
    pools, bin_of = _pools(features, selected)
    taken = _taken(pools, bin_of, selected)
    ways = {key: math.comb(len(pools[key[0]][key[1]]), n) for key, n in taken.items()}
    available = math.prod(ways.values())
    tightest = _why_so_few(pools, taken, ways)
    rng = random.Random(seed)
    target = min(k, available)
    controls: list[list[Feature]] = []
    seen: set[frozenset[Feature]] = set()
    tries = 0
    while len(controls) < target and (available > k or tries < 20 * target + 100):
        tries += 1
        chosen: set[Feature] = set()
        control = sorted(_draw(pools[f[0]], bin_of[f], chosen, rng, f) for f in sorted(selected))
        if frozenset(control) not in seen:  # a repeated set is drawn again
            seen.add(frozenset(control))
            controls.append(control)
    if len(controls) < target:  # the last sets of a small pool, rarely drawn: in seeded order
        parts = [list(combinations(pools[la][b], n)) for (la, b), n in sorted(taken.items())]
        rest = [sorted(f for part in choice for f in part) for choice in product(*parts)]
        rest = [c for c in rest if frozenset(c) not in seen]
        rng.shuffle(rest)
        controls += rest[: target - len(controls)]
    return ControlDraw(controls, k, available, tightest)


def _why_so_few(
    pools: Pools, taken: dict[tuple[int, int], int], ways: dict[tuple[int, int], int]
) -> str:
    """The deciles that leave a choice (fewest ways first, at most three), in words."""
    choices = sorted((w, key) for key, w in ways.items() if w > 1)
    if not choices:
        return "every decile a control draws from is taken whole"
    named = [f"{taken[la, b]} of the {len(pools[la][b])} unselected alive features of layer "
             f"{la}'s frequency decile {b + 1} of {FREQUENCY_BINS}"
             for _, (la, b) in choices[:3]]  # fmt: skip
    more = f" and {len(choices) - 3} more deciles" if len(choices) > 3 else ""
    whole = "; the other deciles are taken whole" if len(choices) < len(ways) else ""
    return f"choosing {' and '.join(named)}{more}{whole}"


def matched_controls(
    features: pl.DataFrame, selected: Sequence[Feature], k: int, seed: int = 0
) -> list[list[Feature]]:
    """``draw_controls``' selections alone: ``k`` distinct ones, or every one there is."""
    return draw_controls(features, selected, k, seed).controls


def _nearest_first(home: int) -> list[int]:
    """The deciles in the order a selected feature of decile ``home`` takes from them."""
    order = []
    for distance in range(FREQUENCY_BINS):
        for b in sorted({home - distance, home + distance}):
            if 0 <= b < FREQUENCY_BINS:
                order.append(b)
    return order


def _draw(bins: list[list[Feature]], home: int, taken: set[Feature], rng: random.Random,
          feature: Feature) -> Feature:  # fmt: skip
    for b in _nearest_first(home):
        free = [f for f in bins[b] if f not in taken]
        if free:
            pick = rng.choice(free)
            taken.add(pick)
            return pick
    raise ValueError(f"layer {feature[0]}: too few unselected alive features to match")
