"""The order examples are kept in, in a run folder and in the catalog.

Polars only, so readers of a run (the catalog export) need not load the collector.
"""

from __future__ import annotations

import polars as pl

KIND_ORDER = {"top": 0, "random": 1, "quantile": 2}


def example_order(frame: pl.DataFrame) -> pl.Series:
    """The row order that groups examples by feature (layer, index) and, within one, puts
    top examples first, then random ones, then quantile samples from the highest quantile
    down, each by rank."""
    keys = frame.select(
        "layer",
        "index",
        pl.col("kind").replace_strict(KIND_ORDER, default=len(KIND_ORDER)).alias("order"),
        pl.col("quantile").fill_null(0).alias("quantile"),
        "rank",
    ).with_row_index("row")
    return keys.sort("layer", "index", "order", "quantile", "rank",
                     descending=[False, False, False, True, False])["row"]  # fmt: skip


def sort_examples(frame: pl.DataFrame) -> pl.DataFrame:
    """Examples in ``example_order`` (the order readers of a run folder find them in)."""
    order = example_order(frame)
    return frame if _is_identity(order) else frame[order]


def _is_identity(order: pl.Series) -> bool:
    return bool((order == pl.int_range(len(order), dtype=pl.UInt32, eager=True)).all())
