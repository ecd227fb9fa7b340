"""The neighbour index (labeler.review.neighbours) at the paper's scale: 28 layers x 8192
features, d_model 3584.

OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_neighbours.py \
    --run /tmp/synthetic-229k [--work /tmp/bench-neighbours] [--device cpu] [--keep]

A synthetic checkpoint's transcoder tensors (random, bf16, one safetensors file per
layer with an index, as sharded checkpoints are) are written under ``--work``, and a
run folder there takes ``features.parquet`` and ``negatives.parquet`` from ``--run``
(``benchmarks/synthetic_run.py``'s output, which has the paper's shape) with its
``run.json`` pointing at the checkpoint and carrying its hash. Then one build is timed
(``ensure_neighbours``: checkpoint hash, decoder and encoder cosines, co-activation),
and ``of()`` is read for 1000 random features (median and 95th percentile). The
checkpoint (3.3 GB) is deleted afterwards unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np

from collectors.run_format import EXAMPLES, FEATURES, NEGATIVES, RUN_JSON, read_run_info

LAYERS, FEATURES_PER_LAYER, D_MODEL = 28, 8192, 3584


def write_checkpoint(folder: Path, layers: int, n: int, d: int, seed: int = 0) -> float:
    """Random transcoder tensors in bf16, one file per layer; seconds taken."""
    import torch
    from safetensors.torch import save_file

    started = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    weight_map: dict[str, str] = {}
    for layer in range(layers):
        prefix = f"model.layers.{layer}.mlp.transcoder_"
        name = f"model-{layer + 1:05d}-of-{layers:05d}.safetensors"
        tensors = {
            prefix + "enc.weight": torch.randn(n, d, generator=generator).to(torch.bfloat16),
            prefix + "enc.bias": torch.zeros(n, dtype=torch.bfloat16),
            prefix + "dec.weight": torch.randn(d, n, generator=generator).to(torch.bfloat16),
        }
        save_file(tensors, str(folder / name))
        weight_map |= dict.fromkeys(tensors, name)
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    (folder / "config.json").write_text(json.dumps({
        "transcoder_n_features": n, "transcoder_dec_bias": False,
        "num_hidden_layers": layers, "hidden_size": d, "model_type": "qwen2",
    }))  # fmt: skip
    return time.perf_counter() - started


def bench_run(source: Path, checkpoint: Path, out: Path) -> None:
    """A run folder with ``source``'s tables whose run.json names ``checkpoint``."""
    from adapters.checkpoint import checkpoint_hash

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for name in (FEATURES, NEGATIVES, EXAMPLES):
        (out / name).symlink_to(source / name)
    digest = checkpoint_hash(checkpoint) if checkpoint.exists() else "no checkpoint"
    info = read_run_info(source).model_copy(
        update={"adapter_path": str(checkpoint), "adapter_hash": digest}
    )
    (out / RUN_JSON).write_text(info.model_dump_json(indent=2) + "\n", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="synthetic_run.py's output")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench-neighbours"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--keep", action="store_true", help="keep the synthetic checkpoint")
    parser.add_argument(
        "--no-checkpoint",
        action="store_true",
        help="time co-activation and of() only (run.json names no checkpoint)",
    )
    args = parser.parse_args()

    import torch

    from labeler.review.neighbours import INDEX_DIR, ensure_neighbours
    from labeler.run.data import RunData

    threads = int(os.environ.get("OMP_NUM_THREADS", "0")) or os.cpu_count() or 1
    torch.set_num_threads(threads)
    print(subprocess.run(["df", "-h", str(args.work.parent)], capture_output=True,
                         text=True).stdout.strip())  # fmt: skip
    checkpoint = args.work / "checkpoint"
    if args.no_checkpoint:
        checkpoint = args.work / "absent"
    else:
        if not (checkpoint / "config.json").is_file():
            seconds = write_checkpoint(checkpoint, LAYERS, FEATURES_PER_LAYER, D_MODEL)
            print(f"checkpoint written in {seconds:.1f} s")
        size = sum(p.stat().st_size for p in checkpoint.iterdir())
        print(f"checkpoint: {size / 1e9:.2f} GB ({LAYERS} x {FEATURES_PER_LAYER} x "
              f"{D_MODEL} bf16)")  # fmt: skip
    run_folder = args.work / "run"
    t0 = time.perf_counter()
    bench_run(args.run, checkpoint, run_folder)
    print(f"run folder (hashing the checkpoint once for run.json) in "
          f"{time.perf_counter() - t0:.1f} s")  # fmt: skip
    run = RunData.open(run_folder)
    print(f"alive features: {run.alive().height:,} of {run.features.height:,}; "
          f"negative windows: {run.negatives.height:,}")  # fmt: skip
    print(f"load: {os.getloadavg()}; threads {threads}; {platform.processor() or ''}")

    t0 = time.perf_counter()
    index = ensure_neighbours(run, device=args.device, rebuild=True)
    total = time.perf_counter() - t0
    meta = json.loads((run_folder / INDEX_DIR / "meta.json").read_text())
    print(f"build: {total:.1f} s on {meta['device_name']}; per kind (s): {meta['seconds']}")
    print(
        "(checkpoint_check: finding it and its sha256; a cosine kind's: reading its "
        "tensors and computing)"
    )
    disk = sum(p.stat().st_size for p in (run_folder / INDEX_DIR).iterdir())
    print(f"index on disk: {disk / 1e6:.1f} MB")
    for kind, note in index.notes.items():
        print(f"  {kind}: {note}")
    index.close()

    from labeler.review.neighbours import NeighbourIndex

    t0 = time.perf_counter()
    opened = NeighbourIndex.open(run_folder)
    print(f"open: {(time.perf_counter() - t0) * 1e3:.1f} ms")
    assert opened is not None
    alive = run.alive().select("layer", "index").to_numpy()
    rng = np.random.default_rng(0)
    times = []
    for layer, i in alive[rng.choice(len(alive), 1000, replace=False)]:
        t0 = time.perf_counter_ns()
        opened.of(int(layer), int(i))
        times.append((time.perf_counter_ns() - t0) / 1e6)
    opened.close()
    times.sort()
    print(
        f"of(): median {statistics.median(times):.3f} ms, p95 {times[949]:.3f} ms, "
        f"max {times[-1]:.3f} ms over 1000 random alive features (first read of each page)"
    )
    if not args.keep and checkpoint.exists():
        shutil.rmtree(checkpoint)
        print(f"removed {checkpoint}")


if __name__ == "__main__":
    main()
