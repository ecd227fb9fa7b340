"""Reading a collected run folder into the records judges look at."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import polars as pl

from collectors.run_format import (
    EXAMPLES,
    FEATURES,
    NEGATIVES,
    REGIONS,
    RunInfo,
    read_run_info,
)
from labeler.run.schemas import Example, FeatureRecord, Snippet


@dataclass
class RunData:
    """A validated run folder; tables are read when first needed."""

    folder: Path
    info: RunInfo

    @classmethod
    def open(cls, folder: Path) -> RunData:
        return cls(folder=folder, info=read_run_info(folder))

    @cached_property
    def features(self) -> pl.DataFrame:
        return pl.read_parquet(self.folder / FEATURES)

    @cached_property
    def negatives(self) -> pl.DataFrame:
        return pl.read_parquet(self.folder / NEGATIVES)

    def alive(self) -> pl.DataFrame:
        return self.features.filter(pl.col("alive"))

    def examples_for(self, feature_ids: list[str]) -> dict[str, list[Example]]:
        wanted = pl.Series(feature_ids, dtype=pl.String)
        rows = (
            pl.scan_parquet(self.folder / EXAMPLES)
            .filter(self._index_ranges(wanted), pl.col("feature_id").is_in(wanted.implode()))
            .select("feature_id", "kind", "rank", "quantile", "activation", "tokens", "acts",
                    "highlight", "domain", "region")
            .collect()
        )  # fmt: skip
        out: dict[str, list[Example]] = {fid: [] for fid in feature_ids}
        for row in rows.iter_rows(named=True):
            fid = row.pop("feature_id")
            out[fid].append(Example(**row))
        return out

    def _index_ranges(self, feature_ids: pl.Series) -> pl.Expr:
        """The span of feature indices asked for in each layer: the examples file is in
        (layer, index) order, so its row groups outside these spans are skipped by their
        statistics rather than read and filtered."""
        spans = (
            self.features.filter(pl.col("feature_id").is_in(feature_ids.implode()))
            .group_by("layer")
            .agg(pl.col("index").min().alias("lo"), pl.col("index").max().alias("hi"))
        )
        return pl.any_horizontal(
            False,
            *((pl.col("layer") == layer) & pl.col("index").is_between(lo, hi)
              for layer, lo, hi in spans.iter_rows()),
        )  # fmt: skip

    def records(self, feature_ids: list[str]) -> list[FeatureRecord]:
        """Feature records, in the order asked for."""
        examples = self.examples_for(feature_ids)
        table = self.features.filter(pl.col("feature_id").is_in(pl.Series(feature_ids).implode()))
        domains = list(self.info.domains)
        by_id = {row["feature_id"]: row for row in table.iter_rows(named=True)}
        n_tokens = max(self.info.n_tokens, 1)
        domain_share = {d: n / n_tokens for d, n in self.info.tokens_by_domain.items()}
        records = []
        for fid in feature_ids:
            row = by_id[fid]
            records.append(
                FeatureRecord(
                    feature_id=fid,
                    layer=row["layer"],
                    index=row["index"],
                    frequency=row["frequency"],
                    count=row["count"],
                    by_domain={d: row[f"domain_{d}"] for d in domains},
                    by_region={r: row[f"region_{r}"] for r in REGIONS},
                    corpus_domain_share=domain_share,
                    top_logits=row["top_logits"],
                    top_logit_values=row["top_logit_values"],
                    bottom_logits=row["bottom_logits"],
                    examples=examples[fid],
                )
            )
        return records

    @cached_property
    def negative_pool(self) -> list[tuple[list[str], frozenset[int]]]:
        """Each negative window's tokens and the features active anywhere in it."""
        return [
            (list(tokens), frozenset(active))
            for tokens, active in self.negatives.select("tokens", "active_features").iter_rows()
        ]

    def negative_snippets(self, record: FeatureRecord, n: int, seed: int) -> list[Snippet]:
        """``n`` corpus windows in which the feature is checked to be inactive everywhere."""
        global_index = record.layer * self.info.n_features_per_layer + record.index
        pool = [tokens for tokens, active in self.negative_pool if global_index not in active]
        if not pool:
            return []
        rng = np.random.default_rng([seed, record.layer, record.index])
        pick = rng.choice(len(pool), size=min(n, len(pool)), replace=False)
        return [Snippet(tokens=pool[i], activating=False) for i in pick]
