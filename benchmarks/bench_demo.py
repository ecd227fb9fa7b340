"""Time each stage of the planted demo pipeline; prints medians over repeats.

.venv/bin/python benchmarks/bench_demo.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def one_round(root: Path) -> dict[str, float]:
    from adapters.branch import load_adapter
    from collectors.collect import CollectJob, collect_run
    from collectors.corpus import read_traces, tokenize_traces
    from collectors.demo_model import build_demo
    from collectors.run_format import CollectParams
    from labeler.formats.catalog import export_catalog
    from labeler.judges import make_judge
    from labeler.labeling import label_run
    from labeler.labeling.store import LabelStore
    from labeler.reporting.summarize import summarize
    from labeler.run.data import RunData

    times: dict[str, float] = {}
    start = time.perf_counter()
    paths = build_demo(root / "inputs")
    times["build planted model + corpus"] = time.perf_counter() - start
    adapter, tokenizer, folder = load_adapter(str(paths.checkpoint), "cpu", "float32")
    corpus = tokenize_traces(list(read_traces(paths.corpus)), tokenizer, 1024)
    run = root / "run"
    times["collect"] = timed(
        lambda: collect_run(
            CollectJob(adapter, tokenizer, corpus, CollectParams(), folder, paths.corpus), run
        )
    )
    times["collect tokens/s"] = corpus.n_tokens / times["collect"]
    store = LabelStore(run / "labels.sqlite")
    data = RunData.open(run)
    times["label (heuristic, 960 features)"] = timed(
        lambda: label_run(data, store, make_judge("heuristic"))
    )
    times["summarize"] = timed(lambda: summarize(store, data.info, str(run)))
    times["export with examples"] = timed(
        lambda: export_catalog(data, store, run / "catalog.jsonl", True)
    )
    store.close()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rounds = []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            rounds.append(one_round(Path(tmp)))
    print(f"| stage | median of {args.repeats} | min | max |")
    print("| --- | ---: | ---: | ---: |")
    for key in rounds[0]:
        values = [r[key] for r in rounds]
        unit = "" if key.endswith("/s") else " s"
        print(
            f"| {key} | {statistics.median(values):,.1f}{unit} | {min(values):,.1f}{unit} "
            f"| {max(values):,.1f}{unit} |"
        )


if __name__ == "__main__":
    main()
