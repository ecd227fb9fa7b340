"""How wide the audited interval of the reasoning share is against the audit's size, with
uncertainty-weighted and with uniform selection, and how often it holds the planted share.

The planted demo run is labeled by the heuristic judge and by an OpenAI judge through the
real SDK and the loopback fake, whose classifier calls a third of the planted reasoning
features "language" (``tests.fake_llm.biased_oracle``) and is asked 5 times more on
resampled examples (``label --resamples 5``): the judges' label (the model judge's) puts
the reasoning share a third low. Then, per audit size and weighting, seeded audits are
decided by a reviewer who answers the planted category (``tests.audit_simulation``), and
the audited interval is read as ``summarize`` computes it.

.venv/bin/python benchmarks/bench_audit.py [--run demo-run/run] [--simulations 200]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_judges import build_run  # noqa: E402

SIZES = (25, 50, 100, 200)


def label_biased(run: Path, resamples: int) -> None:
    from tests.fake_llm import FakeLLMServer, biased_oracle

    from labeler.judges import make_judge
    from labeler.judges.base import JudgeOptions
    from labeler.labeling import label_run
    from labeler.labeling.store import LabelStore
    from labeler.run.data import RunData

    store = LabelStore(run / "labels.sqlite")
    data = RunData.open(run)
    label_run(data, store, make_judge("heuristic"))
    os.environ.setdefault("OPENAI_API_KEY", "sk-bench-audit")
    with FakeLLMServer(biased_oracle) as fake:
        options = JudgeOptions(base_url=f"{fake.base_url}/v1", openai_api="chat",
                               resamples=resamples)  # fmt: skip
        label_run(data, store, make_judge("openai:gpt-5-mini", options), concurrency=16)
    store.close()


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, default=None,
                        help="a collected demo run to copy (default: build one)")  # fmt: skip
    parser.add_argument("--simulations", type=int, default=200)
    parser.add_argument("--resamples", type=int, default=5)
    args = parser.parse_args()

    from tests.audit_simulation import AuditSimulator, planted_categories

    from labeler.labeling.store import LabelStore

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if args.run is None:
            run = build_run(root)
            truth_path = root / "inputs" / "ground_truth.json"
        else:
            run = root / "run"
            shutil.copytree(args.run, run, ignore=shutil.ignore_patterns("labels.sqlite*"))
            truth_path = args.run.parent / "inputs" / "ground_truth.json"
        start = time.perf_counter()
        label_biased(run, args.resamples)
        labeled_s = time.perf_counter() - start
        truth = planted_categories(truth_path)
        info = json.loads((run / "run.json").read_text())
        alive = {int(k): v for k, v in info["n_alive"].items()}
        store = LabelStore(run / "labels.sqlite")
        sim = AuditSimulator(store, truth, alive)
        planned = [fid for fid, _, _ in store.planned()]
        planted = sum(truth[f] == "reasoning" for f in planned) / len(planned)
        low, high = sim.judges_interval()
        print(f"CPU: {cpu_model()}, {os.cpu_count()} cores; labeled in {labeled_s:.0f} s")
        print(f"planted reasoning share {planted:.2%} of {len(planned)} features; judges' "
              f"share {sim.run(25, 0).judges_share:.2%} [{low:.2%}, {high:.2%}]")  # fmt: skip
        print("| audit size | weighting | median half-width | 95th pct half-width | "
              "coverage | mean estimate | ms per simulation |")  # fmt: skip
        print("|---:|---|---:|---:|---:|---:|---:|")
        for n in SIZES:
            for weighting in ("uncertainty", "uniform"):
                t0 = time.perf_counter()
                outs = [sim.run(n, seed, weighting) for seed in range(args.simulations)]
                ms = 1000 * (time.perf_counter() - t0) / len(outs)
                widths = sorted(o.half_width for o in outs)
                p95 = widths[int(0.95 * (len(widths) - 1))]
                cover = sum(o.covers(planted) for o in outs) / len(outs)
                mean = statistics.fmean(o.share for o in outs)
                print(f"| {n} | {weighting} | {100 * statistics.median(widths):.1f} pts | "
                      f"{100 * p95:.1f} pts | {cover:.1%} | {mean:.2%} | {ms:.0f} |")  # fmt: skip
        store.close()


if __name__ == "__main__":
    main()
