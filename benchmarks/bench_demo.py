"""Time `labeler demo` as a user runs it: a first demo on an empty cache (it builds the
planted model) and a second one (it reuses it), each a fresh process, repeated; prints
the medians of the whole command and of each phase that `labeler -v demo` logs, with
the load average before and after.

.venv/bin/python benchmarks/bench_demo.py [--repeats 3] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LABELER = Path(sys.executable).parent / "labeler"
PHASE = re.compile(r"demo phase ([a-z ]+): (\d+\.\d+) s")
THREADS = re.compile(r"torch threads: (\d+)")


def one_demo(out: Path, cache: Path, threads: int | None) -> dict[str, float]:
    """Run `labeler -v demo` in a fresh process: its wall time and its phases' times."""
    env = {**os.environ, "LABELER_DEMO_CACHE": str(cache)}
    options = ["--threads", str(threads)] if threads else []
    start = time.perf_counter()
    result = subprocess.run([LABELER, "-v", *options, "demo", "--out", out], env=env,
                            capture_output=True, text=True, check=False)  # fmt: skip
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"labeler demo failed:\n{result.stderr[-3000:]}")
    times = {"whole command": wall}
    times.update({name: float(seconds) for name, seconds in PHASE.findall(result.stderr)})
    threads = THREADS.search(result.stderr)
    if threads:
        times["torch threads (count)"] = float(threads.group(1))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="labeler --threads N")
    args = parser.parse_args()
    rounds: dict[str, list[dict[str, float]]] = {"cold": [], "warm": []}
    load_before = os.getloadavg()
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            cache = Path(tmp) / "cache"
            rounds["cold"].append(one_demo(Path(tmp) / "first", cache, args.threads))
            rounds["warm"].append(one_demo(Path(tmp) / "second", cache, args.threads))
    load_after = os.getloadavg()
    print(f"load average (1, 5, 15 min) before {load_before}, after {load_after}; "
          f"{len(os.sched_getaffinity(0))} usable cores")  # fmt: skip
    print(f"| `labeler demo` | cache | median of {args.repeats} | min | max |")
    print("| --- | --- | ---: | ---: | ---: |")
    for cache, timed in rounds.items():
        for key in timed[0]:
            values = [r[key] for r in timed if key in r]
            unit = "" if key.endswith("(count)") else " s"
            print(f"| {key} | {cache} | {statistics.median(values):.1f}{unit} | "
                  f"{min(values):.1f}{unit} | {max(values):.1f}{unit} |")  # fmt: skip


if __name__ == "__main__":
    main()
