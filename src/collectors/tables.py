"""From accumulators to the run folder's tables (columns in docs/run-format.md).

Only kept examples are turned into rows; every step is a vectorized numpy or polars
operation, so writing a run costs little next to collecting it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl

from collectors.accumulator import FIXED_POINT_SCALE, LayerAccumulator
from collectors.corpus import TokenizedCorpus
from collectors.example_order import sort_examples
from collectors.reservoirs import EMPTY_POS
from collectors.run_format import LOGIT_HISTOGRAM, REGIONS, THINK_BINS, CollectParams


@dataclass(frozen=True)
class LogitLens:
    """Per unit, the ``k`` tokens its decoder column promotes (top) and demotes (bottom),
    and how all the vocabulary's logits are spread: ``histogram`` [F, LOGIT_BINS], the
    number of tokens in each of equal bins from the lowest logit (``bottom_values[:, 0]``)
    to the highest (``top_values[:, 0]``); None where it was not computed (a run written
    before it, an import)."""

    top_ids: np.ndarray  # [F, k]
    top_values: np.ndarray
    bottom_ids: np.ndarray
    bottom_values: np.ndarray
    histogram: np.ndarray | None = None

    @classmethod
    def from_features(cls, frame: pl.DataFrame) -> LogitLens:
        """Read back from a features table (rows in unit order)."""

        def matrix(column: str, dtype: type) -> np.ndarray:
            return np.asarray(frame[column].to_list(), dtype=dtype)

        return cls(
            matrix("top_logit_ids", np.int64),
            matrix("top_logit_values", np.float32),
            matrix("bottom_logit_ids", np.int64),
            matrix("bottom_logit_values", np.float32),
            matrix(LOGIT_HISTOGRAM, np.float32) if LOGIT_HISTOGRAM in frame.columns else None,
        )


@dataclass(frozen=True)
class Coverage:
    """The sequences a run collected (all of them, or a shard's) and their token counts:
    the denominators of frequencies and densities."""

    corpus: TokenizedCorpus
    sequences: np.ndarray  # bool [n_sequences]

    @property
    def token_mask(self) -> np.ndarray:
        return np.repeat(self.sequences, self.corpus.lengths())

    @property
    def n_tokens(self) -> int:
        return int(self.corpus.lengths()[self.sequences].sum())

    def tokens_by_domain(self) -> dict[str, int]:
        domains = np.repeat(self.corpus.domains, self.corpus.lengths())[self.token_mask]
        counts = np.bincount(domains, minlength=len(self.corpus.domain_names))
        return {name: int(counts[i]) for i, name in enumerate(self.corpus.domain_names)}

    def tokens_by_region(self) -> dict[str, int]:
        counts = np.bincount(self.corpus.regions[self.token_mask], minlength=len(REGIONS))
        return {name: int(counts[i]) for i, name in enumerate(REGIONS)}

    def tokens_by_think_bin(self) -> dict[str, int]:
        bins = self.corpus.think_bins[self.token_mask]
        counts = np.bincount(bins[bins >= 0], minlength=THINK_BINS)
        return {str(b): int(counts[b]) for b in range(THINK_BINS)}

    def sequences_by_domain(self) -> dict[str, int]:
        counts = np.bincount(
            self.corpus.domains[self.sequences], minlength=len(self.corpus.domain_names)
        )
        return {name: int(counts[i]) for i, name in enumerate(self.corpus.domain_names)}


def _feature_ids(layer: int, index: np.ndarray) -> pl.Series:
    return pl.select(pl.format("L{}F{}", pl.lit(layer), pl.Series(index))).to_series()


def features_frame(
    acc: LayerAccumulator, coverage: Coverage, lens: LogitLens, vocab: pl.Series
) -> pl.DataFrame:
    count = acc.count.cpu().numpy()
    units = acc.units.cpu().numpy()
    n = count.size
    alive = count > 0
    act_sum = acc.act_sum.cpu().numpy().astype(np.float64) / FIXED_POINT_SCALE
    data: dict[str, Any] = {
        "feature_id": _feature_ids(acc.layer, units),
        "layer": np.full(n, acc.layer, dtype=np.int32),
        "index": units.astype(np.int32),
        "alive": alive,
        "count": count,
        "frequency": count / max(coverage.n_tokens, 1),
        "act_max": acc.act_max.cpu().numpy(),
        "act_min": np.where(alive, acc.act_min.cpu().numpy(), 0).astype(np.float32),
        "act_mean": np.where(alive, act_sum / np.maximum(count, 1), 0.0),
    }
    groups = (
        ("domain", acc.by_domain, coverage.tokens_by_domain()),
        ("region", acc.by_region, coverage.tokens_by_region()),
        ("think_bin", acc.by_think_bin, coverage.tokens_by_think_bin()),
    )
    for prefix, table, tokens in groups:
        counts = table.cpu().numpy()
        for i, name in enumerate(tokens):
            data[f"{prefix}_{name}"] = counts[i]
        for i, (name, n_tokens) in enumerate(tokens.items()):
            data[f"density_{prefix}_{name}"] = counts[i] / n_tokens if n_tokens else np.zeros(n)
    k = lens.top_ids.shape[1]
    for name, ids, vals in (
        ("top", lens.top_ids, lens.top_values),
        ("bottom", lens.bottom_ids, lens.bottom_values),
    ):
        strings = vocab.gather(pl.Series(ids.reshape(-1))).to_numpy().reshape(n, k)
        data[f"{name}_logits"] = pl.Series(strings.tolist(), dtype=pl.List(pl.String))
        data[f"{name}_logit_ids"] = pl.Series(ids).cast(pl.List(pl.Int64))
        data[f"{name}_logit_values"] = pl.Series(vals.astype(np.float32)).cast(pl.List(pl.Float32))
    if lens.histogram is not None:
        counts = lens.histogram.astype(np.float32)
        data[LOGIT_HISTOGRAM] = pl.Series(counts).cast(pl.List(pl.Float32))
    return pl.DataFrame(data)


def quantile_slots(
    act: np.ndarray, pos: np.ndarray, n_quantiles: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Split each row's uniform sample (``pos != EMPTY_POS``) by activation rank into
    ``n_quantiles`` groups of (nearly) equal size. Returns (row, slot, quantile, rank):
    quantile 0 holds the lowest activations; rank 0 is the highest within its quantile."""
    valid = pos != EMPTY_POS
    n_valid = valid.sum(1)
    sort_act = np.where(valid, act, np.inf)
    order = np.lexsort((pos, sort_act), axis=-1)  # ascending activation, ties by position
    m = act.shape[1]
    r = np.broadcast_to(np.arange(m), act.shape)
    keep = r < n_valid[:, None]
    row = np.broadcast_to(np.arange(act.shape[0])[:, None], act.shape)[keep]
    slot = order[keep]
    r = r[keep]
    quantile = r * n_quantiles // n_valid[row]
    group = row.astype(np.int64) * n_quantiles + quantile
    end = np.searchsorted(group, group, side="right")
    rank = end - 1 - np.arange(group.size)
    return row, slot, quantile, rank


def examples_frame(
    acc: LayerAccumulator, corpus: TokenizedCorpus, vocab: pl.Series, params: CollectParams
) -> pl.DataFrame:
    """One row per kept example: the top k, the random sample and the quantile samples."""
    parts: list[tuple[str, Any, np.ndarray, np.ndarray, np.ndarray | None, np.ndarray]] = []
    top_pos = acc.top.pos.cpu().numpy()
    col, slot = np.nonzero(top_pos != EMPTY_POS)
    parts.append(("top", acc.top, col, slot, None, slot))
    sample_pos = acc.sample.pos.cpu().numpy()
    n_random = params.n_random
    col, slot = np.nonzero(sample_pos[:, :n_random] != EMPTY_POS)
    parts.append(("random", acc.sample, col, slot, None, slot))
    if params.n_quantiles:
        size = params.n_quantiles * params.per_quantile  # the smallest hash keys come first
        row, slot, quantile, rank = quantile_slots(
            acc.sample.act.cpu().numpy()[:, :size], sample_pos[:, :size], params.n_quantiles
        )
        parts.append(("quantile", acc.sample, row, slot, quantile, rank))
    units = acc.units.cpu().numpy()
    frames = []
    for kind, reservoir, cols, slots, quantiles, ranks in parts:
        if cols.size == 0:
            continue
        p = reservoir.pos.cpu().numpy()[cols, slots]
        frames.append(
            _rows(corpus, params, acc.layer, units[cols], p).with_columns(
                kind=pl.lit(kind),
                rank=pl.Series(ranks.astype(np.int32)),
                quantile=(
                    pl.lit(None, dtype=pl.Int32)
                    if quantiles is None
                    else pl.Series(quantiles, dtype=pl.Int32)
                ),
                activation=pl.Series(reservoir.act.cpu().numpy()[cols, slots]),
                acts=pl.Series(reservoir.context.cpu().numpy()[cols, slots]),
            )
        )
    if not frames:
        return pl.DataFrame(schema=EXAMPLES_SCHEMA)
    df = (
        pl.concat(frames)
        .with_columns(
            pl.col(c)
            .cast(pl.List(pl.Int64 if c == "token_ids" else pl.Float32))
            .list.slice(pl.col("_offset"), pl.col("_length"))
            for c in ("token_ids", "acts")
        )
        .drop("_offset", "_length")
    )
    return sort_examples(
        df.with_columns(tokens=token_strings(df["token_ids"], vocab))
        .select(EXAMPLE_COLUMNS)
        .cast(EXAMPLES_SCHEMA)
    )


def token_strings(token_ids: pl.Series, vocab: pl.Series) -> pl.Series:
    """A list column of token ids as a list column of their strings."""
    rows = pl.DataFrame({"ids": token_ids}).with_row_index("_row").explode("ids")
    strings = vocab.gather(rows["ids"].fill_null(0))
    return (
        rows.with_columns(tokens=pl.when(pl.col("ids").is_null()).then(None).otherwise(strings))
        .group_by("_row", maintain_order=True)
        .agg(pl.col("tokens").drop_nulls())["tokens"]
    )


EXAMPLES_SCHEMA = pl.Schema({  # type: ignore[arg-type]
    "feature_id": pl.String, "layer": pl.Int32, "index": pl.Int32, "kind": pl.String,
    "rank": pl.Int32, "quantile": pl.Int32, "activation": pl.Float32, "sequence": pl.Int64,
    "position": pl.Int64, "corpus_position": pl.Int64, "domain": pl.String,
    "region": pl.String, "think_bin": pl.Int8, "token_ids": pl.List(pl.Int64),
    "tokens": pl.List(pl.String), "acts": pl.List(pl.Float32), "highlight": pl.Int32,
})  # fmt: skip
EXAMPLE_COLUMNS = list(EXAMPLES_SCHEMA)


def _rows(
    corpus: TokenizedCorpus, params: CollectParams, layer: int, index: np.ndarray, p: np.ndarray
) -> pl.DataFrame:
    """Where each example sits in the corpus, and its context window."""
    seq = np.searchsorted(corpus.offsets, p, side="right") - 1
    seq_start, seq_end = corpus.offsets[seq], corpus.offsets[seq + 1]
    lo = np.maximum(p - params.context_before, seq_start)
    hi = np.minimum(p + params.context_after + 1, seq_end)
    window = np.arange(-params.context_before, params.context_after + 1)
    idx = np.clip(p[:, None] + window[None, :], 0, corpus.n_tokens - 1)
    return pl.DataFrame(
        {
            "feature_id": _feature_ids(layer, index),
            "layer": np.full(index.size, layer, dtype=np.int32),
            "index": index.astype(np.int32),
            "sequence": seq.astype(np.int64),
            "position": (p - seq_start).astype(np.int64),
            "corpus_position": p.astype(np.int64),
            "domain": np.asarray(corpus.domain_names)[corpus.domains[seq]],
            "region": np.asarray(REGIONS)[corpus.regions[p]],
            "think_bin": corpus.think_bins[p].astype(np.int8),
            "token_ids": pl.Series(corpus.token_ids[idx]),
            "highlight": (p - lo).astype(np.int32),
            "_offset": (lo - (p - params.context_before)).astype(np.int64),
            "_length": (hi - lo).astype(np.int64),
        }
    )


def negatives_frame(
    windows: np.ndarray,
    accs: list[LayerAccumulator],
    coverage: Coverage,
    vocab: pl.Series,
    width: int,
) -> pl.DataFrame:
    """The negative windows inside the collected sequences, each with the global index of
    every unit active anywhere in it."""
    corpus = coverage.corpus
    starts, widths = windows[:, 0], windows[:, 1]
    seq = np.searchsorted(corpus.offsets, starts, side="right") - 1
    covered = np.nonzero(coverage.sequences[seq])[0]
    pairs = [
        np.stack([p[:, 0], acc.layer * width + acc.units.cpu().numpy()[p[:, 1]]], axis=1)
        for acc in accs
        if (p := acc.negative_pairs().numpy()).size
    ]
    active = (
        pl.DataFrame(
            np.concatenate(pairs) if pairs else np.zeros((0, 2), dtype=np.int64),
            schema={"window": pl.Int64, "feature": pl.Int64},
            orient="row",
        )
        .group_by("window")
        .agg(pl.col("feature").sort().alias("active_features"))
    )
    token_ids = pl.Series(
        [corpus.token_ids[starts[w] : starts[w] + widths[w]].tolist() for w in covered],
        dtype=pl.List(pl.Int64),
    )
    frame = pl.DataFrame(
        {
            "window": covered.astype(np.int32),
            "sequence": seq[covered].astype(np.int64),
            "position": (starts[covered] - corpus.offsets[seq[covered]]).astype(np.int64),
            "domain": np.asarray(corpus.domain_names)[corpus.domains[seq[covered]]],
            "token_ids": token_ids,
            "tokens": token_strings(token_ids, vocab),
        }
    )
    return (
        frame.join(active.with_columns(pl.col("window").cast(pl.Int32)), on="window", how="left")
        .with_columns(pl.col("active_features").fill_null(pl.lit([], dtype=pl.List(pl.Int64))))
        .sort("window")
    )
