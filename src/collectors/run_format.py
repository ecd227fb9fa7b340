"""The run folder: file names, schema version and the vocabularies stored in it.

Pure Python (no torch): the labeler reads run folders through this module.

```
RUN/
  run.json                 provenance and collection parameters (RunInfo)
  features.parquet         one row per feature (or neuron), alive or dead
  examples.parquet         one row per kept example (top, random sample, quantile samples)
  negatives.parquet        random corpus windows with the features active in each
  collect-state/           the collector's reservoirs and counts (shard runs only; read
                           by `labeler merge-runs`)
  labels.sqlite            the label store (written by `labeler label`)
```

The columns of each table are documented in docs/run-format.md.
"""

from __future__ import annotations

import json
import os
import shutil
from importlib import metadata
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from collectors.errors import RunFolderError

RUN_SCHEMA_VERSION = 2
RUN_JSON = "run.json"
FEATURES = "features.parquet"
EXAMPLES = "examples.parquet"
NEGATIVES = "negatives.parquet"
LABELS = "labels.sqlite"
STATE_DIR = "collect-state"
REQUIRED_FILES = (RUN_JSON, FEATURES, EXAMPLES, NEGATIVES)
LOGIT_HISTOGRAM = "logit_histogram"  # features.parquet's column of the logit lens's spread
LOGIT_BINS = 32
"""Bins of a unit's logit histogram: equal ones from its lowest logit to its highest."""
EXAMPLE_ROW_GROUP = 4096
"""Rows per row group of examples.parquet (about 100 features' examples). The file is in
(layer, index) order and a reader skips row groups by their statistics, so one feature's
examples cost one small row group: 20-30 ms on the demo, against 80 ms for its single
row group of 28,800 rows (about 0.8 s a feature at the paper's scale); the file grows by
about a quarter."""

REGIONS = (
    "bos",
    "user_marker",
    "question",
    "assistant_marker",
    "think_start",
    "thinking",
    "think_end",
    "answer",
    "text",
)
THINK_BINS = 10  # relative position inside the thinking, in tenths
EXAMPLE_KINDS = ("top", "random", "quantile")
UNITS = ("feature", "neuron")
SOURCES = ("collect", "merge", "import")
CHAT_FORMATS = ("deepseek", "qwen")
MARKER_REGIONS = frozenset({"bos", "user_marker", "assistant_marker", "think_start", "think_end"})


def feature_id(layer: int, index: int) -> str:
    """The name a person reads: ``L{layer}F{index}``."""
    return f"L{layer}F{index}"


def parse_feature_id(name: str) -> tuple[int, int]:
    try:
        layer, index = name[1:].split("F")
        if not name.startswith("L"):
            raise ValueError(name)
        return int(layer), int(index)
    except ValueError as exc:
        raise ValueError(f"not a feature id of the form L{{layer}}F{{index}}: {name!r}") from exc


def cantor_id(layer: int, index: int) -> int:
    """The circuit-tracer name of a feature: the Cantor pairing of (layer, index)."""
    return (layer + index) * (layer + index + 1) // 2 + index


class CollectParams(BaseModel):
    """How a run was collected."""

    model_config = ConfigDict(extra="forbid")

    top_k: int = Field(20, ge=1, description="top activating examples kept per feature")
    n_random: int = Field(10, ge=1, description="uniformly sampled activating examples per feature")
    context_before: int = Field(
        50, ge=0, description="tokens of context before the activating token"
    )
    context_after: int = Field(20, ge=0, description="tokens of context after the activating token")
    max_length: int = Field(1024, ge=1, description="sequences are truncated to this many tokens")
    batch_tokens: int = Field(8192, ge=1, description="token budget of one forward batch")
    n_negatives: int = Field(
        256, ge=0, description="random corpus windows kept as detection negatives"
    )
    negative_window: int = Field(32, ge=1, description="tokens per negative window")
    logit_lens_k: int = Field(10, ge=1, description="promoted and demoted tokens kept per feature")
    n_quantiles: int = Field(
        0, ge=0, description="activation quantiles sampled per feature (0: none; 10: deciles)"
    )
    per_quantile: int = Field(5, ge=1, description="examples kept from each quantile")
    lens_through_norm: bool = Field(
        False, description="logit lens applies the final norm to the decoder column first"
    )
    chat_format: str = Field("deepseek", description="chat layout of conversation records")
    seed: int = Field(0, description="seed for the random sample and the negative windows")
    layers: list[int] | None = Field(None, description="layers collected; None means all")
    neurons: int | None = Field(
        None, ge=1, description="plain MLP neurons sampled per layer instead of adapter features"
    )

    @property
    def sample_size(self) -> int:
        """Size of the uniform activating sample kept per feature: the random examples are
        its ``n_random`` smallest hash keys; the quantile samples partition all of it."""
        return max(self.n_random, self.n_quantiles * self.per_quantile)


class RunInfo(BaseModel):
    """``run.json``: what was collected, from what, and how."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int
    created_at: str
    source: str = Field(description="collect, merge (of shard runs) or import")
    unit: str = Field(description="feature (adapter features) or neuron (plain MLP neurons)")
    shard: str | None = Field(None, description="'i/n' when this run covers one shard")
    adapter_path: str
    adapter_hash: str
    corpus_path: str
    corpus_hash: str
    params: CollectParams
    layers: list[int]
    n_features_per_layer: int
    n_alive: dict[str, int] = Field(description="alive features per layer (keys are layers)")
    n_sequences: int
    n_tokens: int
    n_truncated: int
    n_unterminated_think: int
    n_dropped: dict[str, int] = Field(
        default_factory=dict,
        description="parts of the corpus's conversations left out, by reason "
        "(collectors.corpus.DROP_REASONS); the whole corpus's, in every shard",
    )
    domains: dict[str, int] = Field(description="sequences per domain")
    tokens_by_domain: dict[str, int]
    tokens_by_region: dict[str, int]
    tokens_by_think_bin: dict[str, int]
    negatives_checked: bool = Field(
        True, description="whether negatives.parquet lists every feature active in a window"
    )
    versions: dict[str, str]


def write_run_info(folder: Path, info: RunInfo) -> None:
    (folder / RUN_JSON).write_text(info.model_dump_json(indent=2) + "\n", encoding="utf-8")


def read_run_info(folder: Path) -> RunInfo:
    """Read and validate ``run.json``; refuse incomplete folders and other schema versions."""
    if not folder.is_dir():
        raise RunFolderError(f"{folder}: run folder not found")
    missing = [name for name in REQUIRED_FILES if not (folder / name).is_file()]
    if missing:
        raise RunFolderError(
            f"{folder}: not a complete run folder (missing {', '.join(missing)}); "
            "was the collection interrupted?"
        )
    path = folder / RUN_JSON
    try:
        raw: Any = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise RunFolderError(f"{path}: not valid JSON ({exc.msg})") from exc
    version = raw.get("schema_version") if isinstance(raw, dict) else None
    if version != RUN_SCHEMA_VERSION:
        raise RunFolderError(
            f"{path}: field 'schema_version' is {version!r}, this labeler reads version "
            f"{RUN_SCHEMA_VERSION}; collect the run again with this version"
        )
    try:
        info = RunInfo.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        raise RunFolderError(f"{path}: field '{field}': {first['msg']}") from exc
    for name in (FEATURES, EXAMPLES, NEGATIVES):
        check_parquet(folder / name)
    return info


_PARQUET_MAGIC = b"PAR1"


def check_parquet(path: Path) -> None:
    """Refuse a parquet file that is empty, truncated or not parquet, naming it, before
    anything reads it (a reader's own error names neither the file nor what to do).
    Only the two ends are read: a file cut short loses its footer."""
    size = path.stat().st_size
    problem = None
    if size == 0:
        problem = "is empty"
    elif size < 12:
        problem = f"is {size} bytes, too short to be parquet"
    else:
        with path.open("rb") as f:
            head = f.read(4)
            f.seek(-4, os.SEEK_END)
            tail = f.read(4)
        if head != _PARQUET_MAGIC:
            problem = "is not a parquet file"
        elif tail != _PARQUET_MAGIC:
            problem = "is truncated (its footer is missing)"
    if problem:
        raise RunFolderError(
            f"{path}: {problem}; the run folder is damaged: restore it or collect it again"
        )


def publish(staging: Path, out: Path) -> None:
    """Move a finished staging folder to ``out``; an old ``out`` goes only after that."""
    if not out.exists():
        staging.rename(out)
        return
    trash = out.with_name(f".{out.name}.old-{os.getpid()}")
    out.rename(trash)
    staging.rename(out)
    if trash.is_dir():
        shutil.rmtree(trash)
    else:
        trash.unlink()


def package_versions(dists: tuple[str, ...] = ("transcoder-labeler", "polars")) -> dict[str, str]:
    """Installed versions of ``dists``, for provenance."""
    out = {}
    for dist in dists:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out
