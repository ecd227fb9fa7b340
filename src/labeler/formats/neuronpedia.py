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
judge first) carries them in its text, at most 512 UTF-16 code units (Neuronpedia measures a
text as JavaScript does: a character beyond the Basic Multilingual Plane, such as a math
italic letter, counts two)::

    EXPLANATION [label: CATEGORY/SUBCATEGORY, MECHANISM, DOMAIN_TYPE; source: SOURCE;
    detection: 0.83]   (on one line)

where the label is the feature's final label (parts that are null left out), SOURCE is where
it came from (``human``, ``consensus``, ``single_judge``) and the detection accuracy is that
judge's; an explanation too long for the tag is cut between characters and ends in ``…``.

Neuronpedia requires every token to be a non-empty string, so an empty token (a special
token decoded to nothing) is written as EMPTY_TOKEN, ``␀``, in activations and logit lists.
"""

from __future__ import annotations

import json
import re
import shutil
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import polars as pl

from collectors.run_format import FEATURES, publish
from labeler.errors import UserError
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
EMPTY_TOKEN = "\u2400"  # ␀ (SYMBOL FOR NULL): what an empty token is written as
UPLOAD_DIR = "upload"
IMPORT_DIR = "import"
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


def utf16_units(text: str) -> int:
    """The length of ``text`` as Neuronpedia checks it (a JavaScript string's): UTF-16 code
    units, two for each character beyond the Basic Multilingual Plane."""
    return len(text.encode("utf-16-le", "surrogatepass")) // 2


def shorten(text: str, limit: int = MAX_TEXT) -> str:
    """``text`` if it is at most ``limit`` UTF-16 code units, else as much of it as fits
    with ``…`` after it. The cut falls between characters (Python's are code points), so it
    never splits a surrogate pair."""
    if len(text) * 2 <= limit or utf16_units(text) <= limit:
        return text
    units = 0
    for end, char in enumerate(text):
        units += 2 if ord(char) > 0xFFFF else 1
        if units > limit - 1:  # one unit left for the ellipsis
            return text[:end].rstrip() + "…"
    return text  # not reached: the text is longer than the limit


def shorten_all(texts: pl.Series, limit: int = MAX_TEXT) -> pl.Series:
    """Each of ``texts`` through ``shorten``; only those over ``limit // 2`` characters can
    be too long, so only they are looked at one by one."""
    long = (texts.str.len_chars() > limit // 2).fill_null(False)
    if not long.any():
        return texts
    values = texts.to_list()
    for i in long.arg_true().to_list():
        values[i] = shorten(values[i], limit)
    return pl.Series(texts.name, values, dtype=pl.String)


def visible(token: pl.Expr) -> pl.Expr:
    """``token`` (a string expression), EMPTY_TOKEN where it is empty or null."""
    return pl.when(token.fill_null("") == "").then(pl.lit(EMPTY_TOKEN)).otherwise(token)


def visible_tokens(tokens: pl.Expr) -> pl.Expr:
    """A list of tokens with each empty one written as EMPTY_TOKEN."""
    return tokens.list.eval(visible(pl.element()))


def explanation_text(explanation: str, tag: str) -> str:
    """``explanation`` and ``tag`` in at most MAX_TEXT UTF-16 code units, the explanation
    cut first."""
    room = MAX_TEXT - utf16_units(tag) - 1
    return f"{shorten(' '.join(explanation.split()), max(room, 1))} {tag}"


def _pairs(frame: pl.DataFrame, tokens: str, values: str, name: str) -> pl.DataFrame:
    """The logit lens side ``tokens``/``values`` as ``[{token, value}]``, at most
    MAX_LOGITS, by feature index (features without one left out)."""
    empty = pl.lit([], dtype=pl.List(pl.String))
    lists = frame.select(
        "index",
        pl.col(tokens).fill_null(empty),
        pl.col(values).fill_null(pl.lit([], dtype=pl.List(pl.Float64))).cast(pl.List(pl.Float64)),
    )
    n = pl.min_horizontal(pl.col(tokens).list.len(), pl.col(values).list.len(), MAX_LOGITS)
    return (
        lists.with_columns(pl.col(tokens).list.head(n), pl.col(values).list.head(n))
        .explode(tokens, values)
        .drop_nulls(tokens)
        .with_columns(visible(pl.col(tokens)).alias(tokens))
        .group_by("index", maintain_order=True)
        .agg(pl.struct(pl.col(tokens).alias("token"), pl.col(values).alias("value")).alias(name))
    )


def group_fields(n_quantiles: int) -> tuple[pl.Expr, pl.Expr, pl.Expr]:
    """Over examples exploded with their feature's ``index`` and ``activation_count``: the
    lowest and highest activation of each example's group (its feature's top examples, or
    one quantile) and the share of the feature's activating tokens the group stands for
    (top: their number over the count; a quantile: one over the number of quantiles);
    null for random examples, which stand for no group."""
    group = ["index", "kind", "quantile"]
    grouped = pl.col("kind").is_in(["top", "quantile"])
    share = (
        pl.when(pl.col("kind") == "top")
        .then(pl.len().over(group) / pl.max_horizontal(pl.col("activation_count"), 1))
        .otherwise(1 / n_quantiles)
        .clip(upper_bound=1.0)
        .cast(pl.Float64)
    )
    return (
        pl.when(grouped).then(pl.col("activation").min().over(group)),
        pl.when(grouped).then(pl.col("activation").max().over(group)),
        pl.when(grouped).then(share),
    )


def _activation_lists(lines: pl.DataFrame, n_quantiles: int) -> pl.DataFrame:
    """One activation per kept example, in the catalog's order, by feature index (see
    the module for the quantile fields)."""
    examples = (
        lines.select("index", "activation_count", "examples")
        .explode("examples")
        .drop_nulls("examples")
        .unnest("examples")
    )
    low, high, share = group_fields(n_quantiles)
    entry = pl.struct(
        visible_tokens(pl.col("tokens").list.head(MAX_TOKENS)),
        pl.col("acts").list.head(MAX_TOKENS).cast(pl.List(pl.Float64)).alias("values"),
        low.alias("quantileMin"),
        high.alias("quantileMax"),
        share.alias("quantileFraction"),
    )
    return examples.group_by("index", maintain_order=True).agg(entry.alias("activations"))


def _explanation_lists(lines: pl.DataFrame) -> pl.DataFrame:
    """Each feature's judges' explanations, the final label's judge first, their text
    carrying the label tag (see the module), by feature index."""
    chosen = pl.when(pl.col("label_source").is_in(["consensus", "single_judge"])).then(
        pl.col("label_source_detail")
    )
    judged = (
        lines.select("index", "final_label", "label_source", "label_source_detail", "judgments")
        .explode("judgments")
        .drop_nulls("judgments")
        .unnest("judgments")
        .filter(
            (pl.col("status") == "ok")
            & pl.col("explanation").is_not_null()
            & (pl.col("explanation") != "")
        )
        .with_columns((pl.col("judge") != chosen).fill_null(True).alias("_later"))
        .sort("index", "_later", maintain_order=True)
        .select(
            "index",
            "final_label",
            "label_source",
            "explanation",
            pl.col("detection").struct.field("accuracy"),
        )
    )
    texts = [
        explanation_text(explanation, label_tag(label, source, accuracy))
        for _, label, source, explanation, accuracy in judged.iter_rows()
    ]
    return (
        judged.select("index", pl.Series("text", texts, dtype=pl.String))
        .group_by("index", maintain_order=True)
        .agg(pl.struct("text").alias("explanations"))
    )


def layer_features(lines: pl.DataFrame, bottom: pl.DataFrame, n_quantiles: int) -> pl.DataFrame:
    """The upload features of one layer's catalog lines (with examples), by index: those
    with at least one example. ``bottom``: index and bottom_logit_values of the layer."""
    lines = lines.filter(pl.col("examples").list.len() > 0).join(
        bottom, on="index", how="left", maintain_order="left"
    )
    features = lines.select(
        "index",
        pl.col("activation_freq").fill_null(0.0).clip(0.0, 1.0).alias("density"),
    )
    parts = [
        _pairs(lines, "top_logits", "top_logit_values", "topLogits"),
        _pairs(lines, "bottom_logits", "bottom_logit_values", "bottomLogits"),
        _explanation_lists(lines),
        _activation_lists(lines, n_quantiles),
    ]
    for part in parts:
        features = features.join(part, on="index", how="left", maintain_order="left")
    empty = {name: pl.col(name).fill_null(pl.lit([], dtype=features.schema[name]))
             for name in ("topLogits", "bottomLogits", "explanations")}  # fmt: skip
    return features.with_columns(**empty)


# Random examples stand for no group: their quantile fields are left out, not null.
_NO_GROUP = b',"quantileMin":null,"quantileMax":null,"quantileFraction":null'


def upload_body(model_id: str, source: str, features: pl.DataFrame) -> bytes:
    """The JSON body of one upload request: ``features`` (from ``layer_features``)
    written by polars, one object each, in one array."""
    head = json.dumps({"modelId": model_id, "source": source}, ensure_ascii=False)[:-1]
    rows = features.write_ndjson().encode("utf-8").replace(_NO_GROUP, b"").splitlines()
    return head.encode("utf-8") + b', "features": [' + b",".join(rows) + b"]}"


LAYOUTS = ("both", "api", "import")


def export_neuronpedia(
    run: RunData,
    store: LabelStore,
    out: Path,
    model_id: str,
    source_set: str,
    overwrite: bool = False,
    rules: DisputeRules | None = None,
    progress: Callable[[int], None] | None = None,
    layout: str = "both",
) -> int:
    """Write the upload requests (see the module) and, under ``import/``, the bulk-import
    layout (``labeler.formats.neuronpedia_import``) to ``out``, or one of them (``layout``
    api or import), whole or not at all; returns the number of features. ``progress`` is
    told each layer's planned features, once per layout written."""
    if layout not in LAYOUTS:
        raise UserError(f"--layout {layout!r}: use one of {', '.join(LAYOUTS)}")
    check_names(model_id, source_set)
    for table in ("planned", "judgments"):
        if store.conn.execute(f"SELECT 1 FROM {table} LIMIT 1").fetchone() is None:
            raise no_labels(store)
    staging = staging_folder(out, overwrite)
    try:
        written = 0
        if layout in ("both", "api"):
            written = _write(run, store, staging, model_id, source_set, rules, progress)
        if layout in ("both", "import"):
            # imported here: the import layout builds on this module's tags
            from labeler.formats.neuronpedia_import import write_import_layout

            (staging / IMPORT_DIR).mkdir()
            written = write_import_layout(run, store, staging / IMPORT_DIR, model_id,
                                          source_set, rules, progress)  # fmt: skip
        publish(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return written


PREPARING = 2  # layers prepared ahead on worker threads (polars releases the GIL)


def _prepare(
    run: RunData, reader: LayerReader, layer: int, model_id: str, source: str, n_quantiles: int
) -> tuple[int, list[bytes], list[tuple[int, str, str | None]]]:
    """One layer: its planned features, its upload bodies and, per feature written, its
    index, first explanation and final category."""
    lines = reader.lines(layer)
    bottom = (
        pl.scan_parquet(run.folder / FEATURES)
        .filter(pl.col("layer") == layer)
        .select("index", "bottom_logit_values")
        .collect()
    )
    features = layer_features(lines, bottom, n_quantiles)
    bodies = [
        upload_body(model_id, source, features.slice(start, MAX_FEATURES))
        for start in range(0, features.height, MAX_FEATURES)
    ]
    first = pl.col("explanations").list.first().struct.field("text").fill_null("")
    described = features.select("index", first.alias("description")).join(
        lines.select("index", pl.col("final_label").struct.field("category")),
        on="index", how="left", maintain_order="left",
    )  # fmt: skip
    return lines.height, bodies, list(described.iter_rows())


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

    def prepare(layer: int) -> Future[tuple[int, list[bytes], list[tuple[int, str, str | None]]]]:
        source = f"{layer}-{source_set}"
        return pool.submit(_prepare, run, reader, layer, model_id, source, n_quantiles)

    with ThreadPoolExecutor(PREPARING, "neuronpedia-layer") as pool:
        pending = deque(prepare(layer) for layer in layers[:PREPARING])
        for i, layer in enumerate(layers):
            planned, bodies, described = pending.popleft().result()
            if i + PREPARING < len(layers):
                pending.append(prepare(layers[i + PREPARING]))
            for body in bodies:
                (folder / UPLOAD_DIR / f"batch-{batch}.json").write_bytes(body)
                batch += 1
            for index, description, category in described:
                lists.setdefault(category or "unlabeled", []).append(
                    {"modelId": model_id, "layer": f"{layer}-{source_set}", "index": index,
                     "description": description}
                )  # fmt: skip
            written += len(described)
            if progress is not None:
                progress(planned)
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
