"""Merge shard runs (``labeler collect --shard i/n``) into one run folder.

Each shard run keeps its collector state in ``RUN/collect-state``. The merge checks that
the shards belong to one collection (same adapter, corpus and parameters; shards 1..n
each exactly once, every batch of the plan covered once), combines the accumulators,
and writes the run with the same code as a single collection, so the result is
identical to collecting the whole corpus in one run (apart from ``created_at`` and
``source``). The corpus is read again for the example contexts and the tokenizer for
the token strings; the logit lens is taken from the shards (it does not depend on
the corpus).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from collectors.batching import Shard
from collectors.collect import (
    Provenance,
    file_sha256,
    partial_folder,
    tokens_hash,
    vocabulary,
    write_run,
)
from collectors.corpus import TokenizedCorpus
from collectors.errors import CollectError, RunFolderError
from collectors.run_format import FEATURES, STATE_DIR, RunInfo, publish, read_run_info
from collectors.state import CollectState, load_accumulators, read_state_meta
from collectors.tables import Coverage, LogitLens


def check_shards(folders: list[Path]) -> list[tuple[Path, RunInfo, CollectState]]:
    """Validate that ``folders`` are the complete set of shards of one collection."""
    if len(folders) < 2:
        raise CollectError("merge-runs needs at least two shard run folders")
    shards = []
    for folder in folders:
        info = read_run_info(folder)
        if info.shard is None:
            raise CollectError(f"{folder}: not a shard run (collected without --shard)")
        meta = read_state_meta(folder / STATE_DIR)
        if meta is None:
            raise RunFolderError(
                f"{folder / STATE_DIR}: missing; a shard run keeps its collector state there"
            )
        shards.append((folder, info, meta))
    first_folder, _, first_meta = shards[0]
    for folder, _, meta in shards[1:]:
        differences = meta.fingerprint.differences(first_meta.fingerprint)
        if differences:
            raise CollectError(
                f"{folder} and {first_folder} are not shards of one collection: "
                + "; ".join(differences)
            )
    parsed = [Shard.parse(meta.shard) for _, _, meta in shards]
    counts = {s.count for s in parsed}
    if len(counts) != 1:
        raise CollectError(f"shards of different splits: {', '.join(map(str, parsed))}")
    (n,) = counts
    seen: dict[int, Path] = {}
    for (folder, _, _), shard in zip(shards, parsed, strict=True):
        if shard.index in seen:
            raise CollectError(f"shard {shard} given twice: {seen[shard.index]} and {folder}")
        seen[shard.index] = folder
    missing = sorted(set(range(1, n + 1)) - set(seen))
    if missing:
        raise CollectError(f"missing shard(s) {', '.join(f'{i}/{n}' for i in missing)}")
    n_batches = first_meta.fingerprint.n_batches
    for folder, _, meta in shards:
        expected = Shard.parse(meta.shard).batches(n_batches)
        if sorted(meta.batches_done) != expected:
            raise RunFolderError(f"{folder}: its collector state does not cover its shard")
    return shards


def merge_runs(
    folders: list[Path],
    out: Path,
    tokenizer: Any,
    corpus: TokenizedCorpus,
    corpus_path: Path,
    overwrite: bool = False,
) -> RunInfo:
    """Merge the shard runs in ``folders`` into ``out``; ``corpus`` is the shards' corpus
    tokenized again with ``tokenizer`` (its hash is checked)."""
    if out.exists() and not overwrite:
        raise CollectError(f"{out}: already exists; pass --overwrite to replace it")
    shards = check_shards(folders)
    _, first_info, first_meta = shards[0]
    fingerprint = first_meta.fingerprint
    if file_sha256(corpus_path) != fingerprint.corpus_hash:
        raise CollectError(
            f"{corpus_path}: is not the corpus the shards were collected from (its hash differs)"
        )
    if tokens_hash(corpus) != fingerprint.tokens_hash:
        raise CollectError(
            f"{corpus_path}: tokenizes differently from when the shards were collected; "
            "use the same tokenizer (--tokenizer) and parameters"
        )
    device = torch.device("cpu")
    accs = load_accumulators(folders[0] / STATE_DIR, fingerprint.layers, device)
    for folder, _, _ in shards[1:]:
        for layer, acc in load_accumulators(folder / STATE_DIR, fingerprint.layers, device).items():
            accs[layer].combine(acc)
    features = pl.read_parquet(folders[0] / FEATURES)
    lenses = {
        layer: LogitLens.from_features(features.filter(pl.col("layer") == layer))
        for layer in fingerprint.layers
    }
    staging = partial_folder(out)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        info = write_run(
            staging,
            accs,
            Coverage(corpus, np.ones(corpus.n_sequences, dtype=bool)),
            lenses,
            vocabulary(tokenizer, _lens_vocabulary_size(lenses)),
            fingerprint.params,
            first_info.n_features_per_layer,
            Provenance(
                adapter_path=first_info.adapter_path,
                adapter_hash=fingerprint.adapter_hash,
                corpus_path=str(corpus_path),
                corpus_hash=fingerprint.corpus_hash,
                created_at=min(meta.created_at for _, _, meta in shards),
                unit=fingerprint.unit,
                source="merge",
                shard=None,
            ),
        )
        publish(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return info


def load_tokenizer(path_or_id: str) -> Any:
    """The shards' tokenizer, from the checkpoint folder recorded in run.json (loaded as
    ``collect`` loads it: ``adapters.tokenizer_loading``)."""
    from adapters.tokenizer_loading import load_tokenizer as load

    return load(path_or_id)


def _lens_vocabulary_size(lenses: dict[int, LogitLens]) -> int:
    """Token ids the lens refers to (the unembedding may have more rows than tokens)."""
    return 1 + max(
        int(max(lens.top_ids.max(initial=0), lens.bottom_ids.max(initial=0)))
        for lens in lenses.values()
    )
