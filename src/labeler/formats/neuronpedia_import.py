"""A labeled run in Neuronpedia's bulk-import layout (docs/neuronpedia.md, "Bulk-import layout").

Neuronpedia's admin importer (``GET /api/admin/import?modelId=M&sourceId=S``) reads the
folders that its own exporter (``neuronpedia_utils``) writes, one per source::

    FOLDER/MODEL_ID/{layer}-{source set}/
      release.jsonl   model.jsonl   sourceset.jsonl   source.jsonl   one line each
      features/batch-N.jsonl.gz      "Neuron" rows, 1,024 features per file, N from 0
      activations/batch-N.jsonl.gz   the activations of the features of features/batch-N
      explanations/batch-N.jsonl.gz  1,024 "Explanation" rows per file

gzip at level 5, rows in index order. The importer creates the release, model, source set and
source through Prisma (so their keys are exactly the table's fields) and inserts the batches
with ``jsonb_to_recordset``, taking the column list from a file's first line: every line of a
file has the same keys in the same order, a null is written into its column (so columns that
may not be null get a value, arrays ``[]``), and rows whose id exists already are skipped.

Per-feature data comes from the catalog lines (``LayerReader``); dead features and features
without examples are left out, as the upload layout does. Neuronpedia keeps no categories or
scores, so each explanation's ``notes`` carry the judge and the label tag of the upload layout:
``[judge: NAME] [label: ...; source: ...; detection: ...]``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import polars as pl

from collectors.run_format import FEATURES
from labeler.formats.catalog import LayerReader
from labeler.formats.neuronpedia import (
    MAX_TOKENS,
    group_fields,
    label_tag,
    shorten_all,
    visible_tokens,
)
from labeler.labeling.store import LabelStore
from labeler.reporting.disputes import DisputeRules
from labeler.run.data import RunData

BATCH_ROWS = 1024  # features (and explanations) per batch file, as Neuronpedia's exporter
GZIP_LEVEL = 5  # as Neuronpedia's exporter compresses
CREATOR_ID = "clkht01d40000jv08hvalcvly"  # the bot user every Neuronpedia database is seeded with
CREATOR_NAME = "transcoder-labeler"
VISIBILITY = "PUBLIC"
STEER_STRENGTH = 10.0  # Neuronpedia's default vectorDefaultSteerStrength
WORKERS = 2  # layers written at once

_FLOATS = pl.List(pl.Float64)
_FLOAT32S = pl.List(pl.Float32)  # what the run keeps activations and logit values as
_INTS = pl.List(pl.Int64)
_STRINGS = pl.List(pl.String)
_LABEL = {"label_category": "category", "label_subcategory": "subcategory",
          "label_mechanism": "mechanism", "label_domain_type": "domain_type"}  # fmt: skip


def write_import_layout(
    run: RunData,
    store: LabelStore,
    folder: Path,
    model_id: str,
    source_set: str,
    rules: DisputeRules | None = None,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Write the layout (see the module) into the existing empty directory ``folder``;
    returns the number of features written. ``progress`` is told each layer's planned
    features, in layer order. Names are not checked here (``neuronpedia.check_names``)."""
    layers = sorted(int(r[0]) for r in store.conn.execute("SELECT DISTINCT layer FROM planned"))
    reader = LayerReader(run, store, rules or DisputeRules(), True, {"run": str(run.folder)}, None)
    writer = _LayerWriter(run, reader, folder / model_id, model_id, source_set, layers)
    written = 0
    with ThreadPoolExecutor(WORKERS, "neuronpedia-import") as pool:
        futures = [pool.submit(writer.write, layer) for layer in layers]
        try:
            for future in futures:
                planned, features = future.result()
                written += features
                if progress is not None:
                    progress(planned)
        except BaseException:
            for future in futures:
                future.cancel()
            raise
    return written


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")


def _id_prefix(model_id: str, source_set: str, table: str) -> str:
    """The first 10 characters of the table's row ids for this source set: ``c`` and 9 hex
    digits of a hash, so that ids of other exports do not collide with these."""
    digest = hashlib.sha256(f"{model_id}/{source_set}/{table}".encode()).hexdigest()
    return "c" + digest[:9]


def _row_id(prefix: str, layer: int, ordinal: str) -> pl.Expr:
    """25 characters, stable across re-exports: the prefix, the layer (3 digits), the feature
    index (8) and ``ordinal`` (4): the row's position among the feature's rows."""
    return pl.concat_str(
        pl.lit(f"{prefix}{layer:03d}"),
        pl.col("index").cast(pl.String).str.zfill(8),
        pl.col(ordinal).cast(pl.String).str.zfill(4),
    )


class _LayerWriter:
    def __init__(
        self,
        run: RunData,
        reader: LayerReader,
        root: Path,
        model_id: str,
        source_set: str,
        layers: list[int],
    ) -> None:
        self.run, self.reader, self.root = run, reader, root
        self.model_id, self.source_set = model_id, source_set
        self.n_quantiles = max(run.info.params.n_quantiles, 1)
        self.created = _now()
        self.release_name = f"{model_id}-{source_set}"
        self.activation_prefix = _id_prefix(model_id, source_set, "activation")
        self.explanation_prefix = _id_prefix(model_id, source_set, "explanation")
        self.metadata = self._metadata(layers)

    def _metadata(self, layers: list[int]) -> dict[str, dict[str, Any]]:
        info, created = self.run.info, self.created
        description = f"transcoder adapter features labeled from {self.run.folder.name}"
        release = {
            "name": self.release_name, "description": description,
            "creatorName": CREATOR_NAME, "creatorId": CREATOR_ID, "visibility": VISIBILITY,
            "isNewUi": False, "featured": False, "descriptionShort": description[:128],
            "urls": [], "creatorEmail": None, "creatorNameShort": CREATOR_NAME,
            "defaultSourceSetName": self.source_set,
            "defaultSourceId": f"{layers[0]}-{self.source_set}" if layers else None,
            "defaultUmapSourceIds": [], "createdAt": created,
        }  # fmt: skip
        # defaultSourceSetName and defaultSourceId of a model reference a source set and a
        # source, which the importer creates after the model: null. The adapters sit in
        # chat-tuned reasoning models: instruct. No inference server serves them.
        model = {
            "id": self.model_id, "instruct": True, "creatorId": CREATOR_ID,
            "displayNameShort": self.model_id, "displayName": self.model_id, "tlensId": None,
            "dimension": None, "visibility": VISIBILITY, "defaultSourceSetName": None,
            "defaultSourceId": None, "inferenceEnabled": False,
            "layers": max(info.layers) + 1 if info.layers else 1,
            "neuronsPerLayer": info.n_features_per_layer, "createdAt": created,
            "owner": CREATOR_NAME, "updatedAt": created, "website": None,
        }  # fmt: skip
        source_set = {
            "modelId": self.model_id, "name": self.source_set, "creatorId": CREATOR_ID,
            "hasDashboards": True, "visibility": VISIBILITY, "description": description[:128],
            "type": "", "creatorName": CREATOR_NAME, "urls": [], "creatorEmail": None,
            "releaseName": self.release_name, "defaultOfModelId": None, "defaultRange": 1,
            "defaultShowBreaks": True, "showDfa": False, "showCorrelated": False,
            "showHeadAttribution": False, "showUmap": False, "createdAt": created,
        }  # fmt: skip
        return {"release": release, "model": model, "sourceset": source_set}

    def _source(self, source: str) -> dict[str, Any]:
        info = self.run.info
        return {
            "id": source, "modelId": self.model_id, "setName": self.source_set,
            "creatorId": CREATOR_ID, "hasDashboards": True, "inferenceEnabled": False,
            "inferenceHosts": [], "saelensConfig": None, "saelensRelease": None,
            "saelensSaeId": None, "hfRepoId": None, "hfFolderId": None,
            "visibility": VISIBILITY, "defaultOfModelId": None, "hasUmap": False,
            "hasUmapLogSparsity": False, "hasUmapClusters": False,
            "num_prompts": info.n_sequences, "num_tokens_in_prompt": info.params.max_length,
            "dataset": Path(info.corpus_path).name,
            "notes": f"adapter sha256 {info.adapter_hash}; corpus sha256 {info.corpus_hash}; "
                     f"unit {info.unit}",
            "createdAt": self.created,
        }  # fmt: skip

    def write(self, layer: int) -> tuple[int, int]:
        """Write one layer's folder; returns its planned and written feature counts."""
        source = f"{layer}-{self.source_set}"
        out = self.root / source
        for sub in ("features", "activations", "explanations"):
            (out / sub).mkdir(parents=True)
        for name, line in (*self.metadata.items(), ("source", self._source(source))):
            text = json.dumps(line, ensure_ascii=False, allow_nan=False)
            (out / f"{name}.jsonl").write_text(text + "\n", encoding="utf-8")
        lines = self.reader.lines(layer)
        lens = (
            pl.scan_parquet(self.run.folder / FEATURES)
            .filter(pl.col("layer") == layer)
            .select("index", "act_max", "bottom_logit_values")
            .collect()
        )
        part = lines.filter(pl.col("examples").list.len() > 0).join(
            lens, on="index", how="left", maintain_order="left"
        )
        for n, start in enumerate(range(0, part.height, BATCH_ROWS)):
            chunk = part.slice(start, BATCH_ROWS)
            _write(self._features(chunk, source), out / "features" / f"batch-{n}.jsonl.gz")
            _write(self._activations(chunk, layer, source),
                   out / "activations" / f"batch-{n}.jsonl.gz")  # fmt: skip
        explanations = self._explanations(part, layer, source)
        for n, start in enumerate(range(0, explanations.height, BATCH_ROWS)):
            _write(explanations.slice(start, BATCH_ROWS),
                   out / "explanations" / f"batch-{n}.jsonl.gz")  # fmt: skip
        return lines.height, part.height

    def _common(self, source: str) -> list[pl.Expr]:
        return [
            pl.lit(self.model_id).alias("modelId"),
            pl.lit(source).alias("layer"),
            pl.col("index").cast(pl.String),
        ]

    def _features(self, part: pl.DataFrame, source: str) -> pl.DataFrame:
        floats, ints = pl.lit([], dtype=_FLOATS), pl.lit([], dtype=_INTS)
        empty = pl.lit([], dtype=_STRINGS)
        return part.select(
            *self._common(source),
            pl.lit(CREATOR_ID).alias("creatorId"),
            pl.lit(self.created).alias("createdAt"),
            pl.col("act_max").fill_null(0.0).alias("maxActApprox"),
            pl.lit(False).alias("hasVector"),
            floats.alias("vector"),
            pl.lit(None, pl.String).alias("vectorLabel"),
            pl.lit(STEER_STRENGTH).alias("vectorDefaultSteerStrength"),
            pl.lit(None, pl.String).alias("hookName"),
            ints.alias("topkCosSimIndices"),
            floats.alias("topkCosSimValues"),
            ints.alias("neuron_alignment_indices"),
            floats.alias("neuron_alignment_values"),
            floats.alias("neuron_alignment_l1"),
            ints.alias("correlated_neurons_indices"),
            floats.alias("correlated_neurons_pearson"),
            floats.alias("correlated_neurons_l1"),
            ints.alias("correlated_features_indices"),
            floats.alias("correlated_features_pearson"),
            floats.alias("correlated_features_l1"),
            visible_tokens(pl.col("bottom_logits").fill_null(empty)).alias("neg_str"),
            pl.col("bottom_logit_values")
            .fill_null(pl.lit([], dtype=_FLOAT32S))
            .alias("neg_values"),
            visible_tokens(pl.col("top_logits").fill_null(empty)).alias("pos_str"),
            pl.col("top_logit_values").fill_null(pl.lit([], dtype=_FLOAT32S)).alias("pos_values"),
            pl.col("activation_freq").fill_null(0.0).clip(0.0, 1.0).alias("frac_nonzero"),
            floats.alias("freq_hist_data_bar_heights"),
            floats.alias("freq_hist_data_bar_values"),
            floats.alias("logits_hist_data_bar_heights"),
            floats.alias("logits_hist_data_bar_values"),
            floats.alias("decoder_weights_dist"),
            pl.lit(self.source_set).alias("sourceSetName"),
        )

    def _activations(self, part: pl.DataFrame, layer: int, source: str) -> pl.DataFrame:
        """One row per example. ``binMin``/``binMax`` are the lowest and highest activation
        of the example's group (top examples, or one quantile) and ``binContains`` the share
        of the feature's activating tokens it stands for; random examples have none."""
        examples = (
            part.select(
                "index",
                "activation_count",
                "examples",
                pl.int_ranges(pl.col("examples").list.len()).alias("ordinal"),
            )
            .explode("examples", "ordinal")
            .unnest("examples")
        )
        low, high, share = group_fields(self.n_quantiles)
        values = pl.col("acts").list.head(MAX_TOKENS)
        return examples.select(
            _row_id(self.activation_prefix, layer, "ordinal").alias("id"),
            visible_tokens(pl.col("tokens").list.head(MAX_TOKENS)),
            pl.col("index").cast(pl.String),
            pl.lit(source).alias("layer"),
            pl.lit(self.model_id).alias("modelId"),
            values.list.max().fill_null(0.0).alias("maxValue"),
            values.list.arg_max().cast(pl.Int64).fill_null(0).alias("maxValueTokenIndex"),
            values.list.min().fill_null(0.0).alias("minValue"),
            values.alias("values"),
            pl.lit(CREATOR_ID).alias("creatorId"),
            pl.lit(None, pl.String).alias("dataSource"),
            pl.lit(None, pl.String).alias("dataIndex"),
            pl.lit([], dtype=_FLOATS).alias("dfaValues"),
            pl.lit(None, pl.Int64).alias("dfaTargetIndex"),
            pl.lit(None, pl.Float64).alias("dfaMaxValue"),
            pl.lit(self.created).alias("createdAt"),
            pl.lit([], dtype=_FLOATS).alias("lossValues"),
            pl.lit(None, pl.String).alias("logitContributions"),
            low.alias("binMin"),
            high.alias("binMax"),
            share.alias("binContains"),
            pl.col("highlight").cast(pl.Int64).alias("qualifyingTokenIndex"),
        )  # fmt: skip

    def _explanations(self, part: pl.DataFrame, layer: int, source: str) -> pl.DataFrame:
        """One row per judge's ok judgment with an explanation, the final label's judge
        first, then by judge name."""
        chosen = (
            pl.when(pl.col("label_source").is_in(["consensus", "single_judge"]))
            .then(pl.col("label_source_detail"))
        )  # fmt: skip
        text = pl.col("explanation").str.replace_all(r"\s+", " ").str.strip_chars()
        judged = (
            part.select(
                "index",
                pl.col("final_label").struct.rename_fields(list(_LABEL)),
                "label_source",
                chosen.alias("chosen"),
                "judgments",
            )
            .explode("judgments")
            .unnest("judgments")
            .filter(pl.col("status") == "ok", pl.col("explanation").is_not_null())
            .with_columns(text.alias("text"))
            .filter(pl.col("text").str.len_chars() > 0)
            .unnest("final_label")
            .with_columns(
                pl.col("detection").struct.field("accuracy").alias("accuracy"),
                (pl.col("judge") != pl.col("chosen")).fill_null(True).alias("later"),
            )
            .sort("index", "later", "judge", maintain_order=True)
            .with_columns(pl.int_range(pl.len()).over("index").alias("ordinal"))
        )
        keys = [*_LABEL, "label_source", "accuracy"]
        tags = judged.select(keys).unique()
        tags = tags.with_columns(
            pl.Series("tag", [
                label_tag(dict(zip(_LABEL.values(), row[:4], strict=True)), row[4], row[5])
                for row in tags.iter_rows()
            ], dtype=pl.String)
        )  # fmt: skip
        judged = judged.join(tags, on=keys, how="left", nulls_equal=True, maintain_order="left")
        return judged.select(
            _row_id(self.explanation_prefix, layer, "ordinal").alias("id"),
            *self._common(source),
            pl.lit(shorten_all(judged["text"])).alias("description"),
            pl.lit(CREATOR_ID).alias("authorId"),
            pl.lit(None, _FLOATS).alias("embedding"),
            pl.lit(None, pl.String).alias("triggeredByUserId"),
            pl.lit(None, pl.String).alias("typeName"),
            pl.lit(None, pl.String).alias("explanationModelName"),
            pl.format("[judge: {}] {}", "judge", "tag").alias("notes"),
            pl.col("created_at").fill_null(self.created).alias("createdAt"),
        )  # fmt: skip


def _write(rows: pl.DataFrame, path: Path) -> None:
    rows.write_ndjson(path, compression="gzip", compression_level=GZIP_LEVEL)
