"""Collect per-feature examples and statistics over a corpus into a run folder.

One forward pass per batch; the branch's hook hands over each layer's features once.
Per layer and batch, all statistics are tensor reductions and the example reservoirs
merge the batch's nonzero activations (see ``collectors.reservoirs``). Only kept
examples leave the device, once, at the end.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from adapters.branch import AdapterModel
from adapters.checkpoint import checkpoint_hash
from adapters.errors import UserError
from collectors.corpus import TokenizedCorpus
from collectors.reservoirs import EMPTY_POS, Reservoir, WindowGatherer, hash_keys
from collectors.run_format import (
    EXAMPLES,
    FEATURES,
    NEGATIVES,
    REGIONS,
    RUN_SCHEMA_VERSION,
    CollectParams,
    RunInfo,
    feature_id,
    write_run_info,
)

ProgressFn = Callable[[int], None]


@dataclass
class LayerAccumulator:
    """Running statistics and reservoirs of one layer's features."""

    layer: int
    top: Reservoir
    sample: Reservoir
    count: torch.Tensor  # [F] int64
    act_sum: torch.Tensor  # [F] float64
    act_max: torch.Tensor  # [F] float32
    by_domain: torch.Tensor  # [D, F] int64
    by_region: torch.Tensor  # [R, F] int64
    negatives: list[torch.Tensor] = field(default_factory=list)  # [m, 2] (window, feature)

    @classmethod
    def create(
        cls,
        layer: int,
        n_features: int,
        n_domains: int,
        params: CollectParams,
        device: torch.device,
    ) -> LayerAccumulator:
        window = params.context_before + params.context_after + 1
        zeros = torch.zeros
        return cls(
            layer=layer,
            top=Reservoir.empty(n_features, params.top_k, window, torch.float32, device),
            sample=Reservoir.empty(n_features, params.n_random, window, torch.int64, device),
            count=zeros(n_features, dtype=torch.int64, device=device),
            act_sum=zeros(n_features, dtype=torch.float64, device=device),
            act_max=zeros(n_features, dtype=torch.float32, device=device),
            by_domain=zeros((n_domains, n_features), dtype=torch.int64, device=device),
            by_region=zeros((len(REGIONS), n_features), dtype=torch.int64, device=device),
        )


@dataclass(frozen=True)
class Batch:
    """A padded batch of whole sequences (right padding)."""

    sequences: np.ndarray  # [B] sequence indices
    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T]
    positions: torch.Tensor  # [B*T] global corpus position, -1 on padding
    regions: torch.Tensor  # [B*T] region code, 0 on padding
    domains: torch.Tensor  # [B*T] domain code
    row_start: torch.Tensor  # [B*T]
    row_end: torch.Tensor  # [B*T]

    @property
    def n_tokens(self) -> int:
        return int(self.attention_mask.sum())


def plan_batches(lengths: np.ndarray, batch_tokens: int) -> list[np.ndarray]:
    """Group sequences, longest first, so that rows x longest row <= ``batch_tokens``."""
    order = np.argsort(-lengths, kind="stable")
    batches: list[np.ndarray] = []
    current: list[int] = []
    for seq in order:
        width = int(lengths[current[0]]) if current else int(lengths[seq])
        if current and (len(current) + 1) * width > batch_tokens:
            batches.append(np.asarray(current))
            current = []
        current.append(int(seq))
    if current:
        batches.append(np.asarray(current))
    return batches


def make_batch(corpus: TokenizedCorpus, sequences: np.ndarray, device: torch.device) -> Batch:
    lengths = corpus.lengths()[sequences]
    width = int(lengths.max())
    n_rows = len(sequences)
    cols = np.arange(width)
    real = cols[None, :] < lengths[:, None]
    starts = corpus.offsets[sequences][:, None]
    positions = np.where(real, starts + cols[None, :], -1)
    safe = np.where(real, positions, 0)
    ids = np.where(real, corpus.token_ids[safe], 0)
    regions = np.where(real, corpus.regions[safe], 0)
    domains = np.repeat(corpus.domains[sequences], width)
    row_start = np.repeat(np.arange(n_rows) * width, width)
    row_end = row_start + np.repeat(lengths, width)

    def tensor(a: np.ndarray, dtype: torch.dtype = torch.int64) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(device=device, dtype=dtype)

    return Batch(
        sequences=sequences,
        input_ids=tensor(ids),
        attention_mask=tensor(real),
        positions=tensor(positions.reshape(-1)),
        regions=tensor(regions.reshape(-1)),
        domains=tensor(domains),
        row_start=tensor(row_start),
        row_end=tensor(row_end),
    )


def negative_windows(corpus: TokenizedCorpus, params: CollectParams) -> np.ndarray:
    """Random corpus windows [n, 2] of (global start, length), seeded, within sequences."""
    rng = np.random.default_rng(params.seed + 7919)
    lengths = corpus.lengths()
    seqs = rng.choice(corpus.n_sequences, size=params.n_negatives, replace=True)
    width = np.minimum(lengths[seqs], params.negative_window)
    starts = corpus.offsets[seqs] + (rng.random(len(seqs)) * (lengths[seqs] - width + 1)).astype(
        np.int64
    )
    return np.stack([starts, width], axis=1)


class Collector:
    """Accumulates every requested layer over the batches of a corpus."""

    def __init__(
        self,
        adapter: AdapterModel,
        corpus: TokenizedCorpus,
        params: CollectParams,
        layers: list[int],
    ) -> None:
        self.adapter = adapter
        self.corpus = corpus
        self.params = params
        self.layers = layers
        self.device = adapter.device
        n_features = adapter.config.n_features
        n_domains = len(corpus.domain_names)
        self.acc = {
            layer: LayerAccumulator.create(layer, n_features, n_domains, params, self.device)
            for layer in layers
        }
        self.negatives = negative_windows(corpus, params)
        self.negative_seq = np.searchsorted(corpus.offsets, self.negatives[:, 0], side="right") - 1

    def run(self, progress: ProgressFn | None = None) -> None:
        batches = plan_batches(self.corpus.lengths(), self.params.batch_tokens)
        with torch.no_grad(), self.adapter.recording(self.layers) as captured:
            for sequences in batches:
                batch = make_batch(self.corpus, sequences, self.device)
                negatives = self._negatives_in_batch(batch)
                self.adapter.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
                for layer in self.layers:
                    self._update(self.acc[layer], captured[layer], batch, negatives)
                if progress is not None:
                    progress(batch.n_tokens)

    def _update(
        self,
        acc: LayerAccumulator,
        features: torch.Tensor,
        batch: Batch,
        negatives: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> None:
        f = features.reshape(-1, features.shape[-1])
        f = f * (batch.positions >= 0).unsqueeze(1).to(f.dtype)
        active = f > 0
        active_f = active.float()
        acc.count += active.sum(0)
        acc.act_sum += f.sum(0, dtype=torch.float64)
        acc.act_max = torch.maximum(acc.act_max, f.amax(0).float())
        n_regions, n_domains = acc.by_region.shape[0], acc.by_domain.shape[0]
        region_onehot = torch.nn.functional.one_hot(batch.regions, n_regions).float()
        domain_onehot = torch.nn.functional.one_hot(batch.domains, n_domains).float()
        acc.by_region += (region_onehot.T @ active_f).round().long()
        acc.by_domain += (domain_onehot.T @ active_f).round().long()
        flat, feat = active.nonzero(as_tuple=True)
        if flat.numel() == 0:
            return
        if negatives is not None:
            self._update_negatives(acc, active, negatives)
        act = f[flat, feat].float()
        pos = batch.positions[flat]
        windows = WindowGatherer(
            f, batch.row_start, batch.row_end, self.params.context_before, self.params.context_after
        )
        acc.top.merge(feat, -act, act, pos, flat, windows)
        keys = hash_keys(self.params.seed, acc.layer, pos, feat)
        acc.sample.merge(feat, keys, act, pos, flat, windows)

    def _negatives_in_batch(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The negative windows inside this batch: their ids and their flat token indices
        [m, window] (-1 past a short window's end)."""
        starts, widths, seq = self.negatives[:, 0], self.negatives[:, 1], self.negative_seq
        row_of_seq = np.full(self.corpus.n_sequences, -1)
        row_of_seq[batch.sequences] = np.arange(len(batch.sequences))
        rows = row_of_seq[seq]
        window_ids = np.nonzero(rows >= 0)[0]
        if window_ids.size == 0:
            return None
        width = batch.input_ids.shape[1]
        first = rows[window_ids] * width + starts[window_ids] - self.corpus.offsets[seq[window_ids]]
        span = np.arange(self.params.negative_window)
        idx = np.where(span < widths[window_ids, None], first[:, None] + span, -1)
        return (
            torch.from_numpy(window_ids).to(self.device),
            torch.from_numpy(idx).to(self.device),
        )

    @staticmethod
    def _update_negatives(
        acc: LayerAccumulator, active: torch.Tensor, windows: tuple[torch.Tensor, torch.Tensor]
    ) -> None:
        """Record, for each negative window in the batch, the features active in it."""
        window_ids, idx = windows
        hits = (active[idx.clamp(min=0)] & (idx >= 0).unsqueeze(-1)).any(1)
        w, feat = hits.nonzero(as_tuple=True)
        acc.negatives.append(torch.stack([window_ids[w], feat], dim=1).cpu())


def logit_lens(
    adapter: AdapterModel, layer: int, k: int, chunk: int = 1024
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """For each feature, the ``k`` token ids (and dot products) its decoder column promotes
    most and least: unembedding rows . decoder column."""
    _, dec = adapter.enc_dec(layer)
    unembed = adapter.unembedding().float()
    dec_w = dec.weight.float()
    outs: list[list[torch.Tensor]] = [[], [], [], []]
    with torch.no_grad():
        for start in range(0, dec_w.shape[1], chunk):
            logits = unembed @ dec_w[:, start : start + chunk]  # [V, c]
            top = logits.topk(k, dim=0)
            bottom = (-logits).topk(k, dim=0)
            for slot, t in enumerate((top.indices, top.values, bottom.indices, -bottom.values)):
                outs[slot].append(t.T.cpu())
    top_ids, top_vals, bottom_ids, bottom_vals = (torch.cat(o).numpy() for o in outs)
    return top_ids, top_vals, bottom_ids, bottom_vals


def vocabulary(tokenizer: Any) -> np.ndarray:
    """Each token id's text as the tokenizer decodes it alone."""
    size = len(tokenizer)
    return np.asarray(tokenizer.batch_decode([[i] for i in range(size)]), dtype=object)


def _examples_frame(
    acc: LayerAccumulator,
    corpus: TokenizedCorpus,
    vocab: pl.Series,
    params: CollectParams,
) -> pl.DataFrame:
    frames = []
    for kind, reservoir in (("top", acc.top), ("random", acc.sample)):
        pos = reservoir.pos.cpu().numpy()
        feat, rank = np.nonzero(pos != EMPTY_POS)
        if feat.size == 0:
            continue
        p = pos[feat, rank]
        seq = np.searchsorted(corpus.offsets, p, side="right") - 1
        seq_start, seq_end = corpus.offsets[seq], corpus.offsets[seq + 1]
        lo = np.maximum(p - params.context_before, seq_start)
        hi = np.minimum(p + params.context_after + 1, seq_end)
        window = np.arange(-params.context_before, params.context_after + 1)
        idx = np.clip(p[:, None] + window[None, :], 0, corpus.n_tokens - 1)
        offset = (lo - (p - params.context_before)).astype(np.int64)
        length = (hi - lo).astype(np.int64)
        frames.append(
            pl.DataFrame(
                {
                    "feature_id": [feature_id(acc.layer, int(i)) for i in feat],
                    "layer": np.full(feat.size, acc.layer, dtype=np.int32),
                    "index": feat.astype(np.int32),
                    "kind": np.full(feat.size, kind),
                    "rank": rank.astype(np.int32),
                    "activation": reservoir.act.cpu().numpy()[feat, rank],
                    "sequence": seq.astype(np.int64),
                    "position": (p - seq_start).astype(np.int64),
                    "domain": np.asarray(corpus.domain_names)[corpus.domains[seq]],
                    "region": np.asarray(REGIONS)[corpus.regions[p]],
                    "token_ids": pl.Series(corpus.token_ids[idx]),
                    "acts": pl.Series(reservoir.context.cpu().numpy()[feat, rank]),
                    "highlight": (p - lo).astype(np.int32),
                    "_offset": offset,
                    "_length": length,
                }
            ).with_columns(
                pl.col(c)
                .cast(pl.List(pl.Int64 if c == "token_ids" else pl.Float32))
                .list.slice(pl.col("_offset"), pl.col("_length"))
                for c in ("token_ids", "acts")
            )
        )
    if not frames:
        return pl.DataFrame()
    df = pl.concat(frames).drop("_offset", "_length").with_row_index("_row")
    tokens = (
        df.select("_row", "token_ids")
        .explode("token_ids")
        .with_columns(tokens=vocab.gather(pl.Series(df["token_ids"].explode())))
        .group_by("_row", maintain_order=True)
        .agg("tokens")
    )
    return df.join(tokens, on="_row").drop("_row")


def _features_frame(
    acc: LayerAccumulator,
    corpus: TokenizedCorpus,
    lens: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    vocab: pl.Series,
) -> pl.DataFrame:
    count = acc.count.cpu().numpy()
    n = count.size
    top_ids, top_vals, bottom_ids, bottom_vals = lens
    data: dict[str, Any] = {
        "feature_id": [feature_id(acc.layer, i) for i in range(n)],
        "layer": np.full(n, acc.layer, dtype=np.int32),
        "index": np.arange(n, dtype=np.int32),
        "alive": count > 0,
        "count": count,
        "frequency": count / max(corpus.n_tokens, 1),
        "act_max": acc.act_max.cpu().numpy(),
        "act_mean": np.where(count > 0, acc.act_sum.cpu().numpy() / np.maximum(count, 1), 0.0),
    }
    by_domain = acc.by_domain.cpu().numpy()
    for i, name in enumerate(corpus.domain_names):
        data[f"domain_{name}"] = by_domain[i]
    by_region = acc.by_region.cpu().numpy()
    for i, name in enumerate(REGIONS):
        data[f"region_{name}"] = by_region[i]
    k = top_ids.shape[1]
    for name, ids, vals in (("top", top_ids, top_vals), ("bottom", bottom_ids, bottom_vals)):
        strings = vocab.gather(pl.Series(ids.reshape(-1))).to_numpy().reshape(n, k)
        data[f"{name}_logits"] = pl.Series(strings.tolist(), dtype=pl.List(pl.String))
        data[f"{name}_logit_ids"] = pl.Series(ids).cast(pl.List(pl.Int64))
        data[f"{name}_logit_values"] = pl.Series(vals.astype(np.float32)).cast(pl.List(pl.Float32))
    return pl.DataFrame(data)


def _negatives_frame(
    collector: Collector, corpus: TokenizedCorpus, vocab: pl.Series, n_features: int
) -> pl.DataFrame:
    windows = collector.negatives
    active: list[list[int]] = [[] for _ in range(len(windows))]
    for layer, acc in collector.acc.items():
        if acc.negatives:
            pairs = torch.cat(acc.negatives).numpy()
            for w, feat in pairs:  # loop over (window, feature) pairs of a few hundred windows
                active[int(w)].append(layer * n_features + int(feat))
    starts, widths = windows[:, 0], windows[:, 1]
    token_lists = [
        corpus.token_ids[s : s + w].tolist() for s, w in zip(starts, widths, strict=True)
    ]
    seq = np.searchsorted(corpus.offsets, starts, side="right") - 1
    return pl.DataFrame(
        {
            "window": np.arange(len(windows), dtype=np.int32),
            "sequence": seq.astype(np.int64),
            "position": (starts - corpus.offsets[seq]).astype(np.int64),
            "domain": np.asarray(corpus.domain_names)[corpus.domains[seq]],
            "token_ids": pl.Series(token_lists, dtype=pl.List(pl.Int64)),
            "tokens": [vocab.gather(pl.Series(t, dtype=pl.Int64)).to_list() for t in token_lists],
            "active_features": pl.Series([sorted(a) for a in active], dtype=pl.List(pl.Int64)),
        }
    )


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _versions() -> dict[str, str]:
    out = {}
    for dist in ("transcoder-labeler", "torch", "transformers", "polars"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def prepare_output(out: Path, overwrite: bool) -> Path:
    """A fresh staging folder beside ``out``; refuses to clobber unless ``overwrite``."""
    if out.exists() and not overwrite:
        raise UserError(f"{out}: already exists; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))


def publish(staging: Path, out: Path) -> None:
    """Move a finished staging folder into place (the old one only goes once the new is
    complete)."""
    if out.exists():
        trash = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(trash)
        staging.rename(out)
        shutil.rmtree(trash)
    else:
        staging.rename(out)


def collect_run(
    adapter: AdapterModel,
    tokenizer: Any,
    corpus: TokenizedCorpus,
    params: CollectParams,
    out: Path,
    adapter_folder: Path,
    corpus_path: Path,
    overwrite: bool = False,
    progress: ProgressFn | None = None,
) -> RunInfo:
    """Collect and write a complete run folder at ``out`` (atomically: a failure leaves no
    folder that looks complete)."""
    layers = params.layers if params.layers is not None else list(range(adapter.n_layers))
    bad = [la for la in layers if not 0 <= la < adapter.n_layers]
    if bad:
        raise UserError(f"--layers {bad}: the model has layers 0..{adapter.n_layers - 1}")
    staging = prepare_output(out, overwrite)
    try:
        collector = Collector(adapter, corpus, params, layers)
        collector.run(progress)
        vocab = pl.Series(vocabulary(tokenizer), dtype=pl.String)
        features, examples = [], []
        for layer in layers:
            acc = collector.acc[layer]
            lens = logit_lens(adapter, layer, params.logit_lens_k)
            features.append(_features_frame(acc, corpus, lens, vocab))
            examples.append(_examples_frame(acc, corpus, vocab, params))
        features_df = pl.concat(features)
        features_df.write_parquet(staging / FEATURES)
        pl.concat([e for e in examples if e.height]).write_parquet(staging / EXAMPLES)
        _negatives_frame(collector, corpus, vocab, adapter.config.n_features).write_parquet(
            staging / NEGATIVES
        )
        region_counts = np.bincount(corpus.regions, minlength=len(REGIONS))
        token_domains = np.repeat(corpus.domains, corpus.lengths())
        info = RunInfo(
            schema_version=RUN_SCHEMA_VERSION,
            created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            adapter_path=str(adapter_folder),
            adapter_hash=checkpoint_hash(adapter_folder),
            corpus_path=str(corpus_path),
            corpus_hash=file_sha256(corpus_path),
            params=params.model_copy(update={"layers": layers}),
            layers=layers,
            n_features_per_layer=adapter.config.n_features,
            n_alive={str(la): int((collector.acc[la].count > 0).sum().item()) for la in layers},
            n_sequences=corpus.n_sequences,
            n_tokens=corpus.n_tokens,
            n_truncated=corpus.n_truncated,
            n_unterminated_think=corpus.n_unterminated_think,
            domains={
                name: int((corpus.domains == i).sum()) for i, name in enumerate(corpus.domain_names)
            },
            tokens_by_domain={
                name: int((token_domains == i).sum()) for i, name in enumerate(corpus.domain_names)
            },
            tokens_by_region={name: int(region_counts[i]) for i, name in enumerate(REGIONS)},
            versions=_versions(),
        )
        write_run_info(staging, info)  # written last: its presence marks a complete folder
        publish(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return info
