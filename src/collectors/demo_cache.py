"""The planted demo's inputs built once per version and reused from a per-user cache.

``build_demo`` is deterministic from its seed, its shape, the source of the modules that
build it and the versions of the libraries it calls, and takes most of a demo's time.
An entry of the cache (in its ``planted-demo`` subfolder) is the folder ``build_demo``
writes (``corpus.jsonl``, ``model/``, ``ground_truth.json``) and a ``manifest.json``
naming the entry's key and the sha256 of every file. An entry is built in a temporary
folder, its manifest written last, and the folder renamed into place, so no reader sees
a half-written entry; builds of one key are serialized by a lock file, so concurrent
demos build it once. A reader copies the files out and checks each copy against the
manifest: an entry that is missing a file, has a file that does not match, or a
manifest that does not parse or names another key is a miss, said in one line, and is
built anew.

The cache folder is ``$LABELER_DEMO_CACHE``, else ``$XDG_CACHE_HOME/transcoder-labeler``,
else ``~/.cache/transcoder-labeler``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from collectors.collect import file_sha256
from collectors.demo_model import GROUND_TRUTH, DemoPaths, DemoShape, build_demo

log = logging.getLogger(__name__)

CACHE_ENV = "LABELER_DEMO_CACHE"
"""Its own variable: ``LABELER_CACHE_DIR`` is the judges' shared reply cache, which
setting it turns on (``labeler.judges.requests``)."""
DEMO_FOLDER = "planted-demo"
MANIFEST = "manifest.json"
CACHE_FORMAT = 1
"""Raised when the layout of an entry or of its manifest changes."""

BUILD_MODULES = (
    "adapters",
    "adapters.branch",
    "adapters.checkpoint",
    "adapters.errors",
    "adapters.planted",
    "adapters.random_adapter",
    "adapters.threads",
    "adapters.tiny_tokenizer",
    "adapters.tokenizer_loading",
    "collectors",
    "collectors.batching",
    "collectors.corpus",
    "collectors.demo_model",
    "collectors.errors",
    "collectors.run_format",
    "collectors.synthetic_corpus",
    "prompts",
)
"""Every module of this project that building the demo imports (a test keeps this list
complete): their source is part of an entry's key."""
BUILD_DATA = (("prompts", "taxonomy.json"),)
"""Package data the build reads (the taxonomy's cue words keep random features off them)."""
BUILD_LIBRARIES = ("torch", "transformers", "tokenizers", "safetensors", "numpy")


def cache_root(environ: dict[str, str] | None = None) -> Path:
    """The per-user cache folder: ``$LABELER_DEMO_CACHE``, else
    ``$XDG_CACHE_HOME/transcoder-labeler``, else ``~/.cache/transcoder-labeler``."""
    env = os.environ if environ is None else environ
    if env.get(CACHE_ENV):
        return Path(env[CACHE_ENV]).expanduser()
    if env.get("XDG_CACHE_HOME"):
        return Path(env["XDG_CACHE_HOME"]).expanduser() / "transcoder-labeler"
    return Path.home() / ".cache" / "transcoder-labeler"


def _module_file(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None:
        raise RuntimeError(f"{name}: cannot find the module's source to key the demo cache")
    return Path(spec.origin)


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "absent"


def key_parts(seed: int, shape: DemoShape) -> dict[str, Any]:
    """Everything that determines what ``build_demo`` writes."""
    sources = {name: file_sha256(_module_file(name)) for name in BUILD_MODULES}
    for package, resource in BUILD_DATA:
        sources[f"{package}/{resource}"] = file_sha256(_module_file(package).parent / resource)
    return {
        "format": CACHE_FORMAT,
        "seed": seed,
        "shape": asdict(shape),
        "sources": sources,
        "libraries": {name: _version(name) for name in BUILD_LIBRARIES},
    }


def entry_key(parts: dict[str, Any]) -> str:
    """The hex digest naming an entry: the sha256 of its parts as canonical JSON."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class DemoInputs:
    """The demo's inputs copied out of the cache (or built where there is none)."""

    paths: DemoPaths
    entry: Path | None
    """The cache entry they came from; None when the cache could not be written."""
    built: bool
    """Whether this call built them (else they were reused)."""
    built_at: str
    """When the entry was built, UTC, to the minute."""
    problem: str | None = None
    """Why an existing entry was not reused (damaged, partial, tampered), in one line."""


def _paths(folder: Path) -> DemoPaths:
    return DemoPaths(folder / "corpus.jsonl", folder / "model", folder / GROUND_TRUTH)


def _files(folder: Path) -> list[str]:
    return sorted(
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.is_file() and p.name != MANIFEST
    )


def write_manifest(folder: Path, key: str, parts: dict[str, Any]) -> None:
    """Hash every file of ``folder`` into its manifest, written atomically, last."""
    manifest = {
        "key": key,
        "built_at": _now(),
        "parts": parts,
        "files": {name: file_sha256(folder / name) for name in _files(folder)},
    }
    partial = folder / f".{MANIFEST}.partial"
    partial.write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    os.replace(partial, folder / MANIFEST)


def read_manifest(entry: Path, key: str) -> tuple[dict[str, Any] | None, str | None]:
    """The entry's manifest, or None and why it cannot be used."""
    path = entry / MANIFEST
    if not entry.is_dir():
        return None, None  # nothing cached yet: a quiet miss
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None, f"{path} is missing (a build that did not finish)"
    except (OSError, ValueError) as exc:
        return None, f"{path} cannot be read ({exc})"
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or manifest.get("key") != key:
        return None, f"{path} names another entry's key or no files"
    required = {"corpus.jsonl", GROUND_TRUTH, "model/config.json"}
    if not required <= set(files):
        return None, f"{path} does not list {', '.join(sorted(required - set(files)))}"
    return manifest, None


def _copy_hashing(source: Path, target: Path) -> str:
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with source.open("rb") as reader, target.open("wb") as writer:
        for chunk in iter(lambda: reader.read(1 << 20), b""):
            digest.update(chunk)
            writer.write(chunk)
    return digest.hexdigest()


def copy_verified(entry: Path, key: str, out: Path) -> tuple[dict[str, Any] | None, str | None]:
    """Copy the entry's files into ``out`` and check each copy against the manifest: the
    manifest when every copy matches, else None and what was wrong (None too when there
    is no entry). ``out`` holds exactly the entry's files on success."""
    manifest, problem = read_manifest(entry, key)
    if manifest is None:
        return None, problem
    if out.exists():
        shutil.rmtree(out)
    for name, expected in sorted(manifest["files"].items()):
        source = entry / name
        try:
            copied = _copy_hashing(source, out / name)
        except FileNotFoundError:
            return None, f"{source} is missing"
        except OSError as exc:
            return None, f"{source} cannot be read ({exc.strerror})"
        if copied != expected:
            return None, f"{source} does not match its manifest (damaged or changed)"
    return manifest, None


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` across processes, held while the block runs."""
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build_entry(folder: Path, name: str, key: str, parts: dict[str, Any], seed: int,
                 shape: DemoShape) -> Path:  # fmt: skip
    """Build into a temporary folder beside the entry, then rename it into place."""
    for stale in folder.glob(f".build-{name}-*"):  # left by a build that was killed
        shutil.rmtree(stale, ignore_errors=True)
    building = Path(tempfile.mkdtemp(prefix=f".build-{name}-", dir=folder))
    try:
        build_demo(building, seed=seed, shape=shape)
        write_manifest(building, key, parts)
        entry = folder / name
        if entry.exists():  # damaged or forced: moved aside, then removed
            old = Path(tempfile.mkdtemp(prefix=f".old-{name}-", dir=folder))
            os.replace(entry, old / "entry")
            shutil.rmtree(old, ignore_errors=True)
        os.replace(building, entry)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    return entry


def demo_inputs(out: Path, seed: int = 0, shape: DemoShape | None = None, rebuild: bool = False,
                cache: Path | None = None) -> DemoInputs:  # fmt: skip
    """The demo's corpus, model and ground truth in ``out``: copied from the cache entry
    for this seed, shape and version, built into the cache first when it has no sound
    entry or ``rebuild`` is asked for. ``cache`` is the labeler's cache folder
    (default: ``cache_root()``). Where it cannot be written, built in ``out`` directly."""
    shape = shape or DemoShape()
    parts = key_parts(seed, shape)
    key = entry_key(parts)
    name = f"demo-seed{seed}-{key[:16]}"
    folder = (cache if cache is not None else cache_root()) / DEMO_FOLDER
    try:
        folder.mkdir(parents=True, exist_ok=True)
        lock = folder / f"{name}.lock"
        lock.touch()
    except OSError as exc:
        log.warning("%s: the demo cache cannot be written (%s); building in %s", folder,
                    exc.strerror, out)  # fmt: skip
        build_demo(out, seed=seed, shape=shape)
        return DemoInputs(_paths(out), None, True, _now())
    entry = folder / name
    problem = None
    if not rebuild:
        manifest, problem = copy_verified(entry, key, out)
        if manifest is not None:
            return DemoInputs(_paths(out), entry, False, str(manifest["built_at"]))
    with _locked(lock):
        if not rebuild:  # another process may have built it while this one waited
            manifest, _ = copy_verified(entry, key, out)
            if manifest is not None:
                if problem is not None:
                    log.info("%s: %s; another process has built it anew since", entry, problem)
                return DemoInputs(_paths(out), entry, False, str(manifest["built_at"]))
        log.info("building the planted demo into %s", entry)
        _build_entry(folder, name, key, parts, seed, shape)
        manifest, failed = copy_verified(entry, key, out)
    if manifest is None:
        raise RuntimeError(f"{entry}: a fresh build does not verify: {failed}")
    return DemoInputs(_paths(out), entry, True, str(manifest["built_at"]), problem)


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
