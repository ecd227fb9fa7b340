"""The order of feature ids (``L{layer}F{index}``) wherever a person reads a list of
them: by layer, then by index, both as numbers, so L0F52 comes before L0F144 and L2F0
before L10F0. An id of another form sorts after every well-formed one, by its text."""

from __future__ import annotations

import re

import polars as pl

FEATURE_ID_PATTERN = r"^L(\d+)F(\d+)$"
_FEATURE_ID = re.compile(FEATURE_ID_PATTERN)
_LAST = 2**63 - 1
"""Layer and index given to an id of another form: after every real one."""


def feature_sort_key(feature_id: str) -> tuple[int, int, str]:
    """Sort key of one id: ``sorted(ids, key=feature_sort_key)``."""
    match = _FEATURE_ID.match(feature_id)
    if match is None:
        return _LAST, _LAST, feature_id
    return int(match[1]), int(match[2]), ""


def feature_order(column: str = "feature_id") -> list[pl.Expr]:
    """The same order as polars sort keys: ``frame.sort(feature_order())``, or after other
    keys, ``frame.sort([pl.col("score"), *feature_order()], descending=[True, False,
    False, False])``."""
    parts = [
        pl.col(column).str.extract(FEATURE_ID_PATTERN, group).cast(pl.Int64, strict=False)
        for group in (1, 2)
    ]
    well_formed = parts[0].is_not_null()
    return [
        parts[0].fill_null(_LAST),
        parts[1].fill_null(_LAST),
        pl.when(well_formed).then(pl.lit("")).otherwise(pl.col(column)),
    ]
