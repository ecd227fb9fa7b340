"""`labeler summarize` and `labeler export` at the paper's scale: a synthetic run of
229,376 features with 30 examples each and three judges (benchmarks/synthetic_run.py).
Each command runs as the user runs it, in its own process; wall time and peak memory
(the child's maximum resident set) are reported as medians over repeats.

.venv/bin/python benchmarks/synthetic_run.py --out /tmp/synthetic-229k     (once)
.venv/bin/python benchmarks/bench_catalog.py /tmp/synthetic-229k [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MEASURE = (
    "import resource, subprocess, sys; "
    "code = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode; "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(code)"
)


def measured(args: list[str]) -> tuple[float, float]:
    """(seconds, peak resident MiB) of one run of ``labeler ARGS`` in a fresh process.
    The gigabytes the command before wrote are flushed to disk first, untimed, so that
    their write-back does not land in this command's time."""
    labeler = str(Path(sys.executable).with_name("labeler"))
    os.sync()
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", MEASURE, labeler, *args],
                          capture_output=True, text=True, check=True)  # fmt: skip
    return time.perf_counter() - start, int(done.stdout.split()[-1]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run", type=Path)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.run.parent) as tmp:
        out = Path(tmp)
        cases = {
            "summarize": ["summarize", str(args.run), "--json", "--plot", str(out / "s.png")],
            "export (no examples)": ["export", str(args.run), "--out", str(out / "a.jsonl")],
            "export with examples": [
                "export",
                str(args.run),
                "--with-examples",
                "--out",
                str(out / "b.jsonl"),
            ],
            "export with examples, gzip": [
                "export",
                str(args.run),
                "--with-examples",
                "--out",
                str(out / "c.jsonl.gz"),
            ],
        }
        results: dict[str, list[tuple[float, float]]] = {name: [] for name in cases}
        for _ in range(args.repeats):
            for name, case in cases.items():
                results[name].append(measured(case))
        sizes = {p.name: p.stat().st_size / 2**20 for p in out.iterdir() if p.is_file()}
        shutil.rmtree(out, ignore_errors=True)
    print("| command | median s | runs (s) | peak MiB (max) |")
    print("|---|---:|---|---:|")
    for name, runs in results.items():
        seconds = [s for s, _ in runs]
        listed = ", ".join(f"{s:.1f}" for s in seconds)
        peak = max(m for _, m in runs)
        print(f"| {name} | {statistics.median(seconds):.1f} | {listed} | {peak:,.0f} |")
    print("output sizes (MiB): " + ", ".join(f"{k} {v:,.0f}" for k, v in sorted(sizes.items())))


if __name__ == "__main__":
    main()
