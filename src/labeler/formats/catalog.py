"""The labeled feature catalog as JSONL (schema: docs/catalog-schema.md).

Built with polars a layer at a time: a feature's final label and disputes depend on its
own judgments and reviews only, so each layer's lines (judgments, labels, disputes,
reviews, logit lens, examples) are built on their own, on worker threads, while the main
thread writes the layer before. Memory is bounded by a few layers and both cores are
kept busy.
"""

from __future__ import annotations

import datetime as dt
import os
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from adapters.outputs import writing
from labeler.labeling.store import LabelStore
from labeler.reporting.catalog_lines import OUTPUT_SCORE, LayerReader
from labeler.reporting.disputes import DisputeRules
from labeler.reporting.summarize import no_labels
from labeler.run.data import RunData

__all__ = ["GZIP_LEVEL", "OUTPUT_SCORE", "PREPARING", "LayerReader", "export_catalog"]

PREPARING = 2  # layers prepared ahead, on as many threads, while one is written
# gzip's fastest level by default: a catalog with examples shrinks about 2.9 times at
# level 1 and 4.4 times at 6, which takes twice as long.
GZIP_LEVEL = 1


def export_catalog(
    run: RunData,
    store: LabelStore,
    out: Path,
    with_examples: bool,
    rules: DisputeRules | None = None,
    progress: Callable[[int], None] | None = None,
    gzip_level: int = GZIP_LEVEL,
) -> int:
    """Write the catalog to ``out`` (.jsonl, or gzip with .gz at ``gzip_level``)
    atomically; returns the lines written. ``progress`` is told the features of each
    layer as it is written."""
    for table in ("planned", "judgments"):
        if store.conn.execute(f"SELECT 1 FROM {table} LIMIT 1").fetchone() is None:
            raise no_labels(store)
    layers = sorted(int(r[0]) for r in store.conn.execute("SELECT DISTINCT layer FROM planned"))
    provenance = {
        "run": str(run.folder),
        "adapter_hash": run.info.adapter_hash,
        "corpus_hash": run.info.corpus_hash,
        "unit": run.info.unit,
        "exported_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    gzipped = out.name.endswith(".gz")
    reader = LayerReader(
        run, store, rules or DisputeRules(), with_examples, provenance,
        gzip_level if gzipped else None,
    )  # fmt: skip
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    written = 0
    try:
        with (
            writing(out),
            ThreadPoolExecutor(PREPARING, "catalog-layer") as pool,
            tmp.open("wb") as fh,
        ):
            pending = deque(pool.submit(reader.prepare, layer) for layer in layers[:PREPARING])
            for i in range(len(layers)):
                rows, lines = pending.popleft().result()
                if i + PREPARING < len(layers):
                    pending.append(pool.submit(reader.prepare, layers[i + PREPARING]))
                if isinstance(lines, bytes):
                    fh.write(lines)
                else:
                    lines.write_ndjson(fh)
                written += rows
                if progress is not None:
                    progress(rows)
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return written
