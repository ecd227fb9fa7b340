"""Feature ids sort by layer, then index, as numbers, in Python and in polars alike."""

from __future__ import annotations

import random

import polars as pl

from labeler.run.feature_ids import feature_order, feature_sort_key

NUMERIC = ["L0F0", "L0F9", "L0F52", "L0F144", "L0F1000", "L2F3", "L10F0", "L10F7", "L27F8191"]


def test_ids_sort_by_layer_then_index_as_numbers() -> None:
    shuffled = random.Random(0).sample(NUMERIC, len(NUMERIC))
    assert sorted(shuffled, key=feature_sort_key) == NUMERIC
    assert sorted(NUMERIC) != NUMERIC  # text order is the wrong one: L0F144 before L0F52
    frame = pl.DataFrame({"feature_id": shuffled, "n": range(len(shuffled))})
    assert frame.sort(feature_order())["feature_id"].to_list() == NUMERIC


def test_ids_of_another_form_come_last_by_their_text_in_both() -> None:
    ids = ["unit2", "L1F1", "f10", "L0F2", "L1Fx", "L0F10"]
    expected = ["L0F2", "L0F10", "L1F1", "L1Fx", "f10", "unit2"]
    assert sorted(ids, key=feature_sort_key) == expected
    frame = pl.DataFrame({"id": ids})
    assert frame.sort(feature_order("id"))["id"].to_list() == expected


def test_the_order_can_follow_another_key() -> None:
    frame = pl.DataFrame({"feature_id": ["L0F52", "L0F144", "L1F3", "L0F9"],
                          "score": [0.25, 0.25, 0.5, 0.25]})  # fmt: skip
    keys = [pl.col("score"), *feature_order()]
    ordered = frame.sort(keys, descending=[True, False, False, False])
    assert ordered["feature_id"].to_list() == ["L1F3", "L0F9", "L0F52", "L0F144"]
