"""A detection score over positives only is no score: a feature whose sampled
non-activating examples are empty shows its detection as missing, with the reason, in
the catalog, the summary and the catalog browser's JSON, never as 1.00."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from labeler.labeling.store import LabelStore
from labeler.reporting.disputes import DisputeRules
from labeler.review.catalog_index import CatalogIndex, CatalogQuery
from labeler.run.data import RunData
from tests.test_bad_input import labeler

NO_NEGATIVES = "no negatives"


def _without_negatives(run: Path) -> str:
    """Mark the first alive feature of layer 1 active in every negative window, so that no
    window is left to test its explanation against; its id."""
    data = RunData.open(run)
    first = data.alive().filter(pl.col("layer") == 1).sort("index")
    fid, layer, index = first.select("feature_id", "layer", "index").row(0)
    global_index = int(layer) * data.info.n_features_per_layer + int(index)
    path = data.folder / "negatives.parquet"
    negatives = pl.read_parquet(path)
    dtype = negatives.schema["active_features"]
    negatives = negatives.with_columns(
        pl.col("active_features").list.concat(pl.lit([global_index], dtype=dtype))
    )
    negatives.write_parquet(path)
    changed = RunData.open(run)
    assert not changed.negative_snippets(changed.records([fid])[0], 5, 0)
    return str(fid)


@pytest.fixture
def labeled(run_copy: Path) -> tuple[Path, str]:
    fid = _without_negatives(run_copy)
    result = labeler("label", run_copy, "--judge", "heuristic")
    assert result.returncode == 0, result.stderr
    return run_copy, fid


def _catalog(run: Path, tmp: Path) -> dict[str, dict[str, Any]]:
    out = tmp / "catalog.jsonl"
    result = labeler("export", run, "--out", out)
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    return {line["feature_id"]: line for line in lines}


def test_detection_without_negatives_is_missing_everywhere(
    labeled: tuple[Path, str], tmp_path: Path
) -> None:
    run, fid = labeled
    store = LabelStore(run / "labels.sqlite")
    try:
        stored = store.judgments("heuristic")[fid]
        assert stored.status == "ok"
    finally:
        store.close()
    catalog = _catalog(run, tmp_path)
    (judgment,) = catalog[fid]["judgments"]
    detection = judgment["detection"]
    assert detection["accuracy"] is None and detection["precision"] is None
    assert detection["recall"] is None
    assert NO_NEGATIVES in detection["undefined"]
    # missing exactly where a feature had no negatives (the planted one, and the demo's
    # features dense enough to be active in every window of the pool), scored elsewhere
    scored = {f: line["judgments"][0]["detection"] for f, line in catalog.items()}
    assert len(scored) == 960
    negatives = {f: sum(s["n_negative"] for s in d["by_set"].values()) for f, d in scored.items()}
    undefined = sorted(f for f, n in negatives.items() if n == 0)
    assert fid in undefined and len(undefined) < 20
    assert sorted(f for f, d in scored.items() if d["accuracy"] is None) == undefined
    assert all(NO_NEGATIVES in scored[f]["undefined"] for f in undefined)
    assert all(d["undefined"] is None for f, d in scored.items() if f not in undefined)

    summary = labeler("summarize", run, "--json")
    assert summary.returncode == 0, summary.stderr
    (heuristic,) = [j for j in json.loads(summary.stdout)["judges"] if j["rater"] == "heuristic"]
    assert heuristic["n_detection_undefined"] == len(undefined)
    text = labeler("summarize", run)
    assert text.returncode == 0, text.stderr
    said = " ".join(text.stdout.split())
    n = len(undefined)
    assert f"detection undefined for {n} features (heuristic: {n})" in said

    layer = int(fid[1 : fid.index("F")])
    with tempfile.TemporaryDirectory() as folder:
        index = CatalogIndex(RunData.open(run), run / "labels.sqlite", DisputeRules(),
                             Path(folder) / "index.sqlite")  # fmt: skip
        try:
            answer = index.query(CatalogQuery(layer=layer, per_page=500))
        finally:
            index.close()
    shown = {row["feature_id"]: row["detection"] for row in answer["features"]}
    assert len(shown) == 240
    in_layer = [f for f in undefined if f.startswith(f"L{layer}F")]
    assert sorted(f for f, d in shown.items() if d is None) == in_layer
