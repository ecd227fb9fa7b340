"""A feature's page at the paper's scale: the latency of its data (``GET
/api/feature/ID``, what the page fetches: examples, histogram, logit lens, judgments,
reviews, neighbours) over HTTP from the real `labeler browse` server, on seeded features
of every layer of a synthetic run of 229,376 features (benchmarks/synthetic_run.py).

.venv/bin/python benchmarks/synthetic_run.py --out /tmp/synthetic-229k     (once)
.venv/bin/python benchmarks/bench_feature_page.py /tmp/synthetic-229k [--pages 200]
    [--relayout /tmp/synthetic-229k-rg]

--relayout writes a copy of the run whose examples.parquet is rewritten in the row
groups the collector writes now (collectors.run_format.EXAMPLE_ROW_GROUP; the same rows
in the same order; the other files linked) and measures it too: the before and after of
a run collected before the change.

The first page is timed apart (it reads the features table into the server); then
``--pages`` features drawn with a seed, each timed from the request to the last byte.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import sys
import time
from pathlib import Path

import polars as pl

from collectors.run_format import EXAMPLE_ROW_GROUP, EXAMPLES

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_browse import NO_PROXY, start


def relayout(run: Path, out: Path) -> Path:
    """A copy of ``run`` with examples.parquet in the collector's row groups."""
    if not (out / EXAMPLES).exists():
        out.mkdir(parents=True, exist_ok=True)
        for path in run.iterdir():
            if path.is_file() and path.name != EXAMPLES:
                shutil.copy2(path, out / path.name)
        pl.scan_parquet(run / EXAMPLES).sink_parquet(
            out / EXAMPLES, row_group_size=EXAMPLE_ROW_GROUP
        )
    return out


def fetch_ms(url: str) -> float:
    began = time.perf_counter()
    with NO_PROXY.open(url, timeout=120) as response:
        json.loads(response.read())
    return 1000 * (time.perf_counter() - began)


def measure(run: Path, pages: int, seed: int) -> dict[str, float]:
    features = pl.read_parquet(run / "features.parquet", columns=["feature_id", "alive"])
    alive = features.filter(pl.col("alive"))["feature_id"].to_list()
    chosen = random.Random(seed).sample(alive, pages + 1)
    process, url, _ = start(run)
    try:
        first = fetch_ms(f"{url}api/feature/{chosen[0]}")
        times = sorted(fetch_ms(f"{url}api/feature/{f}") for f in chosen[1:])
    finally:
        process.terminate()
        process.wait()
    return {
        "first_ms": first,
        "median_ms": statistics.median(times),
        "p95_ms": times[int(0.95 * (len(times) - 1))],
        "max_ms": times[-1],
        "examples_mib": (run / EXAMPLES).stat().st_size / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--pages", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--relayout", type=Path, default=None)
    args = parser.parse_args()
    runs = {"as written": args.run}
    if args.relayout is not None:
        runs["collector's row groups"] = relayout(args.run, args.relayout)
    print(f"load {os.getloadavg()[0]:.1f}")
    for name, run in runs.items():
        figures = measure(run, args.pages, args.seed)
        print(name, json.dumps({k: round(v, 1) for k, v in figures.items()}))


if __name__ == "__main__":
    main()
