"""The Neuronpedia (both layouts) and delphi exports at the paper's scale: a synthetic run
of 229,376 features with 30 examples each and three judges (benchmarks/synthetic_run.py).
Each export runs as the user runs it, in its own process (bench_catalog.measured): wall
time and the child's peak resident memory, medians over repeats, and the output's size
and file count.

.venv/bin/python benchmarks/synthetic_run.py --out /tmp/synthetic-229k     (once)
.venv/bin/python benchmarks/bench_formats.py /tmp/synthetic-229k [--repeats 1]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
from pathlib import Path

from bench_catalog import measured


def footprint(folder: Path) -> tuple[int, int]:
    """Bytes and number of files under ``folder``."""
    files = [p for p in folder.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files), len(files)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    names = ["--model-id", "synthetic-adapter", "--source-set", "reasoning-tc"]
    cases = {
        "neuronpedia, upload requests (--layout api)": ["--format", "neuronpedia", *names,
                                                        "--layout", "api"],
        "neuronpedia, bulk import (--layout import)": ["--format", "neuronpedia", *names,
                                                       "--layout", "import"],
        "delphi": ["--format", "delphi"],
    }  # fmt: skip
    rows = []
    with tempfile.TemporaryDirectory(dir=args.run.parent) as tmp:
        for name, case in cases.items():
            runs, size = [], (0, 0)
            for _ in range(args.repeats):
                out = Path(tmp) / "out"
                runs.append(measured(["export", str(args.run), *case, "--out", str(out)]))
                size = footprint(out)
                shutil.rmtree(out)
            rows.append((name, runs, size))
    print("| export | median s | runs (s) | peak MiB (max) | output | files |")
    print("|---|---:|---|---:|---:|---:|")
    for name, runs, (size, files) in rows:
        seconds = [s for s, _ in runs]
        listed = ", ".join(f"{s:.0f}" for s in seconds)
        peak = max(m for _, m in runs)
        print(f"| {name} | {statistics.median(seconds):.0f} | {listed} | {peak:,.0f} | "
              f"{size / 2**30:.2f} GiB | {files:,} |")  # fmt: skip


if __name__ == "__main__":
    main()
