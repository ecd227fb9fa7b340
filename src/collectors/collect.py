"""Collect per-feature examples and statistics over a corpus into a run folder.

One forward pass per batch. The model's hook hands each layer's features to the
collector as soon as the layer has run; the layer's accumulator folds in the nonzero
activations (see ``collectors.accumulator``) and the features are dropped, so memory
holds one layer's batch at a time plus the reservoirs. The forward stops after the
last collected layer and never computes logits.

A collection can checkpoint every N sequences and resume from the checkpoint, and can
be split into shards (``--shard i/n``) merged later by ``collectors.merge``; both give
run folders identical to an uninterrupted single run.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import logging
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from adapters.checkpoint import checkpoint_hash
from adapters.outputs import writing
from collectors.accumulator import LayerAccumulator, NegativeWindows
from collectors.batching import WHOLE, Batch, Shard, make_batch, plan_batches
from collectors.corpus import TokenizedCorpus
from collectors.errors import CollectError
from collectors.run_format import (
    EXAMPLE_ROW_GROUP,
    EXAMPLES,
    FEATURES,
    LOGIT_BINS,
    NEGATIVES,
    RUN_SCHEMA_VERSION,
    STATE_DIR,
    CollectParams,
    RunInfo,
    package_versions,
    publish,
    write_run_info,
)
from collectors.source import FeatureSource
from collectors.state import (
    CollectState,
    Fingerprint,
    load_accumulators,
    read_state_meta,
    save_state,
)
from collectors.tables import (
    Coverage,
    LogitLens,
    examples_frame,
    features_frame,
    negatives_frame,
)

log = logging.getLogger(__name__)

ProgressFn = Callable[[int], None]


class _LastLayerDone(Exception):
    """Raised from the hook once the last collected layer has run: the rest of the
    forward pass would be wasted."""


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
    """Accumulates every requested layer over batches of a corpus."""

    def __init__(
        self,
        source: FeatureSource,
        corpus: TokenizedCorpus,
        params: CollectParams,
        layers: list[int],
        accumulators: dict[int, LayerAccumulator] | None = None,
    ) -> None:
        self.source = source
        self.corpus = corpus
        self.params = params
        self.layers = layers
        self.device = source.device
        n_domains = len(corpus.domain_names)
        self.acc = accumulators or {
            layer: LayerAccumulator.create(
                layer, source.units(layer), n_domains, params, self.device
            )
            for layer in layers
        }
        self.windows = negative_windows(corpus, params)
        self.window_seq = np.searchsorted(corpus.offsets, self.windows[:, 0], side="right") - 1

    def process(self, sequences: np.ndarray) -> int:
        """One forward pass over a batch of sequences; returns its number of tokens."""
        batch = make_batch(self.corpus, sequences, self.device)
        negatives = self._negatives_in_batch(batch)
        last = max(self.layers)

        def sink(layer: int, features: torch.Tensor) -> None:
            self.acc[layer].update(features, batch, negatives, self.params)
            if layer == last:
                raise _LastLayerDone

        decoder = self.source.model.get_decoder()
        with (
            torch.no_grad(),
            self.source.recording(self.layers, sink),
            contextlib.suppress(_LastLayerDone),
        ):
            decoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
        return batch.n_tokens

    def _negatives_in_batch(self, batch: Batch) -> NegativeWindows | None:
        starts, widths, seq = self.windows[:, 0], self.windows[:, 1], self.window_seq
        window_ids = np.nonzero(np.isin(seq, batch.sequences))[0]
        if window_ids.size == 0:
            return None
        order = np.argsort(batch.sequences)
        rows = order[np.searchsorted(batch.sequences, seq[window_ids], sorter=order)]
        width = batch.input_ids.shape[1]
        first = rows * width + starts[window_ids] - self.corpus.offsets[seq[window_ids]]
        span = np.arange(self.params.negative_window)
        idx = np.where(span < widths[window_ids, None], first[:, None] + span, -1)
        return NegativeWindows(
            torch.from_numpy(window_ids).to(self.device), torch.from_numpy(idx).to(self.device)
        )


def logit_lens(source: FeatureSource, layer: int, k: int, through_norm: bool) -> LogitLens:
    """For each unit, the ``k`` token ids (and dot products) its decoder column promotes
    most and least; ``through_norm`` applies the model's final norm to the column first."""
    unembed = source.unembedding().float()
    columns = source.decoder_columns(layer).T  # [F, d_model]
    norm = source.final_norm() if through_norm else None
    if through_norm and norm is None:
        raise CollectError("--lens-through-norm: the model has no final norm to apply")
    outs: list[list[torch.Tensor]] = [[], [], [], [], []]
    with torch.no_grad():
        for start in range(0, columns.shape[0], 1024):
            chunk = columns[start : start + 1024]
            if norm is not None:
                chunk = norm(chunk)
            logits = unembed @ chunk.float().T  # [V, c]
            top = logits.topk(k, dim=0)
            bottom = (-logits).topk(k, dim=0)
            counts = logit_histogram(logits, bottom.values[0].neg(), top.values[0])
            found = (top.indices, top.values, bottom.indices, -bottom.values, counts.T)
            for slot, t in enumerate(found):
                outs[slot].append(t.T.cpu())
    top_ids, top_vals, bottom_ids, bottom_vals, spread = (torch.cat(o).numpy() for o in outs)
    return LogitLens(top_ids, top_vals.astype(np.float32), bottom_ids, bottom_vals, spread)


def logit_histogram(logits: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """[c, LOGIT_BINS]: for each column of ``logits`` [V, c], how many of its V values fall
    in each of LOGIT_BINS equal bins from ``lo`` to ``hi`` (its lowest and highest),
    counted a slice of columns at a time (the bin indices are int64: V x 128 of them)."""
    counts = torch.zeros(logits.shape[1], LOGIT_BINS, dtype=torch.float32, device=logits.device)
    span = (hi - lo).clamp_min(torch.finfo(torch.float32).tiny)
    for start in range(0, logits.shape[1], 128):
        part = slice(start, start + 128)
        scaled = (logits[:, part] - lo[part]) / span[part] * LOGIT_BINS
        bins = scaled.long().clamp_(0, LOGIT_BINS - 1)
        counts[part].scatter_add_(1, bins.T, torch.ones_like(bins.T, dtype=torch.float32))
    return counts


def vocabulary(tokenizer: Any, size: int | None = None) -> pl.Series:
    """Each token id's text as the tokenizer decodes it alone. ``size`` pads it to the
    unembedding's rows (models often have more rows than tokens): ``<id:N>``."""
    n = len(tokenizer)
    strings = tokenizer.batch_decode([[i] for i in range(n)])
    strings += [f"<id:{i}>" for i in range(n, size or n)]
    return pl.Series(strings, dtype=pl.String)


def tokens_hash(corpus: TokenizedCorpus) -> str:
    """sha256 of the tokenized corpus: what the tokenizer, chat format and truncation made."""
    digest = hashlib.sha256()
    for array in (corpus.token_ids, corpus.offsets, corpus.regions, corpus.think_bins):
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def partial_folder(out: Path) -> Path:
    """Where a collection into ``out`` builds its folder and keeps its checkpoints."""
    return out.with_name(f".{out.name}.partial")


@dataclass(frozen=True)
class Provenance:
    """Where a run came from (for run.json)."""

    adapter_path: str
    adapter_hash: str
    corpus_path: str
    corpus_hash: str
    created_at: str
    unit: str
    source: str
    shard: Shard | None


def write_run(
    staging: Path,
    accs: dict[int, LayerAccumulator],
    coverage: Coverage,
    lenses: dict[int, LogitLens],
    vocab: pl.Series,
    params: CollectParams,
    width: int,
    provenance: Provenance,
) -> RunInfo:
    """Write the tables and, last, run.json into ``staging``."""
    corpus = coverage.corpus
    layers = sorted(accs)
    features = [features_frame(accs[la], coverage, lenses[la], vocab) for la in layers]
    pl.concat(features).write_parquet(staging / FEATURES)
    parts = []
    for la in layers:  # one layer's examples in memory at a time
        part = staging / f".examples-{la}.parquet"
        examples_frame(accs[la], corpus, vocab, params).write_parquet(part)
        parts.append(part)
    pl.scan_parquet(parts).sink_parquet(staging / EXAMPLES, row_group_size=EXAMPLE_ROW_GROUP)
    for part in parts:
        part.unlink()
    windows = negative_windows(corpus, params)
    negatives_frame(windows, [accs[la] for la in layers], coverage, vocab, width).write_parquet(
        staging / NEGATIVES
    )
    info = RunInfo(
        schema_version=RUN_SCHEMA_VERSION,
        created_at=provenance.created_at,
        source=provenance.source,
        unit=provenance.unit,
        shard=str(provenance.shard) if provenance.shard else None,
        adapter_path=provenance.adapter_path,
        adapter_hash=provenance.adapter_hash,
        corpus_path=provenance.corpus_path,
        corpus_hash=provenance.corpus_hash,
        params=params,
        layers=layers,
        n_features_per_layer=width,
        n_alive={str(la): int((accs[la].count > 0).sum().item()) for la in layers},
        n_sequences=int(coverage.sequences.sum()),
        n_tokens=coverage.n_tokens,
        n_truncated=int(corpus.truncated[coverage.sequences].sum()),
        n_unterminated_think=int(corpus.unterminated[coverage.sequences].sum()),
        n_dropped=dict(corpus.dropped),
        domains=coverage.sequences_by_domain(),
        tokens_by_domain=coverage.tokens_by_domain(),
        tokens_by_region=coverage.tokens_by_region(),
        tokens_by_think_bin=coverage.tokens_by_think_bin(),
        versions=package_versions(("transcoder-labeler", "torch", "transformers", "polars")),
    )
    write_run_info(staging, info)  # written last: its presence marks a complete folder
    return info


def resolve_layers(params: CollectParams, n_layers: int) -> list[int]:
    layers = params.layers if params.layers is not None else list(range(n_layers))
    bad = [la for la in layers if not 0 <= la < n_layers]
    if bad or not layers:
        raise CollectError(f"--layers {bad or layers}: the model has layers 0..{n_layers - 1}")
    return layers


@dataclass(frozen=True)
class CollectJob:
    """Everything that identifies one collection."""

    source: FeatureSource
    tokenizer: Any
    corpus: TokenizedCorpus
    params: CollectParams
    adapter_folder: Path
    corpus_path: Path
    unit: str = "feature"
    shard: Shard = WHOLE


def collect_run(
    job: CollectJob,
    out: Path,
    checkpoint_every: int | None = None,
    overwrite: bool = False,
    restart: bool = False,
    on_plan: Callable[[int, int], None] | None = None,
    progress: ProgressFn | None = None,
) -> RunInfo:
    """Collect ``job`` into the run folder ``out``.

    The folder is built in ``.OUT.partial`` beside it and renamed into place when
    complete. With ``checkpoint_every``, the collector state is saved there every that
    many sequences; a later call with the same job resumes from it (a checkpoint of a
    different job is refused unless ``restart``). ``on_plan(total_tokens, done_tokens)``
    is called once before the first batch.
    """
    corpus, params = job.corpus, job.params
    layers = resolve_layers(params, job.source.n_layers)
    params = params.model_copy(update={"layers": layers})
    if out.exists() and not overwrite:
        raise CollectError(f"{out}: already exists; pass --overwrite to replace it")
    if checkpoint_every is not None and checkpoint_every < 1:
        raise CollectError(f"--checkpoint-every {checkpoint_every}: must be at least 1 sequence")
    plan = plan_batches(corpus.lengths(), params.batch_tokens)
    reference: torch.Tensor = next(job.source.model.parameters())
    fingerprint = Fingerprint(
        adapter_hash=checkpoint_hash(job.adapter_folder),
        corpus_hash=file_sha256(job.corpus_path),
        tokens_hash=tokens_hash(corpus),
        dtype=str(reference.dtype).removeprefix("torch."),
        device_type=reference.device.type,
        unit=job.unit,
        params=params,
        layers=layers,
        n_batches=len(plan),
    )
    staging = partial_folder(out)
    kept = ("the checkpoint in it is kept: run the same command again to resume"
            if checkpoint_every else "nothing half-written is left as if complete")  # fmt: skip
    with _exclusive(staging), writing(staging, kept):
        return _collect_into(job, out, staging, plan, fingerprint, params, layers,
                             checkpoint_every, restart, on_plan, progress)  # fmt: skip


@contextlib.contextmanager
def _exclusive(staging: Path) -> Iterator[None]:
    """Hold a lock beside the staging folder, so two processes (a job delivered twice)
    never write one collection at once."""
    lock_path = staging.with_name(staging.name + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise CollectError(
                f"{staging}: another process is collecting into it (lock {lock_path})"
            ) from exc
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
            lock_path.unlink(missing_ok=True)


def _collect_into(
    job: CollectJob,
    out: Path,
    staging: Path,
    plan: list[np.ndarray],
    fingerprint: Fingerprint,
    params: CollectParams,
    layers: list[int],
    checkpoint_every: int | None,
    restart: bool,
    on_plan: Callable[[int, int], None] | None,
    progress: ProgressFn | None,
) -> RunInfo:
    corpus = job.corpus
    mine = job.shard.batches(len(plan))
    state_dir = staging / STATE_DIR
    meta = _resumable_state(staging, fingerprint, job.shard, restart)
    if meta is None:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        meta = CollectState(
            fingerprint=fingerprint,
            shard=str(job.shard),
            batches_done=[],
            created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            adapter_path=str(job.adapter_folder),
            corpus_path=str(job.corpus_path),
        )
        accumulators = None
    else:
        log.info("resuming %s: %d of %d batches done", out, len(meta.batches_done), len(mine))
        accumulators = load_accumulators(state_dir, layers, job.source.device)
    collector = Collector(job.source, corpus, params, layers, accumulators)
    lengths = corpus.lengths()
    done = set(meta.batches_done)
    if on_plan is not None:
        total = int(sum(lengths[plan[b]].sum() for b in mine))
        on_plan(total, int(sum(lengths[plan[b]].sum() for b in done)))
    since_checkpoint = 0
    for b in mine:
        if b in done:
            continue
        n_tokens = collector.process(plan[b])
        meta.batches_done.append(b)
        since_checkpoint += len(plan[b])
        if checkpoint_every is not None and since_checkpoint >= checkpoint_every:
            save_state(state_dir, meta, collector.acc)
            since_checkpoint = 0
        if progress is not None:
            progress(n_tokens)
    covered = np.zeros(corpus.n_sequences, dtype=bool)
    for b in mine:
        covered[plan[b]] = True
    if job.shard != WHOLE or checkpoint_every is not None:
        # Shards keep it for `labeler merge-runs`; a checkpointed run keeps it until the
        # folder is published, so a failure while writing the tables loses no batch.
        save_state(state_dir, meta, collector.acc)
    lenses = {
        la: logit_lens(job.source, la, params.logit_lens_k, params.lens_through_norm)
        for la in layers
    }
    info = write_run(
        staging,
        collector.acc,
        Coverage(corpus, covered),
        lenses,
        vocabulary(job.tokenizer, int(job.source.unembedding().shape[0])),
        params,
        job.source.width,
        Provenance(
            adapter_path=str(job.adapter_folder),
            adapter_hash=fingerprint.adapter_hash,
            corpus_path=str(job.corpus_path),
            corpus_hash=fingerprint.corpus_hash,
            created_at=meta.created_at,
            unit=job.unit,
            source="collect",
            shard=job.shard if job.shard != WHOLE else None,
        ),
    )
    publish(staging, out)
    if job.shard == WHOLE:
        shutil.rmtree(out / STATE_DIR, ignore_errors=True)
    return info


def _resumable_state(
    staging: Path, fingerprint: Fingerprint, shard: Shard, restart: bool
) -> CollectState | None:
    """The checkpoint to resume from, if ``staging`` holds one of this very job."""
    if not staging.exists() or restart:
        return None
    meta = read_state_meta(staging / STATE_DIR)
    if meta is None:
        return None  # interrupted before the first checkpoint: nothing to keep
    differences = meta.fingerprint.differences(fingerprint)
    if meta.shard != str(shard):
        differences.append(f"shard: {meta.shard} vs {shard}")
    if differences:
        raise CollectError(
            f"{staging}: holds a checkpoint of a different collection "
            f"({'; '.join(differences)}; checkpoint vs now). Pass --restart to discard it, "
            "or collect into another --out."
        )
    return meta
