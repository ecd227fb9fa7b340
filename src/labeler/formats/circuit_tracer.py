"""The paper's released feature data (the circuit-tracer viewer's per-feature JSON): export a run
folder to it, and import a folder of it as a run folder (schema 2) that the labeler can label
without collecting again.

The folder, as the paper's collection script writes it::

    SRC/
      features/{cantor_id}.json   one file per alive feature, named cantor_id(layer, index)
      feature_metadata.json       token counts, and per alive feature its activation counts

A feature file holds ``top_logits`` and ``bottom_logits`` (token strings, promoted and demoted
most by the decoder column), ``act_min``, ``act_max``, ``activation_frequency``, ``layer``,
``feature`` and ``examples_quantiles``: groups ``{"quantile_name", "examples"}`` whose examples
are ``{"tokens"`` (token strings), ``"tokens_acts_list"`` (the feature's activation on each),
``"train_token_ind"`` (index of the highlighted, activating token in the window),
``"is_repeated_datapoint"}``. The paper writes two groups, ``"Top activations"`` (decreasing
activation) and ``"Random samples"``, and takes ``act_min``/``act_max`` over every token of those
windows (so its ``act_min`` is usually 0: the windows' other tokens mostly do not activate the
feature). The viewer colours a token by where its activation lies between the two, so export
writes ``act_min`` the same way, the lowest activation on any token of the windows it writes
(the run's ``act_min``, the lowest on activating tokens, would leave the weaker of them nearly
white), and the run's own only for a feature without examples. Export also writes what
circuit-tracer's own frontend model of a feature file requires: ``transcoder_id``
(``layer_{layer}``), ``index`` (the feature's index in its layer), ``quantile_values``
(percentiles 1 to 100 of the activation on activating tokens, the last being ``act_max``) and
``histogram`` (32 equal bins over ``[act_min, act_max]``, each the estimated number of
activating tokens in it). Both are estimated from the random examples, a uniform sample of
the activating tokens (from every example when a feature has none); they are empty lists for
a feature without examples. The metadata holds ``total_tokens``, ``tokens_per_domain``,
``tokens_per_region``, ``tokens_per_thinking_bin`` (ten bins) and ``features``: per alive
feature ``layer``, ``feature``, ``cantor_id``, ``activation_count``, ``activation_freq`` and
the fractions and densities of its activations per domain, region and tenth of the thinking.

Conventions
- Groups: ``"Top activations"`` is kind ``top``; ``"Quantile {q}"`` is kind ``quantile`` with
  quantile ``q`` (0 lowest); ``"Random samples"`` is kind ``random``. Export writes the top
  group, every quantile group highest first (when the run has quantiles), then the random group;
  an example's rank is its position in its group. Import refuses any other group name.
- Export writes alive features only, as the paper does (so the logit lens of a dead feature is
  not carried; an import lists dead features with empty logit lists). Beside the paper's
  ``top_logits`` and ``bottom_logits`` it writes the logit lens's ``top_logit_ids``,
  ``top_logit_values``, ``bottom_logit_ids`` and ``bottom_logit_values`` (one per token;
  left out where the run has none, as in an import of the paper's files), which import
  reads back: a judge reads which tokens a feature promotes most from the values, so
  without them output features can be labeled otherwise. An import of files without
  values warns how many alive features lack them. Beside the paper's
  metadata keys it writes ``layers``, ``n_features_per_layer``, ``n_features``,
  ``n_feature_files``, ``n_alive`` and ``n_dead`` (per layer), ``unit``, ``n_sequences``,
  ``sequences_per_domain``, ``n_truncated``, ``n_unterminated_think`` and ``run``
  (provenance); import reads the counts back when present.
- ``act_max`` and ``activation_frequency`` are copied as they are in both directions; import
  copies ``act_min`` too, so an imported ``act_min`` keeps the paper's meaning (over example
  windows), and export writes it over the windows written (above).
- Activations are kept as float32, as the paper's come from float32 tensors; other values come
  back rounded to float32. ``is_repeated_datapoint`` is not kept: export writes false, as the
  paper always does.

What an import cannot know, and the sentinel it writes instead
- examples: ``sequence``, ``position`` and ``corpus_position`` -1; ``domain`` and ``region``
  ``"unknown"``; ``think_bin`` -1; ``token_ids`` -1 for every token of the window.
- features: ``act_mean`` null for alive features; the logit ids and values
  (``top_logit_ids``, ``top_logit_values``, ``bottom_logit_ids``, ``bottom_logit_values``) empty
  lists where the feature file has none. ``count`` is the metadata's ``activation_count``, else
  ``round(activation_frequency * total_tokens)``. Counts per domain and region are
  ``round(fraction * activation_count)`` and per thinking bin ``round(density * bin tokens)``
  from the metadata, and 0 where it has no entry for the feature; regions outside REGIONS (the
  paper's fallback ``unknown``) are dropped, and region ``text`` is 0.
- run.json: ``source`` import, ``negatives_checked`` false, ``adapter_path`` and
  ``corpus_path`` the source folder, and both hashes the sha256 over its JSON files (their
  relative names in sorted order, each followed by the sha256 of its bytes). ``n_sequences``,
  ``n_truncated``, ``n_unterminated_think`` and the sequences per domain are 0 unless the
  metadata holds them. ``params`` describe what was imported: ``top_k``, ``n_random`` and
  ``per_quantile`` the largest group sizes, ``n_quantiles`` one more than the highest quantile,
  the context sizes the largest seen, ``logit_lens_k`` the longest logit list; the rest default.
- negatives: up to 256 windows drawn (seeded) from the random-sample examples, or from all
  examples when there are none. A window is a whole example window; its ``active_features`` are
  the features with that exact window among their examples. Whether other features fire there is
  unknown, hence ``negatives_checked`` false.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import math
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import numpy as np
import polars as pl
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr
from pydantic import ValidationError as PydanticValidationError

from collectors.errors import RunFolderError
from collectors.run_format import (
    EXAMPLE_KINDS,
    EXAMPLE_ROW_GROUP,
    EXAMPLES,
    FEATURES,
    NEGATIVES,
    REGIONS,
    RUN_SCHEMA_VERSION,
    THINK_BINS,
    CollectParams,
    RunInfo,
    cantor_id,
    feature_id,
    package_versions,
    publish,
    read_run_info,
    write_run_info,
)
from labeler.errors import UserError
from labeler.run.spread import activation_spread

log = logging.getLogger(__name__)

FEATURES_DIR = "features"
METADATA_JSON = "feature_metadata.json"
TOP_GROUP = "Top activations"
RANDOM_GROUP = "Random samples"
UNKNOWN = "unknown"
MAX_NEGATIVES = 256
NEGATIVES_SEED = 0
CHUNK = 2048  # feature files per examples part (import); features per batch (export)
LOGIT_LENS_KEYS = ("top_logit_ids", "top_logit_values", "bottom_logit_ids", "bottom_logit_values")
"""The logit lens beside the paper's token lists: written by export, read back by import."""
NOT_CARRIED = (
    "act_mean",
    "each example's sequence, position, corpus_position, domain, region, think_bin and token_ids",
)
"""What the format has no place for: an import writes sentinels (the module's docstring)."""

_QUANTILE_NAME = re.compile(r"Quantile (0|[1-9][0-9]*)")
_CANTOR_NAME = re.compile(r"(0|[1-9][0-9]*)\.json")
_KIND_ORDER = {"top": 0, "quantile": 1, "random": 2}

EXAMPLES_SCHEMA: dict[str, pl.DataType] = {
    "feature_id": pl.String(),
    "layer": pl.Int32(),
    "index": pl.Int32(),
    "kind": pl.String(),
    "rank": pl.Int32(),
    "quantile": pl.Int32(),
    "activation": pl.Float32(),
    "sequence": pl.Int64(),
    "position": pl.Int64(),
    "corpus_position": pl.Int64(),
    "domain": pl.String(),
    "region": pl.String(),
    "think_bin": pl.Int8(),
    "token_ids": pl.List(pl.Int64()),
    "tokens": pl.List(pl.String()),
    "acts": pl.List(pl.Float32()),
    "highlight": pl.Int32(),
}
NEGATIVES_SCHEMA: dict[str, pl.DataType] = {
    "window": pl.Int32(),
    "sequence": pl.Int64(),
    "position": pl.Int64(),
    "domain": pl.String(),
    "token_ids": pl.List(pl.Int64()),
    "tokens": pl.List(pl.String()),
    "active_features": pl.List(pl.Int64()),
}


class CircuitTracerError(RunFolderError):
    """A folder in the circuit-tracer feature format that cannot be read; the message names the
    file and the field."""


def quantile_name(q: int) -> str:
    """The group name of quantile ``q`` (0 is the lowest)."""
    return f"Quantile {q}"


def cantor_unpair(z: int) -> tuple[int, int]:
    """The (layer, index) whose Cantor pairing is ``z``."""
    w = (math.isqrt(8 * z + 1) - 1) // 2
    index = z - w * (w + 1) // 2
    return w - index, index


# --- the input format, validated -------------------------------------------------------------

NonNegative = Annotated[StrictInt, Field(ge=0)]


class _Example(BaseModel):
    model_config = ConfigDict(extra="ignore")

    tokens: list[StrictStr]
    tokens_acts_list: list[StrictFloat]
    train_token_ind: StrictInt
    is_repeated_datapoint: bool


class _Group(BaseModel):
    model_config = ConfigDict(extra="ignore")

    quantile_name: StrictStr
    examples: list[_Example]


class _Feature(BaseModel):
    model_config = ConfigDict(extra="ignore")

    top_logits: list[StrictStr]
    bottom_logits: list[StrictStr]
    # written by export_circuit_tracer, absent from the paper's files
    top_logit_ids: list[StrictInt] | None = None
    top_logit_values: list[StrictFloat | StrictInt] | None = None
    bottom_logit_ids: list[StrictInt] | None = None
    bottom_logit_values: list[StrictFloat | StrictInt] | None = None
    act_min: StrictFloat
    act_max: StrictFloat
    activation_frequency: StrictFloat
    layer: NonNegative
    feature: NonNegative
    examples_quantiles: list[_Group]


class _MetaFeature(BaseModel):
    model_config = ConfigDict(extra="ignore")

    layer: NonNegative
    feature: NonNegative
    activation_count: NonNegative
    domain_fraction: dict[str, StrictFloat] = Field(default_factory=dict)
    region_fraction: dict[str, StrictFloat] = Field(default_factory=dict)
    thinking_position_density: list[StrictFloat] = Field(default_factory=list)


class _Metadata(BaseModel):
    model_config = ConfigDict(extra="ignore")

    total_tokens: NonNegative
    tokens_per_domain: dict[str, NonNegative] = Field(default_factory=dict)
    tokens_per_region: dict[str, NonNegative] = Field(default_factory=dict)
    tokens_per_thinking_bin: list[NonNegative] = Field(default_factory=list)
    features: list[_MetaFeature]
    # written by export_circuit_tracer, absent from the paper's files
    layers: list[NonNegative] | None = None
    n_features_per_layer: Annotated[StrictInt, Field(gt=0)] | None = None
    unit: Literal["feature", "neuron"] = "feature"
    n_sequences: NonNegative = 0
    sequences_per_domain: dict[str, NonNegative] | None = None
    n_truncated: NonNegative = 0
    n_unterminated_think: NonNegative = 0


_Model = TypeVar("_Model", bound=BaseModel)


def _parse(model: type[_Model], path: Path, raw: bytes) -> _Model:
    try:
        return model.model_validate_json(raw)
    except PydanticValidationError as exc:
        first = exc.errors()[0]
        if first["type"] == "json_invalid":
            raise CircuitTracerError(f"{path}: not valid JSON ({first['msg']})") from exc
        where = ".".join(str(p) for p in first["loc"])
        if not where:
            raise CircuitTracerError(f"{path}: {first['msg']}") from exc
        raise CircuitTracerError(f"{path}: field '{where}': {first['msg']}") from exc


# --- writing a folder atomically ---------------------------------------------------------------


def staging_folder(out: Path, overwrite: bool) -> Path:
    """A fresh folder beside ``out`` to write into, before it is published as ``out``;
    UserError when ``out`` exists and not ``overwrite``."""
    if out.exists() and not overwrite:
        raise UserError(f"{out}: already exists; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else 0


# --- export ------------------------------------------------------------------------------------


def export_circuit_tracer(run_folder: Path, out: Path, overwrite: bool = False) -> int:
    """Write ``out/features/{cantor_id}.json`` for every alive feature of the run and
    ``out/feature_metadata.json``; returns the number of feature files written.

    The folder appears complete or not at all (it is written beside ``out`` and renamed), and an
    existing ``out`` is replaced only when ``overwrite``."""
    info = read_run_info(run_folder)
    features = pl.read_parquet(run_folder / FEATURES)
    examples = pl.scan_parquet(run_folder / EXAMPLES)
    if "quantile" not in examples.collect_schema().names():
        examples = examples.with_columns(quantile=pl.lit(None, dtype=pl.Int32))
    bad_kind = (
        examples.filter(~pl.col("kind").is_in(list(EXAMPLE_KINDS))).select("kind").head(1).collect()
    )
    if bad_kind.height:
        raise RunFolderError(
            f"{run_folder / EXAMPLES}: field 'kind': {bad_kind.item()!r} is not one of "
            f"{', '.join(EXAMPLE_KINDS)}"
        )
    top_q = examples.select(pl.col("quantile").max()).collect().item()
    n_quantiles = max(info.params.n_quantiles, 0 if top_q is None else int(top_q) + 1)
    alive = (
        features.filter(pl.col("alive"))
        .select("layer", "index", "count", "frequency", "act_min", "act_max", "top_logits",
                "bottom_logits", *LOGIT_LENS_KEYS)
        .sort("layer", "index")
    )  # fmt: skip
    staging = staging_folder(out, overwrite)
    try:
        folder = staging / FEATURES_DIR
        folder.mkdir()
        written = 0
        for (layer,), group in alive.group_by("layer", maintain_order=True):
            rows = (
                examples.filter(pl.col("layer") == layer)
                .select(
                    "index", "kind", "quantile", "rank", "activation", "tokens", "acts", "highlight"
                )
                .with_columns(
                    _kind=pl.col("kind").replace_strict(_KIND_ORDER, return_dtype=pl.Int8),
                    _q=-pl.col("quantile").fill_null(0),
                )
                .sort("index", "_kind", "_q", "rank")
                .collect()
            )
            written += _write_layer(folder, int(str(layer)), group, rows, n_quantiles, run_folder)
        text = json.dumps(_export_metadata(info, features, written))
        (staging / METADATA_JSON).write_text(text, encoding="utf-8")
        publish(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return written


def _write_layer(
    folder: Path,
    layer: int,
    features: pl.DataFrame,
    rows: pl.DataFrame,
    n_quantiles: int,
    run_folder: Path,
) -> int:
    """One layer's feature files; ``rows`` are its examples sorted by feature, then group order."""
    row_index = rows["index"].to_numpy()
    group_names = [TOP_GROUP, *(quantile_name(q) for q in reversed(range(n_quantiles)))]
    group_names.append(RANDOM_GROUP)
    for start in range(0, features.height, CHUNK):
        batch = features.slice(start, CHUNK)
        indices: list[int] = batch["index"].to_list()
        lo = int(np.searchsorted(row_index, indices[0], side="left"))
        hi = int(np.searchsorted(row_index, indices[-1], side="right"))
        chunk = rows.slice(lo, hi - lo)
        by_feature: dict[int, dict[str, list[dict[str, Any]]]] = {}
        sampled: dict[int, list[float]] = {}  # the random examples' activations
        shown: dict[int, list[float]] = {}  # every example's activation
        lowest: dict[int, float] = {}  # the lowest activation on any token of its windows
        for index, kind, quantile, activation, tokens, acts, highlight in zip(
            chunk["index"].to_list(),
            chunk["kind"].to_list(),
            chunk["quantile"].to_list(),
            chunk["activation"].to_list(),
            chunk["tokens"].to_list(),
            chunk["acts"].to_list(),
            chunk["highlight"].to_list(),
            strict=True,
        ):
            if kind == "top":
                name = TOP_GROUP
            elif kind == "random":
                name = RANDOM_GROUP
            elif quantile is None:
                raise RunFolderError(
                    f"{run_folder / EXAMPLES}: field 'quantile' is null in a quantile example of "
                    f"{feature_id(layer, index)}"
                )
            else:
                name = quantile_name(quantile)
            shown.setdefault(index, []).append(activation)
            if acts:
                lowest[index] = min(lowest.get(index, math.inf), min(acts))
            if kind == "random":
                sampled.setdefault(index, []).append(activation)
            groups = by_feature.get(index)
            if groups is None:
                groups = by_feature[index] = {n: [] for n in group_names}
            groups[name].append(
                {
                    "tokens": tokens,
                    "tokens_acts_list": acts,
                    "train_token_ind": highlight,
                    "is_repeated_datapoint": False,
                }
            )
        fields = batch.select(
            "index", "count", "frequency", "act_min", "act_max", "top_logits", "bottom_logits",
            *LOGIT_LENS_KEYS,
        )  # fmt: skip
        for (
            index,
            count,
            frequency,
            act_min,
            act_max,
            top_logits,
            bottom_logits,
            *lens,
        ) in fields.iter_rows():
            groups = by_feature.get(index) or {n: [] for n in group_names}
            sample = sampled.get(index) or shown.get(index) or []
            act_min = lowest.get(index, act_min)
            spread = activation_spread(sample, act_min, act_max, count)
            record = {
                "transcoder_id": transcoder_id(layer),
                "index": index,
                "top_logits": top_logits or [],
                "bottom_logits": bottom_logits or [],
                "act_min": act_min,
                "act_max": act_max,
                "examples_quantiles": [
                    {"quantile_name": name, "examples": examples}
                    for name, examples in groups.items()
                ],
                "activation_frequency": frequency,
                "quantile_values": spread.quantile_values,
                "histogram": spread.histogram,
                "layer": layer,
                "feature": index,
            }
            # the logit lens's ids and values, where the run has them (not an import of
            # the paper's files, which hold the tokens only)
            record |= {k: v for k, v in zip(LOGIT_LENS_KEYS, lens, strict=True) if v}
            path = folder / f"{cantor_id(layer, index)}.json"
            path.write_text(json.dumps(record), encoding="utf-8")
    return features.height


def transcoder_id(layer: int) -> str:
    """The ``transcoder_id`` of a layer's features: ``layer_{layer}``."""
    return f"layer_{layer}"


def _export_metadata(info: RunInfo, features: pl.DataFrame, written: int) -> dict[str, Any]:
    domains = [c.removeprefix("domain_") for c in features.columns if c.startswith("domain_")]
    regions = [r for r in REGIONS if f"region_{r}" in features.columns]
    bins = [f"think_bin_{b}" for b in range(THINK_BINS)]
    bin_tokens = [info.tokens_by_think_bin.get(str(b), 0) for b in range(THINK_BINS)]
    entries = []
    alive = features.filter(pl.col("alive")).sort("layer", "index")
    for row in alive.iter_rows(named=True):
        count = row["count"]
        by_domain = {d: row[f"domain_{d}"] for d in domains if row[f"domain_{d}"] > 0}
        by_region = {r: row[f"region_{r}"] for r in regions if row[f"region_{r}"] > 0}
        by_bin = [row.get(b) or 0 for b in bins]
        in_thinking = sum(by_bin)
        entries.append(
            {
                "layer": row["layer"],
                "feature": row["index"],
                "cantor_id": cantor_id(row["layer"], row["index"]),
                "activation_count": count,
                "activation_freq": row["frequency"],
                "domain_density": {
                    d: _ratio(n, info.tokens_by_domain.get(d, 0)) for d, n in by_domain.items()
                },
                "domain_fraction": {d: _ratio(n, count) for d, n in by_domain.items()},
                "region_density": {
                    r: _ratio(n, info.tokens_by_region.get(r, 0)) for r, n in by_region.items()
                },
                "region_fraction": {r: _ratio(n, count) for r, n in by_region.items()},
                "thinking_position_density": [
                    _ratio(n, t) for n, t in zip(by_bin, bin_tokens, strict=True)
                ],
                "thinking_position_fraction": [_ratio(n, in_thinking) for n in by_bin],
            }
        )
    per_layer = features.group_by("layer").agg(
        alive=pl.col("alive").sum(), dead=(~pl.col("alive")).sum()
    )
    n_alive = {str(la): int(n) for la, n in per_layer.select("layer", "alive").iter_rows()}
    n_dead = {str(la): int(n) for la, n in per_layer.select("layer", "dead").iter_rows()}
    return {
        "total_tokens": info.n_tokens,
        "tokens_per_domain": dict(info.tokens_by_domain),
        "tokens_per_region": {r: n for r, n in info.tokens_by_region.items() if n > 0},
        "tokens_per_thinking_bin": bin_tokens,
        "features": entries,
        "layers": list(info.layers),
        "n_features_per_layer": info.n_features_per_layer,
        "n_features": len(info.layers) * info.n_features_per_layer,
        "n_feature_files": written,
        "n_alive": {str(la): n_alive.get(str(la), 0) for la in info.layers},
        "n_dead": {str(la): n_dead.get(str(la), 0) for la in info.layers},
        "unit": info.unit,
        "n_sequences": info.n_sequences,
        "sequences_per_domain": dict(info.domains),
        "n_truncated": info.n_truncated,
        "n_unterminated_think": info.n_unterminated_think,
        "run": {
            "created_at": info.created_at,
            "source": info.source,
            "adapter_path": info.adapter_path,
            "adapter_hash": info.adapter_hash,
            "corpus_path": info.corpus_path,
            "corpus_hash": info.corpus_hash,
        },
    }


# --- import ------------------------------------------------------------------------------------


@dataclass
class _ExampleColumns:
    feature_id: list[str] = field(default_factory=list)
    layer: list[int] = field(default_factory=list)
    index: list[int] = field(default_factory=list)
    kind: list[str] = field(default_factory=list)
    rank: list[int] = field(default_factory=list)
    quantile: list[int | None] = field(default_factory=list)
    activation: list[float] = field(default_factory=list)
    highlight: list[int] = field(default_factory=list)
    width: list[int] = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)  # every window's tokens, one after another
    acts: list[float] = field(default_factory=list)

    def frame(self) -> pl.DataFrame:
        # nested columns are built from the flat ones: far faster than from lists of lists
        windows = (
            pl.DataFrame(
                {
                    "_row": np.repeat(np.arange(len(self.width)), self.width),
                    "tokens": pl.Series(self.tokens, dtype=pl.String),
                    "acts": pl.Series(self.acts, dtype=pl.Float32),
                }
            )
            .group_by("_row", maintain_order=True)
            .agg("tokens", "acts")
        )
        minus_one = pl.lit(-1, dtype=pl.Int64)
        return (
            pl.DataFrame(
                {
                    "feature_id": pl.Series(self.feature_id, dtype=pl.String),
                    "layer": pl.Series(self.layer, dtype=pl.Int32),
                    "index": pl.Series(self.index, dtype=pl.Int32),
                    "kind": pl.Series(self.kind, dtype=pl.String),
                    "rank": pl.Series(self.rank, dtype=pl.Int32),
                    "quantile": pl.Series(self.quantile, dtype=pl.Int32),
                    "activation": pl.Series(self.activation, dtype=pl.Float32),
                    "highlight": pl.Series(self.highlight, dtype=pl.Int32),
                    "tokens": windows["tokens"],
                    "acts": windows["acts"],
                }
            )
            .with_columns(
                sequence=minus_one,
                position=minus_one,
                corpus_position=minus_one,
                domain=pl.lit(UNKNOWN),
                region=pl.lit(UNKNOWN),
                think_bin=pl.lit(-1, dtype=pl.Int8),
                token_ids=minus_one.repeat_by(pl.col("tokens").list.len()),
            )
            .select(pl.col(name).cast(dtype) for name, dtype in EXAMPLES_SCHEMA.items())
        )


@dataclass
class _Imported:
    """The per-feature values of the alive features, and what the examples showed."""

    layer: list[int] = field(default_factory=list)
    index: list[int] = field(default_factory=list)
    frequency: list[float] = field(default_factory=list)
    act_min: list[float] = field(default_factory=list)
    act_max: list[float] = field(default_factory=list)
    top_logits: list[list[str]] = field(default_factory=list)
    bottom_logits: list[list[str]] = field(default_factory=list)
    lens: dict[str, list[list[float] | list[int]]] = field(
        default_factory=lambda: {k: [] for k in LOGIT_LENS_KEYS}
    )
    without_values: int = 0
    """Alive features with logit tokens and no logit values (the paper's files)."""
    group_sizes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(EXAMPLE_KINDS, 0))
    top_quantile: int = -1
    context_before: int = 0
    context_after: int = 0
    logit_k: int = 0
    digests: dict[str, str] = field(default_factory=dict)


def import_circuit_tracer(src: Path, out: Path, overwrite: bool = False) -> RunInfo:
    """Read a folder of the paper's per-feature JSON into a run folder at ``out`` (written beside
    it and renamed, ``run.json`` last); an existing ``out`` is replaced only when ``overwrite``.

    Raises CircuitTracerError naming the file and field for a missing metadata file, a feature
    file that is not valid JSON or lacks a field, or one whose name is not the Cantor pairing of
    its ``layer`` and ``feature``."""
    if not src.is_dir():
        raise CircuitTracerError(f"{src}: folder not found")
    meta_path = src / METADATA_JSON
    if not meta_path.is_file():
        raise CircuitTracerError(
            f"{meta_path}: not found; a circuit-tracer feature folder holds {METADATA_JSON} "
            f"beside {FEATURES_DIR}/"
        )
    meta_bytes = meta_path.read_bytes()
    meta = _parse(_Metadata, meta_path, meta_bytes)
    files = _feature_files(src)
    staging = staging_folder(out, overwrite)
    try:
        imported = _Imported(digests={METADATA_JSON: hashlib.sha256(meta_bytes).hexdigest()})
        parts = _import_examples(files, imported, staging)
        layers, n_features = _layout(meta, meta_path, imported)
        if parts:
            pl.scan_parquet(parts).sink_parquet(
                staging / EXAMPLES, row_group_size=EXAMPLE_ROW_GROUP
            )
        else:
            pl.DataFrame(schema=EXAMPLES_SCHEMA).write_parquet(staging / EXAMPLES)
        shutil.rmtree(staging / ".parts", ignore_errors=True)
        domains = _domains(meta)
        features = _import_features(meta, imported, layers, n_features, domains)
        features.write_parquet(staging / FEATURES)
        negatives = _negatives(staging / EXAMPLES, n_features)
        negatives.write_parquet(staging / NEGATIVES)
        info = _import_info(src, meta, imported, layers, n_features, domains, negatives)
        write_run_info(staging, info)  # last: its presence marks a complete folder
        publish(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _say_what_was_not_carried(src, imported)
    return info


def _say_what_was_not_carried(src: Path, imported: _Imported) -> None:
    """Warn of what the folder could not give the run: the logit values where missing (a
    judge's reading of what a feature promotes, and so its label, can differ from the
    run's), and what the format never holds."""
    never = "; ".join(NOT_CARRIED)
    if not imported.without_values:
        log.info("%s: not carried by the format (sentinels written): %s", src, never)
        return
    log.warning(
        "%s: %d of %d alive features have logit tokens without values (no "
        "top_logit_values, bottom_logit_values; the paper's files hold none): a judge "
        "cannot tell which tokens a feature promotes most, so output features may be "
        "labeled otherwise than in the run the folder came from; also not carried: %s",
        src, imported.without_values, len(imported.layer), never,
    )  # fmt: skip


def _feature_files(src: Path) -> list[tuple[int, int, Path]]:
    """(layer, index, path) of every feature file, ordered by layer and index."""
    folder = src / FEATURES_DIR
    if not folder.is_dir():
        raise CircuitTracerError(
            f"{folder}: folder not found; expected {FEATURES_DIR}/{{cantor_id}}.json files"
        )
    files = []
    for path in folder.iterdir():
        if path.suffix != ".json":
            continue
        match = _CANTOR_NAME.fullmatch(path.name)
        if match is None:
            raise CircuitTracerError(
                f"{path}: not a feature file name; expected {{cantor_id}}.json, the Cantor "
                "pairing of the feature's layer and index"
            )
        layer, index = cantor_unpair(int(match.group(1)))
        files.append((layer, index, path))
    if not files and (folder / "index.json.gz").exists():
        raise CircuitTracerError(
            f"{folder}: holds the packed format (index.json.gz and layer_*.bin); unpack it into "
            "one {cantor_id}.json per feature first"
        )
    return sorted(files)


def _group_kind(name: str) -> tuple[str, int | None] | None:
    if name == TOP_GROUP:
        return "top", None
    if name == RANDOM_GROUP:
        return "random", None
    match = _QUANTILE_NAME.fullmatch(name)
    return ("quantile", int(match.group(1))) if match else None


def _import_examples(
    files: list[tuple[int, int, Path]], imported: _Imported, staging: Path
) -> list[Path]:
    """Read every feature file; write its examples in parts of CHUNK features each."""
    parts: list[Path] = []
    columns = _ExampleColumns()
    for n, (layer, index, path) in enumerate(files):
        raw = path.read_bytes()
        imported.digests[f"{FEATURES_DIR}/{path.name}"] = hashlib.sha256(raw).hexdigest()
        feature = _parse(_Feature, path, raw)
        if (feature.layer, feature.feature) != (layer, index):
            raise CircuitTracerError(
                f"{path}: fields 'layer' {feature.layer} and 'feature' {feature.feature} pair "
                f"to cantor id {cantor_id(feature.layer, feature.feature)}, not to the file "
                f"name's {path.stem} (layer {layer}, feature {index})"
            )
        _add_feature(feature, path, columns, imported)
        if (n + 1) % CHUNK == 0 or n + 1 == len(files):
            part = staging / ".parts" / f"examples-{len(parts):06d}.parquet"
            part.parent.mkdir(exist_ok=True)
            columns.frame().write_parquet(part)
            parts.append(part)
            columns = _ExampleColumns()
    return parts


def _add_feature(
    feature: _Feature, path: Path, columns: _ExampleColumns, imported: _Imported
) -> None:
    layer, index = feature.layer, feature.feature
    imported.layer.append(layer)
    imported.index.append(index)
    imported.frequency.append(feature.activation_frequency)
    imported.act_min.append(feature.act_min)
    imported.act_max.append(feature.act_max)
    imported.top_logits.append(feature.top_logits)
    imported.bottom_logits.append(feature.bottom_logits)
    for key, tokens in (("top", feature.top_logits), ("bottom", feature.bottom_logits)):
        for part in ("ids", "values"):
            name = f"{key}_logit_{part}"
            values: list[Any] | None = getattr(feature, name)
            if values is not None and len(values) != len(tokens):
                raise CircuitTracerError(
                    f"{path}: field '{name}': {len(values)} entries for the {len(tokens)} of "
                    f"'{key}_logits'; write one per token, or leave the field out"
                )
            imported.lens[name].append(values or [])
    if (feature.top_logits or feature.bottom_logits) and not (
        feature.top_logit_values or feature.bottom_logit_values
    ):
        imported.without_values += 1
    imported.logit_k = max(imported.logit_k, len(feature.top_logits), len(feature.bottom_logits))
    groups: list[tuple[tuple[int, int], int, str, int | None]] = []
    seen: set[str] = set()
    for g, group in enumerate(feature.examples_quantiles):
        where = f"examples_quantiles.{g}.quantile_name"
        kind = _group_kind(group.quantile_name)
        if kind is None:
            raise CircuitTracerError(
                f"{path}: field '{where}': {group.quantile_name!r} is not "
                f"{TOP_GROUP!r}, {RANDOM_GROUP!r} or 'Quantile <n>'"
            )
        if group.quantile_name in seen:
            raise CircuitTracerError(
                f"{path}: field '{where}': group {group.quantile_name!r} appears twice"
            )
        seen.add(group.quantile_name)
        order = (_KIND_ORDER[kind[0]], -(kind[1] or 0))
        groups.append((order, g, *kind))
    fid = feature_id(layer, index)
    for _, g, kind_name, quantile in sorted(groups):
        examples = feature.examples_quantiles[g].examples
        imported.group_sizes[kind_name] = max(imported.group_sizes[kind_name], len(examples))
        if quantile is not None:
            imported.top_quantile = max(imported.top_quantile, quantile)
        for rank, example in enumerate(examples):
            where = f"examples_quantiles.{g}.examples.{rank}"
            width = len(example.tokens)
            if len(example.tokens_acts_list) != width:
                raise CircuitTracerError(
                    f"{path}: field '{where}.tokens_acts_list': {len(example.tokens_acts_list)} "
                    f"activations for {width} tokens"
                )
            highlight = example.train_token_ind
            if not 0 <= highlight < width:
                raise CircuitTracerError(
                    f"{path}: field '{where}.train_token_ind': {highlight} is outside the "
                    f"window of {width} tokens"
                )
            imported.context_before = max(imported.context_before, highlight)
            imported.context_after = max(imported.context_after, width - 1 - highlight)
            columns.feature_id.append(fid)
            columns.layer.append(layer)
            columns.index.append(index)
            columns.kind.append(kind_name)
            columns.rank.append(rank)
            columns.quantile.append(quantile)
            columns.activation.append(example.tokens_acts_list[highlight])
            columns.highlight.append(highlight)
            columns.width.append(width)
            columns.tokens.extend(example.tokens)
            columns.acts.extend(example.tokens_acts_list)


def _layout(meta: _Metadata, meta_path: Path, imported: _Imported) -> tuple[list[int], int]:
    """The layers and the features per layer: the metadata's when it holds them (checked against
    the files), else those the data shows."""
    seen_layers = set(imported.layer) | {f.layer for f in meta.features}
    top_index = max([*imported.index, *(f.feature for f in meta.features)], default=-1)
    if meta.layers is not None:
        extra = sorted(seen_layers - set(meta.layers))
        if extra:
            raise CircuitTracerError(
                f"{meta_path}: field 'layers': {meta.layers} lacks layers {extra} of the features"
            )
        layers = sorted(set(meta.layers))
    else:
        layers = sorted(seen_layers)
    if meta.n_features_per_layer is None:
        return layers, top_index + 1
    if top_index >= meta.n_features_per_layer:
        raise CircuitTracerError(
            f"{meta_path}: field 'n_features_per_layer': {meta.n_features_per_layer}, but a "
            f"feature has index {top_index}"
        )
    return layers, meta.n_features_per_layer


def _domains(meta: _Metadata) -> list[str]:
    names = list(meta.tokens_per_domain)
    extra = {d for f in meta.features for d in f.domain_fraction} - set(names)
    return names + sorted(extra)


def _import_features(
    meta: _Metadata, imported: _Imported, layers: list[int], n: int, domains: list[str]
) -> pl.DataFrame:
    by_key = {(f.layer, f.feature): f for f in meta.features}
    bin_tokens = [*meta.tokens_per_thinking_bin, *[0] * THINK_BINS][:THINK_BINS]
    slot = {layer: i for i, layer in enumerate(layers)}
    size = len(layers) * n
    alive = np.zeros(size, dtype=bool)
    count = np.zeros(size, dtype=np.int64)
    frequency = np.zeros(size, dtype=np.float64)
    act_max = np.zeros(size, dtype=np.float32)
    act_min = np.zeros(size, dtype=np.float32)
    act_mean = np.zeros(size, dtype=np.float64)
    by_domain = {d: np.zeros(size, dtype=np.int64) for d in domains}
    by_region = {r: np.zeros(size, dtype=np.int64) for r in REGIONS}
    by_bin = [np.zeros(size, dtype=np.int64) for _ in range(THINK_BINS)]
    top_logits: list[list[str]] = [[] for _ in range(size)]
    bottom_logits: list[list[str]] = [[] for _ in range(size)]
    lens: dict[str, list[list[Any]]] = {k: [[] for _ in range(size)] for k in LOGIT_LENS_KEYS}
    for k, (layer, index) in enumerate(zip(imported.layer, imported.index, strict=True)):
        row = slot[layer] * n + index
        alive[row] = True
        frequency[row] = imported.frequency[k]
        act_max[row] = imported.act_max[k]
        act_min[row] = imported.act_min[k]
        act_mean[row] = np.nan  # unknown: written as null
        top_logits[row] = imported.top_logits[k]
        bottom_logits[row] = imported.bottom_logits[k]
        for key in LOGIT_LENS_KEYS:
            lens[key][row] = imported.lens[key][k]
        entry = by_key.get((layer, index))
        if entry is None:
            count[row] = round(imported.frequency[k] * meta.total_tokens)
            continue
        total = entry.activation_count
        count[row] = total
        for d, share in entry.domain_fraction.items():
            by_domain[d][row] = round(share * total)
        for r, share in entry.region_fraction.items():
            if r in by_region:
                by_region[r][row] = round(share * total)
        for b, density in enumerate(entry.thinking_position_density[:THINK_BINS]):
            by_bin[b][row] = round(density * bin_tokens[b])
    tokens_region = [meta.tokens_per_region.get(r, 0) for r in REGIONS]
    data: dict[str, Any] = {
        "feature_id": [feature_id(la, i) for la in layers for i in range(n)],
        "layer": np.repeat(np.asarray(layers, dtype=np.int32), n),
        "index": np.tile(np.arange(n, dtype=np.int32), len(layers)),
        "alive": alive,
        "count": count,
        "frequency": frequency,
        "act_max": act_max,
        "act_min": act_min,
        "act_mean": pl.Series(act_mean).fill_nan(None),
    }
    data |= {f"domain_{d}": v for d, v in by_domain.items()}
    data |= {f"region_{r}": v for r, v in by_region.items()}
    data |= {f"think_bin_{b}": v for b, v in enumerate(by_bin)}
    data |= {
        f"density_domain_{d}": v / t if (t := meta.tokens_per_domain.get(d, 0)) else v * 0.0
        for d, v in by_domain.items()
    }
    data |= {
        f"density_region_{r}": v / t if t else v * 0.0
        for (r, v), t in zip(by_region.items(), tokens_region, strict=True)
    }
    data |= {
        f"density_think_bin_{b}": v / t if t else v * 0.0
        for b, (v, t) in enumerate(zip(by_bin, bin_tokens, strict=True))
    }
    ids, values = pl.List(pl.Int64), pl.List(pl.Float32)
    data |= {
        "top_logits": pl.Series(top_logits, dtype=pl.List(pl.String)),
        "top_logit_ids": pl.Series(lens["top_logit_ids"], dtype=ids),
        "top_logit_values": pl.Series(lens["top_logit_values"], dtype=values),
        "bottom_logits": pl.Series(bottom_logits, dtype=pl.List(pl.String)),
        "bottom_logit_ids": pl.Series(lens["bottom_logit_ids"], dtype=ids),
        "bottom_logit_values": pl.Series(lens["bottom_logit_values"], dtype=values),
    }
    return pl.DataFrame(data)


def _negatives(examples_path: Path, n_features: int) -> pl.DataFrame:
    """Windows taken from the examples, each with the features known to be active in it."""
    examples = pl.scan_parquet(examples_path).select("layer", "index", "kind", "tokens")
    has_random = examples.filter(pl.col("kind") == "random").head(1).collect().height > 0
    pool = (examples.filter(pl.col("kind") == "random") if has_random else examples).select(
        "tokens", _key=pl.col("tokens").hash(NEGATIVES_SEED)
    )
    n_pool = pool.select(pl.len()).collect().item()
    if n_pool == 0:
        return pl.DataFrame(schema=NEGATIVES_SCHEMA)
    rng = np.random.default_rng(NEGATIVES_SEED)
    pick = np.sort(rng.choice(n_pool, size=min(MAX_NEGATIVES, n_pool), replace=False))
    windows = (
        pool.with_row_index("_row")
        .filter(pl.col("_row").is_in(pick.tolist()))
        .unique(subset="_key", keep="first", maintain_order=True)
        .collect()
    )
    owners = (
        examples.with_columns(
            _key=pl.col("tokens").hash(NEGATIVES_SEED),
            _global=pl.col("layer").cast(pl.Int64) * n_features + pl.col("index").cast(pl.Int64),
        )
        .filter(pl.col("_key").is_in(windows["_key"].implode()))
        .collect()
        .join(windows.select("_key", "_row", _window_tokens="tokens"), on="_key")
        .filter(pl.col("tokens") == pl.col("_window_tokens"))
        .group_by("_row")
        .agg(active_features=pl.col("_global").unique().sort())
    )
    minus_one = pl.lit(-1, dtype=pl.Int64)
    return (
        windows.join(owners, on="_row", how="left")
        .sort("_row")
        .with_row_index("window")
        .with_columns(
            sequence=minus_one,
            position=minus_one,
            domain=pl.lit(UNKNOWN),
            token_ids=minus_one.repeat_by(pl.col("tokens").list.len()),
        )
        .select(pl.col(name).cast(dtype) for name, dtype in NEGATIVES_SCHEMA.items())
    )


def _folder_hash(digests: dict[str, str]) -> str:
    digest = hashlib.sha256()
    for name in sorted(digests):
        digest.update(name.encode("utf-8") + b"\0" + bytes.fromhex(digests[name]))
    return digest.hexdigest()


def _import_info(
    src: Path,
    meta: _Metadata,
    imported: _Imported,
    layers: list[int],
    n_features: int,
    domains: list[str],
    negatives: pl.DataFrame,
) -> RunInfo:
    defaults = CollectParams()
    has_examples = any(imported.group_sizes.values())
    window = max((len(t) for t in negatives["tokens"].to_list()), default=0)
    params = CollectParams(
        top_k=imported.group_sizes["top"],
        n_random=imported.group_sizes["random"],
        n_quantiles=imported.top_quantile + 1,
        per_quantile=imported.group_sizes["quantile"] or defaults.per_quantile,
        context_before=imported.context_before if has_examples else defaults.context_before,
        context_after=imported.context_after if has_examples else defaults.context_after,
        n_negatives=negatives.height,
        negative_window=window or defaults.negative_window,
        logit_lens_k=imported.logit_k or defaults.logit_lens_k,
        layers=layers,
    )
    n_alive = dict.fromkeys(layers, 0)
    for layer in imported.layer:
        n_alive[layer] += 1
    folder_hash = _folder_hash(imported.digests)
    bins = [*meta.tokens_per_thinking_bin, *[0] * THINK_BINS][:THINK_BINS]
    sequences = meta.sequences_per_domain or {}
    return RunInfo(
        schema_version=RUN_SCHEMA_VERSION,
        created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        source="import",
        unit=meta.unit,
        shard=None,
        adapter_path=str(src.resolve()),
        adapter_hash=folder_hash,
        corpus_path=str(src.resolve()),
        corpus_hash=folder_hash,
        params=params,
        layers=layers,
        n_features_per_layer=n_features,
        n_alive={str(la): n for la, n in n_alive.items()},
        n_sequences=meta.n_sequences,
        n_tokens=meta.total_tokens,
        n_truncated=meta.n_truncated,
        n_unterminated_think=meta.n_unterminated_think,
        domains={d: sequences.get(d, 0) for d in domains},
        tokens_by_domain={d: meta.tokens_per_domain.get(d, 0) for d in domains},
        tokens_by_region={r: meta.tokens_per_region.get(r, 0) for r in REGIONS},
        tokens_by_think_bin={str(b): n for b, n in enumerate(bins)},
        negatives_checked=False,
        versions=package_versions(),
    )
