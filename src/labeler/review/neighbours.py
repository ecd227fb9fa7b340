"""Each feature's nearest features, computed once per run and read in O(1).

Three kinds, each within the feature's own layer (a layer's features share one
dictionary) and among its alive features only (a dead feature is never listed and
lists nothing):

- ``decoder``: the cosine between decoder columns ``W_dec[:, i]``: features that write
  the same direction into the residual stream;
- ``encoder``: the cosine between encoder rows ``W_enc[i]``: features that read the same
  direction;
- ``coactivation``: the features that fire in the same corpus windows, from
  ``negatives.parquet`` (a uniform sample of the corpus, with every feature active
  anywhere in each window). Ranked by the Jaccard index of the two window sets,
  ``|A ∩ B| / |A ∪ B|``, among the pairs that share at least ``MIN_SHARED`` windows.
  Jaccard, not ``P(B | A)``: the conditional is near 1 for an always-on B whatever A is,
  so it would list the same few dense features first for every feature; the union in
  Jaccard's denominator charges B for every window it fires in without A. The minimum
  of 2 shared windows keeps a single coincidence between two rare features (one window
  each: Jaccard 1) out of the list. ``shared`` keeps the number of windows both fire in.

The cosines read the adapter checkpoint named by ``run.json`` (``adapter_path``), one
layer's tensor at a time (safetensors, lazily), and compute blockwise in torch on the
device asked for: a block of rows against the layer's whole (alive) matrix, never all
pairs at once. The checkpoint must be the one the run was collected from (its sha256 is
checked against ``adapter_hash``); a missing folder, a hub id not in the local cache
(nothing is downloaded here), a neuron run (plain MLP neurons have no dictionary of
their own) or a changed checkpoint leave the two cosine kinds out with a note saying
why, and co-activation is built anyway.

On disk, ``RUN/neighbours/`` holds one fixed-width array per kind and field
(``{kind}_ids.npy``: global indices ``layer * n_features_per_layer + index``, -1 where a
row has fewer than k; ``{kind}_values.npy``; ``coactivation_shared.npy``), indexed by the
feature's global index and opened memory-mapped, and ``meta.json`` (version, fingerprint,
k, device, timings, notes). The fingerprint covers ``features.parquet`` and
``negatives.parquet`` (size and modification time), the adapter hash, the unit, the
width and k: when it differs the index is stale (``NeighbourIndex.open`` answers None)
and ``ensure_neighbours`` rebuilds it. An index built without its cosines is stale too
once the checkpoint it missed has changed (appeared, or been replaced), so that they
are computed when they can be. A build writes a temporary folder and renames it into
place: a killed build leaves the old index or none.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import polars as pl

from collectors.run_format import FEATURES, NEGATIVES, publish, read_run_info
from labeler.errors import UserError
from labeler.labeling.lock import process_exists
from labeler.run.data import RunData

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

NEIGHBOUR_KINDS = ("decoder", "encoder", "coactivation")
COSINE_KINDS = ("decoder", "encoder")
INDEX_DIR = "neighbours"
META = "meta.json"
VERSION = 1
DEFAULT_K = 10
MIN_SHARED = 2  # co-activation: windows a pair must share to be listed
BLOCK_BYTES = 1 << 26  # one block of scores (rows x the layer's alive features), float32
DEVICES = ("auto", "cpu", "cuda")

IntArray = npt.NDArray[np.int32]
FloatArray = npt.NDArray[np.float32]


@dataclass(frozen=True)
class Neighbour:
    feature_id: str  # "L{layer}F{index}"
    value: float  # cosine, or the co-activation measure (Jaccard)
    shared: int | None  # co-activation: windows where both fire; None for cosines


class NeighbourIndex:
    """A built index, memory-mapped: ``of`` reads one row of each kind's arrays."""

    def __init__(self, folder: Path, meta: dict[str, Any]) -> None:
        self.folder = folder
        self.meta = meta
        self.k = int(meta["k"])
        self.notes: dict[str, str] = {kind: str(meta["notes"].get(kind, ""))
                                      for kind in NEIGHBOUR_KINDS}  # fmt: skip
        self._per_layer = int(meta["n_features_per_layer"])
        self._rows = int(meta["rows"])
        self._arrays: dict[str, tuple[Any, Any, Any]] = {}
        for kind in meta["kinds"]:
            ids = np.load(folder / f"{kind}_ids.npy", mmap_mode="r")
            values = np.load(folder / f"{kind}_values.npy", mmap_mode="r")
            shared_path = folder / f"{kind}_shared.npy"
            shared = np.load(shared_path, mmap_mode="r") if shared_path.is_file() else None
            if ids.shape != (self._rows, self.k) or values.shape != ids.shape:
                raise ValueError(f"{folder / f'{kind}_ids.npy'}: shape {ids.shape}, "
                                 f"expected {(self._rows, self.k)}")  # fmt: skip
            self._arrays[kind] = (ids, values, shared)

    @classmethod
    def open(cls, run_folder: Path) -> NeighbourIndex | None:
        """The run's index; None when it is not built, damaged or stale."""
        index, _why = _open_checked(run_folder)
        return index

    def of(self, layer: int, index: int) -> dict[str, list[Neighbour]]:
        """The neighbours of feature ``L{layer}F{index}``, by kind (every kind present,
        [] where it has none or the kind was not built), nearest first."""
        out: dict[str, list[Neighbour]] = {kind: [] for kind in NEIGHBOUR_KINDS}
        row = layer * self._per_layer + index
        if layer < 0 or not 0 <= index < self._per_layer or row >= self._rows:
            return out
        per_layer = self._per_layer
        for kind, (ids, values, shared) in self._arrays.items():
            row_ids = ids[row].tolist()
            row_values = values[row].tolist()
            row_shared = shared[row].tolist() if shared is not None else None
            listed = out[kind]
            for j, other in enumerate(row_ids):
                if other < 0:
                    break
                listed.append(Neighbour(
                    feature_id=f"L{other // per_layer}F{other % per_layer}",
                    value=float(row_values[j]),
                    shared=None if row_shared is None else int(row_shared[j]),
                ))  # fmt: skip
        return out

    def close(self) -> None:
        """Let go of the memory maps (they close once nothing else holds them)."""
        self._arrays = {}


def _fingerprint(run_folder: Path, adapter_hash: str, unit: str, per_layer: int, k: int) -> str:
    files = {}
    for name in (FEATURES, NEGATIVES):
        stat = (run_folder / name).stat()
        files[name] = [stat.st_size, stat.st_mtime_ns]
    payload = {"version": VERSION, "k": k, "files": files, "adapter_hash": adapter_hash,
               "unit": unit, "per_layer": per_layer}  # fmt: skip
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _checkpoint_probe(adapter_path: str) -> str:
    """A cheap description of the checkpoint's state (no hashing): its files' sizes and
    modification times, or where it was looked for and not found."""
    local = Path(adapter_path).expanduser()
    if local.is_dir():
        parts = [
            f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}"
            for p in sorted(local.iterdir())
            if p.name == "config.json" or p.name.endswith((".safetensors", ".index.json"))
        ]
        return "local " + " ".join(parts)
    cached = _hub_cached(adapter_path)
    return f"hub {cached}" if cached is not None else "absent"


def _hub_cached(repo_id: str) -> str | None:
    """The local cache's copy of a hub checkpoint's config.json, if any (no network)."""
    if repo_id.count("/") != 1 or repo_id.startswith((".", "/", "~")):
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    try:
        found = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # an id the client refuses is simply not cached
        return None
    return found if isinstance(found, str) else None


def _open_checked(run_folder: Path, k: int | None = None) -> tuple[NeighbourIndex | None, str]:
    """The index if current, else None and why it is not (for the build's message)."""
    folder = run_folder / INDEX_DIR
    try:
        meta = json.loads((folder / META).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None, "not built yet"
    except (OSError, json.JSONDecodeError):
        return None, f"{folder / META} is damaged"
    if not isinstance(meta, dict) or meta.get("version") != VERSION:
        return None, "built by another version"
    if k is not None and meta.get("k") != k:
        return None, f"built with k={meta.get('k')}, k={k} asked for"
    info = read_run_info(run_folder)
    current = _fingerprint(run_folder, info.adapter_hash, info.unit, info.n_features_per_layer,
                           int(meta.get("k", DEFAULT_K)))  # fmt: skip
    if meta.get("fingerprint") != current:
        return None, "the run or its adapter changed since it was built"
    probe = meta.get("checkpoint_probe")
    if probe is not None and probe != _checkpoint_probe(info.adapter_path):
        return None, "the checkpoint it had no cosines from has changed"
    try:
        return NeighbourIndex(folder, meta), ""
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return None, f"damaged ({exc})"


def _has_torch() -> bool:
    """Whether torch is installed (the ``model`` extra); without it co-activation is
    computed in numpy and the cosines are left out."""
    return importlib.util.find_spec("torch") is not None


def resolve_device(device: str) -> str:
    """``auto``: cuda when torch sees a GPU, else cpu; ``cuda`` without one is an error."""
    if device not in DEVICES:
        raise UserError(f"--device {device}: choose one of {', '.join(DEVICES)}")
    if not _has_torch():
        if device == "cuda":
            raise UserError("--device cuda: torch is not installed here (pip install "
                            "'transcoder-labeler[model]'); use --device cpu")  # fmt: skip
        return "cpu"
    import torch

    available = torch.cuda.is_available()
    if device == "cuda" and not available:
        raise UserError("--device cuda: torch sees no CUDA device here; use --device cpu")
    if device == "auto":
        return "cuda" if available else "cpu"
    return device


def ensure_neighbours(
    run: RunData,
    device: str = "auto",
    rebuild: bool = False,
    progress: Callable[[int], object] | None = None,
    on_build: Callable[[str, int], object] | None = None,
    k: int = DEFAULT_K,
) -> NeighbourIndex:
    """The run's current index, built first if it is missing, stale or ``rebuild``.
    ``on_build(why, total)`` is called when a build starts; ``progress(n)`` then
    advances by ``n`` of ``total`` steps (each alive feature once per kind)."""
    if k < 1:
        raise UserError(f"k={k}: at least one neighbour per feature")
    why = "--rebuild"
    if not rebuild:
        index, why = _open_checked(run.folder, k)
        if index is not None:
            return index
    used = resolve_device(device)
    _build(run, used, k, why, progress, on_build)
    index, why = _open_checked(run.folder, k)
    if index is None:  # only if the run changed while it was being built
        raise UserError(f"{run.folder / INDEX_DIR}: the index just built is not current ({why})")
    return index


@dataclass
class _Kind:
    """One kind's arrays while building."""

    ids: IntArray
    values: FloatArray
    shared: IntArray | None = None
    seconds: float = 0.0


def _new_kind(rows: int, k: int, with_shared: bool = False) -> _Kind:
    return _Kind(
        ids=np.full((rows, k), -1, dtype=np.int32),
        values=np.zeros((rows, k), dtype=np.float32),
        shared=np.zeros((rows, k), dtype=np.int32) if with_shared else None,
    )


class _NoCosines(Exception):
    """Why the cosine kinds are left out (the note)."""


def _build(
    run: RunData,
    device: str,
    k: int,
    why: str,
    progress: Callable[[int], object] | None,
    on_build: Callable[[str, int], object] | None,
) -> None:
    started = time.perf_counter()
    info = run.info
    per_layer = info.n_features_per_layer
    # what the index is built from, taken before reading it
    fingerprint = _fingerprint(run.folder, info.adapter_hash, info.unit, per_layer, k)
    features = pl.read_parquet(run.folder / FEATURES, columns=["layer", "index", "alive"])
    usable = pl.col("alive") & (pl.col("layer") >= 0) & pl.col("index").is_between(0, per_layer - 1)
    alive_by_layer = {
        int(layer): np.sort(group["index"].to_numpy().astype(np.int64))
        for (layer,), group in features.filter(usable).group_by("layer")
    }
    layers = sorted(set(info.layers) | set(alive_by_layer))
    rows = (max(layers) + 1) * per_layer if layers else 0
    n_alive = sum(len(v) for v in alive_by_layer.values())
    if on_build is not None:
        on_build(why, n_alive * len(NEIGHBOUR_KINDS))
    done = [0]  # steps reported so far

    def advance(n: int) -> None:
        done[0] += n
        if progress is not None:
            progress(n)

    kinds: dict[str, _Kind] = {}
    notes: dict[str, str] = {}
    probe: str | None = None
    cosine_steps = 2 * n_alive
    checked = 0.0  # seconds finding the checkpoint and checking its hash
    t0 = time.perf_counter()
    try:
        folder = _checkpoint_folder(run)
        checked = time.perf_counter() - t0
        kinds |= _cosines(folder, run, alive_by_layer, rows, k, device, advance)
        for kind in COSINE_KINDS:
            part = "columns W_dec[:, i]" if kind == "decoder" else "rows W_enc[i]"
            notes[kind] = (f"cosine of the {part} of the layer's alive features, "
                           f"from {folder} (sha256 checked against run.json's "
                           "adapter_hash)")  # fmt: skip
    except _NoCosines as exc:
        checked = time.perf_counter() - t0
        probe = _checkpoint_probe(info.adapter_path)
        for kind in COSINE_KINDS:
            notes[kind] = f"not computed: {exc}"
        advance(cosine_steps - done[0])  # what the cosines had not reported

    t0 = time.perf_counter()
    kinds["coactivation"], notes["coactivation"] = _coactivation(
        run, alive_by_layer, rows, k, device, advance
    )
    kinds["coactivation"].seconds = time.perf_counter() - t0

    staging = run.folder / f".{INDEX_DIR}.partial-{os.getpid()}"
    _remove_abandoned(run.folder)
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir()
        for kind, arrays in kinds.items():
            np.save(staging / f"{kind}_ids.npy", arrays.ids)
            np.save(staging / f"{kind}_values.npy", arrays.values)
            if arrays.shared is not None:
                np.save(staging / f"{kind}_shared.npy", arrays.shared)
        meta = {
            "version": VERSION,
            "fingerprint": fingerprint,
            "k": k,
            "device": device,
            "device_name": _device_name(device),
            "n_features_per_layer": per_layer,
            "rows": rows,
            "kinds": list(kinds),
            "notes": notes,
            "checkpoint_probe": probe,
            "seconds": {"checkpoint_check": round(checked, 3)}
            | {kind: round(arrays.seconds, 3) for kind, arrays in kinds.items()},
            "build_seconds": round(time.perf_counter() - started, 3),
        }
        (staging / META).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        publish(staging, run.folder / INDEX_DIR)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise UserError(f"{run.folder / INDEX_DIR}: cannot write the neighbour index "
                        f"({exc.strerror or exc})") from exc  # fmt: skip
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _remove_abandoned(run_folder: Path) -> None:
    """Temporary folders of builds that were killed (their process is gone)."""
    for path in run_folder.glob(f".{INDEX_DIR}.partial-*"):
        pid = path.name.rsplit("-", 1)[1]
        if pid.isdigit() and int(pid) != os.getpid() and not process_exists(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _device_name(device: str) -> str:
    if device != "cuda":
        return "cpu"
    import torch

    return torch.cuda.get_device_name()


def _checkpoint_folder(run: RunData) -> Path:
    """The run's checkpoint folder, checked to be the one it was collected from."""
    from adapters.checkpoint import checkpoint_hash, read_config
    from adapters.errors import AdapterError

    info = run.info
    if not _has_torch():
        raise _NoCosines("torch is not installed (pip install 'transcoder-labeler[model]'), "
                         "and the checkpoint's tensors are read with it")  # fmt: skip
    if info.unit != "feature":
        raise _NoCosines(f"a {info.unit} run: plain MLP neurons have no dictionary of "
                         "encoder rows and decoder columns to compare")  # fmt: skip
    local = Path(info.adapter_path).expanduser()
    if local.is_dir():
        folder = local
    else:
        cached = _hub_cached(info.adapter_path)
        if cached is None:
            raise _NoCosines(
                f"the checkpoint {info.adapter_path} (run.json's adapter_path) is not found "
                "here, as a folder or in the local Hugging Face cache (nothing is downloaded "
                "while browsing); put it back there and the cosines are built at the next start"
            )
        folder = Path(cached).parent
    try:
        config, _raw = read_config(folder)
        if config.n_features != info.n_features_per_layer:
            raise _NoCosines(
                f"{folder / 'config.json'}: transcoder_n_features is {config.n_features}, the "
                f"run has {info.n_features_per_layer} features per layer: another adapter"
            )
        if checkpoint_hash(folder) != info.adapter_hash:
            raise _NoCosines(
                f"the checkpoint {folder} has changed since the run was collected (its sha256 "
                "differs from run.json's adapter_hash): its cosines would be another adapter's"
            )
    except (AdapterError, OSError) as exc:
        raise _NoCosines(f"the checkpoint {folder} cannot be read: {exc}") from exc
    return folder


class _LazyCheckpoint:
    """The checkpoint's transcoder tensors, read one at a time from their safetensors
    file (only the headers are read up front)."""

    def __init__(self, folder: Path) -> None:
        from safetensors import safe_open

        self.folder = folder
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            self.where = {str(name): folder / str(file) for name, file in weight_map.items()}
        else:
            self.where = {}
            for file in sorted(folder.glob("*.safetensors")):
                with safe_open(str(file), framework="pt") as handle:
                    for name in handle.keys():  # noqa: SIM118 - safe_open has no __iter__
                        self.where[name] = file

    def tensor(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        file = self.where.get(name)
        if file is None:
            raise _NoCosines(f"the checkpoint {self.folder} has no tensor '{name}'")
        with safe_open(str(file), framework="pt") as handle:
            tensor: torch.Tensor = handle.get_tensor(name)
        return tensor


def _cosines(
    folder: Path,
    run: RunData,
    alive_by_layer: dict[int, npt.NDArray[np.int64]],
    rows: int,
    k: int,
    device: str,
    advance: Callable[[int], object],
) -> dict[str, _Kind]:
    import torch
    from safetensors import SafetensorError

    per_layer = run.info.n_features_per_layer
    kinds = {kind: _new_kind(rows, k) for kind in COSINE_KINDS}
    try:
        weights = _LazyCheckpoint(folder)
        for layer, alive in sorted(alive_by_layer.items()):
            prefix = f"model.layers.{layer}.mlp.transcoder_"
            for kind in COSINE_KINDS:
                t0 = time.perf_counter()
                name = prefix + ("dec.weight" if kind == "decoder" else "enc.weight")
                raw = weights.tensor(name)
                matrix = raw.T if kind == "decoder" else raw  # [n_features, d_model]
                if matrix.shape[0] != per_layer:
                    raise _NoCosines(f"the checkpoint {folder}: tensor '{name}' has "
                                     f"{matrix.shape[0]} features, the run "
                                     f"{per_layer}")  # fmt: skip
                chosen = torch.from_numpy(alive).to(device)
                rows_of = matrix.to(device)[chosen].float()
                del raw, matrix
                ids, values = _top_cosines(rows_of, k, advance)
                _store(kinds[kind], layer * per_layer, alive, ids, values)
                kinds[kind].seconds += time.perf_counter() - t0
    except (SafetensorError, OSError, KeyError, json.JSONDecodeError) as exc:
        raise _NoCosines(f"the checkpoint {folder} cannot be read: {exc}") from exc
    return kinds


def _top_cosines(
    matrix: torch.Tensor, k: int, advance: Callable[[int], object]
) -> tuple[npt.NDArray[np.int64], FloatArray]:
    """Each row's k most similar other rows by cosine: local positions and values."""
    import torch

    m = matrix.shape[0]
    width = min(k, m - 1)
    if width < 1:
        advance(m)
        return np.zeros((m, 0), dtype=np.int64), np.zeros((m, 0), dtype=np.float32)
    unit = matrix / matrix.norm(dim=1, keepdim=True).clamp_min(1e-12)
    block = max(1, BLOCK_BYTES // (4 * m))
    ids = np.empty((m, width), dtype=np.int64)
    values = np.empty((m, width), dtype=np.float32)
    for start in range(0, m, block):
        stop = min(start + block, m)
        scores = unit[start:stop] @ unit.T
        own = torch.arange(start, stop, device=scores.device)
        scores[own - start, own] = -torch.inf
        top = scores.topk(width, dim=1)
        ids[start:stop] = top.indices.cpu().numpy()
        values[start:stop] = top.values.cpu().numpy()
        advance(stop - start)
    return ids, values


def _store(
    kind: _Kind,
    offset: int,
    alive: npt.NDArray[np.int64],
    positions: npt.NDArray[np.int64],
    values: FloatArray,
    shared: npt.NDArray[np.int64] | None = None,
    valid: npt.NDArray[np.bool_] | None = None,
) -> None:
    """Write a layer's results: row ``alive[r]`` gets ``alive[positions[r]]``."""
    width = positions.shape[1]
    if width == 0:
        return
    ids = (offset + alive[positions]).astype(np.int32)
    if valid is not None:
        ids = np.where(valid, ids, -1)
    kind.ids[offset + alive, :width] = ids
    kind.values[offset + alive, :width] = np.where(ids >= 0, values, 0.0)
    if shared is not None and kind.shared is not None:
        kind.shared[offset + alive, :width] = np.where(ids >= 0, shared, 0)


def _coactivation(
    run: RunData,
    alive_by_layer: dict[int, npt.NDArray[np.int64]],
    rows: int,
    k: int,
    device: str,
    advance: Callable[[int], object],
) -> tuple[_Kind, str]:
    """Jaccard of the windows two features of a layer fire in (see the module's text)."""
    per_layer = run.info.n_features_per_layer
    kind = _new_kind(rows, k, with_shared=True)
    negatives = pl.read_parquet(run.folder / NEGATIVES, columns=["active_features"])
    n_windows = negatives.height
    pairs = (
        negatives.with_row_index("window")
        .explode("active_features")
        .drop_nulls()
        .unique()
    )  # fmt: skip
    windows = pairs["window"].to_numpy().astype(np.int64)
    active = pairs["active_features"].to_numpy().astype(np.int64)
    n_listed = 0
    for layer, alive in sorted(alive_by_layer.items()):
        offset = layer * per_layer
        mine = (active >= offset) & (active < offset + per_layer)
        local = active[mine] - offset
        counts = np.bincount(local, minlength=per_layer)
        # only alive features in at least MIN_SHARED windows can have (or be) a neighbour
        candidates = alive[counts[alive] >= MIN_SHARED]
        m = candidates.size
        if m >= 2:
            column = np.full(per_layer, -1, dtype=np.int64)
            column[candidates] = np.arange(m)
            keep = column[local] >= 0
            fires = np.zeros((n_windows, m), dtype=np.float32)
            fires[windows[mine][keep], column[local[keep]]] = 1.0
            positions, values, shared = _top_jaccard(fires, k, device if _has_torch() else None)
            _store(kind, offset, candidates, positions, values, shared, valid=shared >= MIN_SHARED)
            n_listed += int((shared[:, :1] >= MIN_SHARED).sum()) if shared.size else 0
        advance(alive.size)
    note = (
        f"Jaccard of the corpus windows each fires in, over {n_windows:,} windows of up to "
        f"{run.info.params.negative_window} tokens (negatives.parquet, a uniform sample of "
        f"the corpus); pairs sharing at least {MIN_SHARED} windows; {n_listed:,} features "
        "have one"
    )
    if n_windows == 0:
        note = "not computed: negatives.parquet has no windows (the run kept no negatives)"
    elif not run.info.negatives_checked:
        note += "; this run's windows may not list every active feature (imported)"
    return kind, note


def _top_jaccard(
    fires: npt.NDArray[np.float32], k: int, device: str | None
) -> tuple[npt.NDArray[np.int64], FloatArray, npt.NDArray[np.int64]]:
    """Each column's k columns of highest Jaccard (blockwise, in torch on ``device``, or
    in numpy when it is None): positions, values and the windows shared. Equal Jaccard
    goes to the pair sharing more windows; pairs under ``MIN_SHARED`` shared windows
    score below 0 (the caller drops them)."""
    n_windows, m = fires.shape
    width = min(k, m - 1)
    # ranks by Jaccard, then by shared: distinct Jaccard values differ by at least
    # 1 / n_windows², more than the shared term's whole range
    tie = 1.0 / (2.0 * (n_windows + 1) ** 3)
    block = max(1, BLOCK_BYTES // (8 * m))
    ids = np.empty((m, width), dtype=np.int64)
    shared_out = np.empty((m, width), dtype=np.int64)
    counts = fires.sum(0, dtype=np.float64)
    if device is not None:
        import torch

        on = torch.from_numpy(fires).to(device)
        counted = torch.from_numpy(counts).to(device)
    for start in range(0, m, block):
        stop = min(start + block, m)
        rows = np.arange(stop - start)
        if device is None:
            shared = (fires[:, start:stop].T @ fires).astype(np.float64)  # [block, m]
            score = shared / np.maximum(counts[start:stop, None] + counts - shared, 1.0)
            score += shared * tie
            score[shared < MIN_SHARED] = -1.0
            score[rows, rows + start] = -2.0
            part = np.argpartition(-score, width - 1, axis=1)[:, :width]
            order = np.argsort(-np.take_along_axis(score, part, 1), axis=1, kind="stable")
            top = np.take_along_axis(part, order, 1)
            ids[start:stop] = top
            shared_out[start:stop] = np.take_along_axis(shared, top, 1).round()
        else:
            both = (on[:, start:stop].T @ on).double()
            # in place: Jaccard, plus the tie-break, -1 under MIN_SHARED shared windows
            ranked = counted[start:stop, None] + counted[None, :]
            ranked.sub_(both).clamp_min_(1.0).reciprocal_().mul_(both).add_(both, alpha=tie)
            ranked.masked_fill_(both < MIN_SHARED, -1.0)
            own = torch.from_numpy(rows).to(device)
            ranked[own, own + start] = -2.0
            chosen = ranked.topk(width, dim=1).indices
            ids[start:stop] = chosen.cpu().numpy()
            shared_out[start:stop] = both.gather(1, chosen).round().long().cpu().numpy()
    picked = counts[ids]
    own_counts = counts[:, None]
    union = np.maximum(own_counts + picked - shared_out, 1.0)
    values = (shared_out / union).astype(np.float32)
    return ids, values, shared_out
