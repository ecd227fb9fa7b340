"""The collector's state on disk: checkpoints for resuming, and what shard runs keep
for ``labeler merge-runs``.

One safetensors file holds every layer's accumulator; its metadata holds a JSON
``CollectState`` record: what was being collected (the fingerprint) and which batches
are already in. The file is written to a temporary name and renamed, so a kill at any
moment leaves either the previous checkpoint or the new one, never a torn file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from collectors.accumulator import LayerAccumulator
from collectors.errors import RunFolderError
from collectors.run_format import CollectParams

STATE_FILE = "state.safetensors"
METADATA_KEY = "collect_state"


class Fingerprint(BaseModel):
    """What must match for two states to belong to the same collection."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    adapter_hash: str
    corpus_hash: str
    tokens_hash: str  # of the tokenized corpus: tokenizer, chat format and truncation
    dtype: str
    device_type: str
    unit: str
    params: CollectParams
    layers: list[int]
    n_batches: int

    def differences(self, other: Fingerprint) -> list[str]:
        """Human-readable differences, for error messages."""
        out = []
        mine, theirs = self.model_dump(), other.model_dump()
        for key in mine:
            if key == "params":
                for p in mine["params"]:
                    if mine["params"][p] != theirs["params"][p]:
                        out.append(f"params.{p}: {theirs['params'][p]!r} vs {mine['params'][p]!r}")
            elif mine[key] != theirs[key]:
                out.append(f"{key}: {str(theirs[key])[:16]} vs {str(mine[key])[:16]}")
        return out


class CollectState(BaseModel):
    """The metadata of a state file."""

    model_config = ConfigDict(extra="forbid")

    fingerprint: Fingerprint
    shard: str
    batches_done: list[int]
    created_at: str
    adapter_path: str
    corpus_path: str


def save_state(folder: Path, meta: CollectState, accs: dict[int, LayerAccumulator]) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for acc in accs.values():
        tensors.update(acc.tensors())
    tmp = folder / f".{STATE_FILE}.{os.getpid()}.tmp"
    save_file(tensors, str(tmp), metadata={METADATA_KEY: meta.model_dump_json()})
    with tmp.open("rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, folder / STATE_FILE)


def read_state_meta(folder: Path) -> CollectState | None:
    """The metadata of the state in ``folder``, or None when there is none."""
    from safetensors import SafetensorError, safe_open

    path = folder / STATE_FILE
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            raw = (handle.metadata() or {}).get(METADATA_KEY)
    except (SafetensorError, OSError) as exc:
        raise RunFolderError(f"{path}: unreadable collector state ({exc})") from exc
    if raw is None:
        raise RunFolderError(f"{path}: no '{METADATA_KEY}' metadata; not a collector state")
    try:
        return CollectState.model_validate(json.loads(raw))
    except (ValidationError, json.JSONDecodeError) as exc:
        raise RunFolderError(f"{path}: invalid collector state metadata ({exc})") from exc


def load_accumulators(
    folder: Path, layers: list[int], device: torch.device
) -> dict[int, LayerAccumulator]:
    from safetensors.torch import load_file

    tensors = load_file(str(folder / STATE_FILE))
    return {layer: LayerAccumulator.from_tensors(layer, tensors, device) for layer in layers}
