"""Transcoder-adapter checkpoints in the paper's format: validate, load, save.

A checkpoint is a full Hugging Face model folder whose ``config.json`` adds
``transcoder_n_features`` (int) and ``transcoder_dec_bias`` (bool), and whose safetensors
hold, for every layer ``i``, ``model.layers.{i}.mlp.transcoder_enc.weight``
[n_features, d_model], ``...transcoder_enc.bias`` [n_features],
``...transcoder_dec.weight`` [d_model, n_features] and, with ``transcoder_dec_bias``,
``...transcoder_dec.bias`` [d_model]. The released checkpoints load unmodified, from a
local folder or a hub id.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapters.errors import CheckpointError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

CONFIG = "config.json"
SAFETENSORS_INDEX = "model.safetensors.index.json"
ARCHITECTURE = "Qwen2ForCausalLMWithTranscoder"
TENSOR_PREFIX = "model.layers.{layer}.mlp.transcoder_"


@dataclass(frozen=True)
class TranscoderConfig:
    """The adapter's shape, read from ``config.json``."""

    n_features: int
    dec_bias: bool
    n_layers: int
    d_model: int


@dataclass(frozen=True)
class LayerWeights:
    """One layer's sparse branch: ``W_dec · relu(W_enc · x + b_enc) (+ b_dec)``."""

    enc_weight: torch.Tensor  # [n_features, d_model]
    enc_bias: torch.Tensor  # [n_features]
    dec_weight: torch.Tensor  # [d_model, n_features]
    dec_bias: torch.Tensor | None  # [d_model]


def resolve_checkpoint(path_or_id: str) -> Path:
    """A local folder as is; anything else is taken as a hub id and downloaded."""
    local = Path(path_or_id).expanduser()
    if local.exists():
        if not local.is_dir():
            raise CheckpointError(f"{local}: a checkpoint must be a folder, not a file")
        return local
    if path_or_id.count("/") != 1 or path_or_id.startswith((".", "/")):
        raise CheckpointError(f"{path_or_id}: no such checkpoint folder")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=path_or_id))
    except Exception as exc:  # the hub client raises many types; all mean "not reachable"
        raise CheckpointError(
            f"{path_or_id}: not a local folder, and downloading it from the hub failed: {exc}"
        ) from exc


def read_config(folder: Path) -> tuple[TranscoderConfig, dict[str, Any]]:
    """Validate ``config.json`` and return the adapter shape and the raw config."""
    path = folder / CONFIG
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; a checkpoint folder needs a config.json")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc.msg})") from exc
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: must hold a JSON object")
    n_features = raw.get("transcoder_n_features")
    dec_bias = raw.get("transcoder_dec_bias")
    if n_features is None:
        raise CheckpointError(
            f"{path}: field 'transcoder_n_features' is missing; this is not a transcoder-"
            "adapter checkpoint (use --neurons for a plain model)"
        )
    if not isinstance(n_features, int) or isinstance(n_features, bool) or n_features <= 0:
        raise CheckpointError(f"{path}: field 'transcoder_n_features' must be a positive int")
    if not isinstance(dec_bias, bool):
        raise CheckpointError(f"{path}: field 'transcoder_dec_bias' must be true or false")
    for key in ("num_hidden_layers", "hidden_size"):
        if not isinstance(raw.get(key), int):
            raise CheckpointError(f"{path}: field '{key}' must be an int")
    config = TranscoderConfig(
        n_features=n_features,
        dec_bias=dec_bias,
        n_layers=int(raw["num_hidden_layers"]),
        d_model=int(raw["hidden_size"]),
    )
    return config, raw


def _weight_files(folder: Path) -> list[Path]:
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index}: not a valid safetensors index ({exc})") from exc
        return sorted({folder / name for name in weight_map.values()})
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder}: no *.safetensors weight files")
    return files


def load_layer_weights(folder: Path, config: TranscoderConfig) -> dict[int, LayerWeights]:
    """Read every layer's transcoder tensors and check their names and shapes."""
    from safetensors import SafetensorError, safe_open

    tensors: dict[str, torch.Tensor] = {}
    for file in _weight_files(folder):
        if not file.is_file():
            raise CheckpointError(f"{file}: listed in the index but missing")
        try:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():  # noqa: SIM118 - safe_open has no __iter__
                    if ".mlp.transcoder_" in key:
                        tensors[key] = handle.get_tensor(key)
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{file}: corrupt or unreadable safetensors ({exc})") from exc
    n, d = config.n_features, config.d_model
    widths = {
        layer: int(tensors[name].shape[0])
        for layer in range(config.n_layers)
        if (name := TENSOR_PREFIX.format(layer=layer) + "enc.weight") in tensors
    }
    odd = {layer: w for layer, w in widths.items() if w != n}
    if odd and len(set(widths.values())) > 1:
        listed = ", ".join(f"layer {la}: {w}" for la, w in sorted(odd.items())[:5])
        raise CheckpointError(
            f"{folder}: the adapter's width differs between layers ({listed}; "
            f"config.json says transcoder_n_features={n}); every layer needs {n} features"
        )
    layers: dict[int, LayerWeights] = {}
    for layer in range(config.n_layers):
        prefix = TENSOR_PREFIX.format(layer=layer)
        expected: dict[str, tuple[int, ...]] = {
            "enc.weight": (n, d),
            "enc.bias": (n,),
            "dec.weight": (d, n),
        }
        if config.dec_bias:
            expected["dec.bias"] = (d,)
        for suffix, shape in expected.items():
            name = prefix + suffix
            if name not in tensors:
                raise CheckpointError(f"{folder}: tensor '{name}' is missing")
            actual = tuple(tensors[name].shape)
            if actual != shape:
                raise CheckpointError(
                    f"{folder}: tensor '{name}' has shape {list(actual)}, expected {list(shape)} "
                    f"(transcoder_n_features={n}, hidden_size={d})"
                )
        layers[layer] = LayerWeights(
            enc_weight=tensors[prefix + "enc.weight"],
            enc_bias=tensors[prefix + "enc.bias"],
            dec_weight=tensors[prefix + "dec.weight"],
            dec_bias=tensors.get(prefix + "dec.bias") if config.dec_bias else None,
        )
    return layers


def checkpoint_hash(folder: Path) -> str:
    """sha256 over the config and weight files (names and bytes), for provenance."""
    digest = hashlib.sha256()
    for file in [folder / CONFIG, *_weight_files(folder)]:
        digest.update(file.name.encode())
        with file.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()
