"""A labeled run as Neuronpedia upload requests (``labeler export --format neuronpedia``).

Neuronpedia takes a custom source's features through ``POST /api/feature/upload-batch``
(header ``x-api-key``), at most 128 features per request. The export writes each request
body as a file, ready to send::

    OUT/
      model.json          body of POST /api/model/new: {id, layers, displayName}
      source-set.json     body of POST /api/source-set/new: {name, modelId, description};
                          it creates one source per layer, named {layer}-{source set}
      upload/batch-N.json bodies of POST /api/feature/upload-batch, N from 0, in layer and
                          index order: {modelId, source, features: [...]} (one layer each)
      lists.json          one Neuronpedia list per final category: bodies of
                          POST /api/list/new-with-features {name, description, features}

A feature is ``{index, density, topLogits, bottomLogits, explanations, activations}``:
``density`` is its activation frequency; the logit lens sides as ``{token, value}``, at most
20 each; one activation per kept example (its tokens and activations, at most 1,024 tokens),
with ``quantileMin``/``quantileMax`` the lowest and highest activation of the example's
group and ``quantileFraction`` the share of the feature's activating tokens the group stands
for (top examples: their number over the count; a quantile: one over the number of
quantiles; random examples carry none). Dead features and features without examples are
left out (the route needs at least one activation).

Neuronpedia keeps no categories or scores, so each judge's explanation (the final label's
judge first) carries them in its text, at most 512 characters::

    EXPLANATION [label: CATEGORY/SUBCATEGORY, MECHANISM, DOMAIN_TYPE; source: SOURCE;
    detection: 0.83]   (on one line)

where the label is the feature's final label (parts that are null left out), SOURCE is where
it came from (``human``, ``consensus``, ``single_judge``) and the detection accuracy is that
judge's; an explanation too long for the tag is cut and ends in ``…``.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl

from adapters.errors import UserError
from collectors.run_format import FEATURES, publish
from labeler.formats.catalog import LayerReader
from labeler.formats.circuit_tracer import staging_folder
from labeler.labeling.store import LabelStore
from labeler.reporting.disputes import DisputeRules
from labeler.reporting.summarize import no_labels
from labeler.run.data import RunData

MAX_FEATURES = 128  # per upload request
MAX_LOGITS = 20
MAX_TEXT = 512
MAX_TOKENS = 1024
UPLOAD_DIR = "upload"
MODEL_ID = re.compile(r"[a-z][a-z0-9.-]*[a-z0-9]|[a-z]")  # Neuronpedia's /api/model/new
SOURCE_SET = re.compile(r"[a-z][a-z0-9-]*[a-z0-9]|[a-z0-9]")  # and /api/source-set/new


def check_names(model_id: str, source_set: str) -> None:
    """UserError unless Neuronpedia accepts both names."""
    if not (2 <= len(model_id) <= 32 and MODEL_ID.fullmatch(model_id)) or any(
        d in model_id for d in ("--", "..")
    ):
        raise UserError(
            f"--model-id {model_id!r}: Neuronpedia takes 2 to 32 characters of a-z, 0-9, '.' "
            "and '-', starting with a letter and not ending in '.' or '-'"
        )
    if not SOURCE_SET.fullmatch(source_set) or "--" in source_set or source_set == "neurons":
        raise UserError(
            f"--source-set {source_set!r}: Neuronpedia takes a-z, 0-9 and '-', starting with "
            "a letter, not ending in '-', without '--' (and not 'neurons')"
        )


def label_tag(label: dict[str, Any], source: str, detection: float | None) -> str:
    """What an explanation's text carries after the explanation (see the module)."""
    name = label.get("category") or "unlabeled"
    if label.get("subcategory"):
        name += f"/{label['subcategory']}"
    parts = [name, *(str(label[k]) for k in ("mechanism", "domain_type") if label.get(k))]
    score = "n/a" if detection is None else f"{detection:.2f}"
    return f"[label: {', '.join(parts)}; source: {source}; detection: {score}]"


def explanation_text(explanation: str, tag: str) -> str:
    """``explanation`` and ``tag`` in at most MAX_TEXT characters, the explanation cut first."""
    room = MAX_TEXT - len(tag) - 1
    text = " ".join(explanation.split())
    if len(text) > room:
        text = text[: max(room - 1, 0)].rstrip() + "…"
    return f"{text} {tag}"


def _activations(examples: list[dict[str, Any]], count: int, n_quantiles: int) -> list[Any]:
    groups: dict[tuple[str, int | None], list[float]] = {}
    for example in examples:
        groups.setdefault((example["kind"], example["quantile"]), []).append(example["activation"])
    out = []
    for example in examples:
        key = (example["kind"], example["quantile"])
        entry: dict[str, Any] = {
            "tokens": example["tokens"][:MAX_TOKENS],
            "values": [float(v) for v in example["acts"][:MAX_TOKENS]],
        }
        if example["kind"] in ("top", "quantile"):
            group = groups[key]
            share = len(group) / max(count, 1) if example["kind"] == "top" else 1 / n_quantiles
            entry |= {"quantileMin": min(group), "quantileMax": max(group),
                      "quantileFraction": min(share, 1.0)}  # fmt: skip
        out.append(entry)
    return out


def _feature(line: dict[str, Any], n_quantiles: int) -> dict[str, Any] | None:
    """One feature of an upload request, from its catalog line; None when it has no examples."""
    if not line["examples"]:
        return None
    label, source = line["final_label"], line["label_source"]
    chosen = line["label_source_detail"] if source in ("consensus", "single_judge") else None
    judgments = sorted(
        (j for j in line["judgments"] if j["status"] == "ok" and j["explanation"]),
        key=lambda j: j["judge"] != chosen,
    )
    explanations = [
        {"text": explanation_text(
            j["explanation"],
            label_tag(label, source, (j["detection"] or {}).get("accuracy")),
        )}
        for j in judgments
    ]  # fmt: skip

    def logits(tokens: list[str] | None, values: list[float] | None) -> list[dict[str, Any]]:
        pairs = zip(tokens or [], values or [], strict=False)
        return [{"token": t, "value": float(v)} for t, v in list(pairs)[:MAX_LOGITS]]

    return {
        "index": line["index"],
        "density": min(max(float(line["activation_freq"] or 0.0), 0.0), 1.0),
        "topLogits": logits(line["top_logits"], line["top_logit_values"]),
        "bottomLogits": logits(line["bottom_logits"], line["bottom_logit_values"]),
        "explanations": explanations,
        "activations": _activations(line["examples"], line["activation_count"], n_quantiles),
    }


def export_neuronpedia(
    run: RunData,
    store: LabelStore,
    out: Path,
    model_id: str,
    source_set: str,
    overwrite: bool = False,
    rules: DisputeRules | None = None,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Write the upload folder (see the module) to ``out``, whole or not at all; returns the
    number of features in it. ``progress`` is told each layer's planned features."""
    check_names(model_id, source_set)
    for table in ("planned", "judgments"):
        if store.conn.execute(f"SELECT 1 FROM {table} LIMIT 1").fetchone() is None:
            raise no_labels(store)
    staging = staging_folder(out, overwrite)
    try:
        written = _write(run, store, staging, model_id, source_set, rules, progress)
        publish(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return written


def _write(
    run: RunData,
    store: LabelStore,
    folder: Path,
    model_id: str,
    source_set: str,
    rules: DisputeRules | None,
    progress: Callable[[int], None] | None,
) -> int:
    layers = sorted(int(r[0]) for r in store.conn.execute("SELECT DISTINCT layer FROM planned"))
    n_layers = max(run.info.layers) + 1 if run.info.layers else 1
    reader = LayerReader(run, store, rules or DisputeRules(), True, {"run": str(run.folder)}, None)
    n_quantiles = max(run.info.params.n_quantiles, 1)
    (folder / UPLOAD_DIR).mkdir()
    lists: dict[str, list[dict[str, Any]]] = {}
    batch = written = 0
    for layer in layers:
        source = f"{layer}-{source_set}"
        lines = reader.lines(layer)
        bottom = dict(
            pl.scan_parquet(run.folder / FEATURES)
            .filter(pl.col("layer") == layer)
            .select("index", "bottom_logit_values")
            .collect()
            .iter_rows()
        )
        features = []
        for line in lines.iter_rows(named=True):
            line["bottom_logit_values"] = bottom.get(line["index"])
            feature = _feature(line, n_quantiles)
            if feature is None:
                continue
            features.append(feature)
            category = line["final_label"]["category"] or "unlabeled"
            description = feature["explanations"][0]["text"] if feature["explanations"] else ""
            lists.setdefault(category, []).append(
                {"modelId": model_id, "layer": source, "index": line["index"],
                 "description": description}
            )  # fmt: skip
        for start in range(0, len(features), MAX_FEATURES):
            body = {"modelId": model_id, "source": source,
                    "features": features[start : start + MAX_FEATURES]}  # fmt: skip
            text = json.dumps(body, ensure_ascii=False, allow_nan=False)
            (folder / UPLOAD_DIR / f"batch-{batch}.json").write_text(text, encoding="utf-8")
            batch += 1
        written += len(features)
        if progress is not None:
            progress(lines.height)
    description = f"transcoder adapter features labeled from {run.folder.name}"
    _dump(folder / "model.json", {"id": model_id, "layers": n_layers, "displayName": model_id})
    _dump(folder / "source-set.json",
          {"name": source_set, "modelId": model_id, "description": description[:128]})  # fmt: skip
    _dump(folder / "lists.json", [
        {"name": f"{source_set}: {category}",
         "description": f"features whose final label is {category}", "features": members}
        for category, members in sorted(lists.items())
    ])  # fmt: skip
    return written


def _dump(path: Path, data: object) -> None:
    path.write_text(json.dumps(data, ensure_ascii=False, allow_nan=False), encoding="utf-8")
