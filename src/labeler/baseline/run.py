"""A baseline run folder: the control adapter of a run, collected like it.

``labeler baseline RUN --out BASE`` makes BASE an ordinary run folder (browse, label,
summarize read it) with two additions: ``control-adapter/``, the checkpoint it was
collected from, and ``baseline.json``, which says it is a control of RUN and how it was
matched. The steps keep what a crash leaves behind:

1. the control checkpoint is built beside BASE (``.BASE.control-adapter``), its
   ``control.json`` written last; a complete one is reused;
2. it is collected into BASE with RUN's collect options (a collection resumes from its
   own checkpoints, ``--checkpoint-every``);
3. the checkpoint moves into BASE, run.json names it there, and ``baseline.json`` is
   written last: its presence marks a finished collection, never redone;
4. a sample is labeled; labeling resumes by itself.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, Field, ValidationError

from collectors.run_format import FEATURES, RUN_JSON, RunInfo, read_run_info, write_run_info
from labeler.errors import UserError

if TYPE_CHECKING:
    import numpy as np

    from labeler.baseline.control import LayerMatch

BASELINE_JSON = "baseline.json"
CONTROL_JSON = "control.json"
CONTROL_ADAPTER = "control-adapter"
BASELINE_SCHEMA_VERSION = 1
MATCHING = (
    "per layer, each control feature takes the activation frequency and the encoder and "
    "decoder norms of one of the run's features (a seeded permutation: the run's "
    "frequency distribution, quantile for quantile; dead features stay dead); random "
    "directions; encoder biases set on the MLP inputs of a corpus slice"
)


class LayerCalibration(BaseModel):
    target_median: float = Field(description="median frequency of the run's alive features")
    calibrated_median: float = Field(
        description="median frequency of their control features on the calibration slice"
    )


class BaselineInfo(BaseModel):
    """``baseline.json``: what BASE is a control of, and how it was matched."""

    schema_version: int = BASELINE_SCHEMA_VERSION
    kind: str = "control"
    control_of: str = Field(description="the run folder this is a control of")
    run_adapter_path: str
    run_adapter_hash: str
    corpus_path: str
    seed: int
    calibration_tokens: int = Field(description="tokens of the corpus slice the biases were set on")
    matched: str = MATCHING
    layers: dict[str, LayerCalibration]
    created_at: str


def read_baseline(folder: Path) -> BaselineInfo:
    """BASE's ``baseline.json``; an error naming the file (and field) when BASE is not
    a baseline run."""
    path = folder / BASELINE_JSON
    if not folder.is_dir():
        raise UserError(f"{folder}: baseline folder not found")
    if not path.is_file():
        raise UserError(
            f"{folder}: not a baseline run (no {BASELINE_JSON}); make one with "
            f"`labeler baseline RUN --out {folder}`"
        )
    try:
        return BaselineInfo.model_validate_json(path.read_text(encoding="utf-8"))
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise UserError(f"{path}: field '{where}': {first['msg']}") from exc


def control_folder(base: Path) -> Path:
    """Where the control checkpoint is built before BASE exists."""
    return base.with_name(f".{base.name}.{CONTROL_ADAPTER}")


def check_sources(run_path: Path, info: RunInfo) -> None:
    """RUN's checkpoint and corpus as run.json records them, or an error naming the field."""
    where = run_path / RUN_JSON
    adapter = info.adapter_path
    hub_id = adapter.count("/") == 1 and not adapter.startswith((".", "/"))
    if not hub_id and not Path(adapter).expanduser().is_dir():
        raise UserError(f"{where}: field 'adapter_path': {adapter} is not a checkpoint folder "
                        "(the run's model moved?)")  # fmt: skip
    if not Path(info.corpus_path).is_file():
        raise UserError(f"{where}: field 'corpus_path': {info.corpus_path} not found "
                        "(the run's corpus moved?)")  # fmt: skip
    if info.unit != "feature":
        raise UserError(f"{where}: field 'unit' is {info.unit!r}; a baseline is made for "
                        "adapter features")  # fmt: skip


def run_frequencies(run_path: Path, info: RunInfo) -> dict[int, np.ndarray]:
    """Each collected layer's frequency per feature index (0 for a dead feature)."""
    import numpy as np
    import polars as pl

    frame = pl.read_parquet(run_path / FEATURES, columns=["layer", "index", "frequency"])
    out = {}
    for layer in info.layers:
        rows = frame.filter(pl.col("layer") == layer)
        freq = np.zeros(info.n_features_per_layer, dtype=np.float64)
        freq[rows["index"].to_numpy()] = rows["frequency"].fill_null(0.0).to_numpy()
        out[layer] = freq
    return out


def build_control_checkpoint(
    run_path: Path,
    info: RunInfo,
    folder: Path,
    seed: int,
    calibration_tokens: int,
    device: str,
    dtype: str,
) -> list[LayerMatch]:
    """Write the control checkpoint of ``run_path`` into ``folder`` (built beside it and
    moved there whole, ``control.json`` last)."""
    from adapters.branch import load_adapter, save_adapter
    from collectors.corpus import read_traces, tokenize_traces
    from labeler.baseline.control import make_control

    adapter, tokenizer, _ = load_adapter(info.adapter_path, device=device, dtype=dtype)
    corpus = tokenize_traces(list(read_traces(Path(info.corpus_path))), tokenizer,
                             info.params.max_length, info.params.chat_format)  # fmt: skip
    if adapter.config.n_features != info.n_features_per_layer:
        raise UserError(f"{run_path / RUN_JSON}: field 'n_features_per_layer' is "
                        f"{info.n_features_per_layer}, the checkpoint {info.adapter_path} has "
                        f"{adapter.config.n_features}")  # fmt: skip
    freqs = run_frequencies(run_path, info)
    matches = make_control(adapter, corpus, info.params, freqs, seed, calibration_tokens)
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        save_adapter(adapter, tokenizer, partial)
        record = {"seed": seed, "calibration_tokens": calibration_tokens,
                  "layers": [asdict(m) for m in matches]}  # fmt: skip
        (partial / CONTROL_JSON).write_text(json.dumps(record) + "\n", encoding="utf-8")
        shutil.rmtree(folder, ignore_errors=True)
        partial.rename(folder)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return matches


def read_control(folder: Path, seed: int, calibration_tokens: int) -> dict[str, Any] | None:
    """A complete control checkpoint's record, None where there is none; an error if it
    was built with another seed or slice."""
    path = folder / CONTROL_JSON
    if not path.is_file():
        return None
    record: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    if (record.get("seed"), record.get("calibration_tokens")) != (seed, calibration_tokens):
        raise UserError(
            f"{path}: built with --seed {record.get('seed')} and --calibration-tokens "
            f"{record.get('calibration_tokens')}, not {seed} and {calibration_tokens}; delete "
            f"{folder} or use those values"
        )
    return record


def finish(base: Path, run_path: Path, run_info: RunInfo, record: dict[str, Any]) -> BaselineInfo:
    """Move the control checkpoint into BASE, name it in run.json, write baseline.json."""
    source = control_folder(base)
    target = base / CONTROL_ADAPTER
    if source.is_dir():
        shutil.rmtree(target, ignore_errors=True)
        source.rename(target)
    base_info = read_run_info(base)
    write_run_info(base, base_info.model_copy(update={"adapter_path": str(target)}))
    layers = {
        str(m["layer"]): LayerCalibration(
            target_median=m["target_median"], calibrated_median=m["calibrated_median"]
        )
        for m in record["layers"]
    }
    baseline = BaselineInfo(
        control_of=str(run_path.resolve()),
        run_adapter_path=run_info.adapter_path,
        run_adapter_hash=run_info.adapter_hash,
        corpus_path=run_info.corpus_path,
        seed=int(record["seed"]),
        calibration_tokens=int(record["calibration_tokens"]),
        layers=layers,
        created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    )
    (base / BASELINE_JSON).write_text(baseline.model_dump_json(indent=2) + "\n", encoding="utf-8")
    return baseline


def run_judges(run_path: Path) -> list[str]:
    """The judges that labeled RUN (none if it has no label store)."""
    from labeler.labeling.store import LabelStore

    path = run_path / "labels.sqlite"
    if not path.is_file():
        return []
    store = LabelStore(path)
    try:
        return store.judges()
    finally:
        store.close()
