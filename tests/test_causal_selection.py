"""Selecting features by final label, and random controls matched to a selection in
number, per-layer counts and activation frequency."""

from __future__ import annotations

import math
import random
import statistics

import polars as pl
import pytest

from labeler.causal.selection import draw_controls, matched_controls, parse_group, select
from labeler.errors import UserError


def _features(n_layers: int = 3, width: int = 400, seed: int = 0) -> pl.DataFrame:
    rng = random.Random(seed)
    rows = [
        {"layer": layer, "index": i, "alive": rng.random() > 0.1,
         "frequency": math.exp(rng.uniform(math.log(1e-5), math.log(1e-1)))}
        for layer in range(n_layers) for i in range(width)
    ]  # fmt: skip
    return pl.DataFrame(rows)


def test_groups_are_parsed_and_bad_fields_or_values_named() -> None:
    assert parse_group("category=reasoning, subcategory=hesitation,mechanism=output") == {
        "category": "reasoning", "subcategory": "hesitation", "mechanism": "output",
    }  # fmt: skip
    with pytest.raises(UserError, match="no label field 'colour'"):
        parse_group("colour=red")
    with pytest.raises(UserError, match="mechanism is one of output, input_simple"):
        parse_group("mechanism=outputs")
    with pytest.raises(UserError, match="expected FIELD=VALUE"):
        parse_group("category")


def test_a_feature_is_selected_when_it_meets_every_condition_of_any_group() -> None:
    final = pl.DataFrame({
        "feature_id": ["a", "b", "c", "d"], "layer": [0, 0, 1, 2], "index": [1, 2, 3, 4],
        "category": ["reasoning", "reasoning", "reasoning", "domain"],
        "subcategory": ["hesitation", "hesitation", "planning", None],
        "mechanism": ["output", "input_simple", "output", None],
        "domain_type": [None, None, None, "math"],
    })  # fmt: skip
    output = parse_group("category=reasoning,subcategory=hesitation,mechanism=output")
    math_ = parse_group("domain_type=math")
    assert select(final, [output])["feature_id"].to_list() == ["a"]
    assert select(final, [output, math_])["feature_id"].to_list() == ["a", "d"]


def test_controls_match_the_selection_per_layer_and_in_frequency() -> None:
    features = _features()
    alive = features.filter(pl.col("alive"))
    # a selection of rarely firing features, more of them in layer 2
    rare = alive.sort("frequency").group_by("layer", maintain_order=True).head(30)
    selected = [(int(la), int(i)) for la, i in zip(rare["layer"], rare["index"], strict=True)
                if la == 2 or i % 2 == 0]  # fmt: skip
    controls = matched_controls(features, selected, k=5, seed=1)
    assert len(controls) == 5
    per_layer = {la: sum(1 for f in selected if f[0] == la) for la in range(3)}
    frequency = {(int(la), int(i)): float(f) for la, i, f in alive.select(
        "layer", "index", "frequency").iter_rows()}  # fmt: skip
    chosen = set(selected)
    for control in controls:
        assert len(control) == len(set(control)) == len(selected)
        assert not chosen & set(control)
        assert {la: sum(1 for f in control if f[0] == la) for la in range(3)} == per_layer
        assert all(f in frequency for f in control)  # alive ones only
        picked = statistics.median(math.log10(frequency[f]) for f in control)
        target = statistics.median(math.log10(frequency[f]) for f in selected)
        everyone = statistics.median(math.log10(f) for f in frequency.values())
        assert abs(picked - target) < 0.5 < abs(everyone - target)
    assert controls[0] != controls[1]
    assert matched_controls(features, selected, k=5, seed=1) == controls  # seeded


def test_a_selection_too_large_to_match_is_refused() -> None:
    features = _features(n_layers=1, width=20).with_columns(
        pl.when(pl.col("index") == 0).then(False).otherwise(pl.col("alive")).alias("alive")
    )
    alive = features.filter(pl.col("alive"))
    everyone = [(0, int(i)) for i in alive["index"]]
    with pytest.raises(ValueError, match="too few unselected alive features"):
        matched_controls(features, everyone, k=1)
    with pytest.raises(ValueError, match="not alive"):
        matched_controls(features, [(0, 0)], k=1)


def _graded_layers(n_layers: int, width: int) -> pl.DataFrame:
    """Every feature alive, each layer's frequencies all different: a layer of ``width``
    features has frequency deciles of ``width / 10`` features."""
    rows = [{"layer": layer, "index": i, "alive": True, "frequency": (i + 1) / (width + 1)}
            for layer in range(n_layers) for i in range(width)]  # fmt: skip
    return pl.DataFrame(rows)


def test_controls_are_distinct_sets_and_a_small_pool_gives_what_it_has() -> None:
    """Deciles of 3 features: one selected feature per layer leaves 2 matched choices in
    each of 2 layers, so 4 distinct control sets exist; asked for 9, the draw gives the
    4, each once, and says that 4 exist."""
    features = _graded_layers(n_layers=2, width=30)
    selected = [(0, 13), (1, 22)]  # deciles 4 and 7
    draw = draw_controls(features, selected, k=9, seed=0)
    assert draw.asked == 9 and draw.available == 4
    assert sorted(draw.controls) == [
        [(0, 12), (1, 21)], [(0, 12), (1, 23)], [(0, 14), (1, 21)], [(0, 14), (1, 23)]
    ]  # fmt: skip
    assert draw.shortfall == (
        "asked for 9 controls, drew 4 distinct: only 4 distinct matched control sets exist "
        "(choosing 1 of the 2 unselected alive features of layer 0's frequency decile 5 of 10 "
        "and 1 of the 2 unselected alive features of layer 1's frequency decile 8 of 10); "
        "p-values are over the 4"
    )
    fewer = draw_controls(features, selected, k=3, seed=0)
    assert fewer.available == 4 and len(fewer.controls) == 3 and fewer.shortfall == ""
    assert len({frozenset(c) for c in fewer.controls}) == 3
    assert matched_controls(features, selected, k=9) == draw.controls
    # drawn in one seeded order, so fewer controls are the first of more (a study asked
    # for more controls keeps those it measured)
    for k in (1, 2, 3):
        assert draw_controls(features, selected, k=k, seed=0).controls == draw.controls[:k]
    large = _features()
    some = [
        (0, int(i)) for i in large.filter(pl.col("alive") & (pl.col("layer") == 0))["index"][:4]
    ]
    many = draw_controls(large, some, k=12, seed=5).controls
    assert draw_controls(large, some, k=5, seed=5).controls == many[:5]


def test_many_controls_from_a_large_pool_never_repeat_a_set() -> None:
    features = _features()
    alive = features.filter(pl.col("alive"))
    selected = [(int(la), int(i)) for la, i in alive.select("layer", "index").head(3).rows()]
    draw = draw_controls(features, selected, k=60, seed=2)
    assert len(draw.controls) == 60 and draw.shortfall == ""
    assert len({frozenset(c) for c in draw.controls}) == 60
    assert draw.available > 60
