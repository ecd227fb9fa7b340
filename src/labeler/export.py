"""The labeled feature catalog as JSONL (schema: docs/catalog-schema.md)."""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from labeler.run_data import RunData
from labeler.schemas import CATALOG_SCHEMA_VERSION
from labeler.store import LabelStore, StoredJudgment
from labeler.summarize import pick_judge


def catalog_lines(
    run: RunData, store: LabelStore, judge: str, with_examples: bool
) -> Iterator[dict[str, Any]]:
    planned = store.planned()
    stored = store.judgments(judge)
    ids = [fid for fid, _, _ in planned]
    features = {r["feature_id"]: r for r in run.features.iter_rows(named=True)}
    examples = run.examples_for(ids) if with_examples else {}
    for fid, layer, index in planned:
        row = features[fid]
        line: dict[str, Any] = {
            "schema_version": CATALOG_SCHEMA_VERSION,
            "feature_id": fid,
            "layer": layer,
            "index": index,
            "activation_freq": row["frequency"],
            "activation_count": row["count"],
            "judge": judge,
        }
        line |= _label_fields(stored.get(fid))
        line["top_logits"] = row["top_logits"]
        line["bottom_logits"] = row["bottom_logits"]
        line["provenance"] = {
            "run": str(run.folder),
            "adapter_hash": run.info.adapter_hash,
            "corpus_hash": run.info.corpus_hash,
        }
        if with_examples:
            line["examples"] = [e.model_dump() for e in examples[fid]]
        yield line


def _label_fields(stored: StoredJudgment | None) -> dict[str, Any]:
    empty: dict[str, Any] = {
        "status": "unlabeled", "failure_reason": None, "explanation": None, "category": None,
        "subcategory": None, "mechanism": None, "domain_type": None, "confidence": None,
        "rationale": None, "detection": None, "prompt_hash": None,
    }  # fmt: skip
    if stored is None:
        return empty
    if stored.status == "failed" or stored.judgment is None:
        return empty | {"status": "failed", "failure_reason": stored.reason}
    j = stored.judgment
    c = j.classification
    return empty | {
        "status": "labeled",
        "explanation": j.explanation,
        "category": c.category,
        "subcategory": c.subcategory,
        "mechanism": c.mechanism,
        "domain_type": c.domain_type,
        "confidence": c.confidence,
        "rationale": c.rationale,
        "detection": {
            "accuracy": j.detection.accuracy,
            "precision": j.detection.precision,
            "recall": j.detection.recall,
            "by_set": {k: v.model_dump() for k, v in j.detection_by_set.items()},
        },
        "prompt_hash": j.prompt_hash,
    }


def export_catalog(
    run: RunData, store: LabelStore, out: Path, judge: str | None, with_examples: bool
) -> int:
    """Write the catalog to ``out`` (.jsonl or .jsonl.gz) atomically; returns lines written."""
    judge = pick_judge(store, judge)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    count = 0
    fh: IO[str]
    with (
        gzip.open(tmp, "wt", encoding="utf-8")
        if out.name.endswith(".gz")
        else tmp.open("w", encoding="utf-8")
    ) as fh:
        for line in catalog_lines(run, store, judge, with_examples):
            fh.write(json.dumps(line, ensure_ascii=False) + "\n")
            count += 1
    tmp.replace(out)
    return count
