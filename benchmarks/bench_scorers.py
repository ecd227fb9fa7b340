"""What the fuzzing and intruder scorers cost and whether they keep labeling's pace.

Labels a sample of the planted demo run through the loopback fake (its oracle answers
every task; a fixed latency per request) with the real SDKs, once with detection alone
and once with detection, fuzzing and intruder, and reports per scorer set:

- calls, input tokens (of them cached) and output tokens per feature, by stage, as the
  fake reported them (about four characters a token);
- dollars per feature at batch prices for openai:gpt-5-mini and
  anthropic:claude-haiku-4-5 (the packaged price table), and the paper adapter's
  229,376 features projected;
- features per second at concurrency 8 against the ideal that latency allows
  (concurrency / (latency x calls per feature)).

.venv/bin/python benchmarks/bench_scorers.py [--run demo-run/run] [--per-layer 24] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_judges import fake_arguments, served_run

PAPER_FEATURES = 229_376
JUDGES = {"chat": "openai:gpt-5-mini", "anthropic": "anthropic:claude-haiku-4-5"}
SCORER_SETS = {
    "detection": ("detection",),
    "all": ("detection", "fuzz", "intruder"),
}


def label_once(
    run: Path, judge_name: str, base_url: str, scorers: tuple[str, ...], per_layer: int,
    concurrency: int,
) -> tuple[float, int, dict[str, dict[str, float]], float | None]:  # fmt: skip
    from labeler.judges import make_judge
    from labeler.judges.base import JudgeOptions
    from labeler.judges.pricing import load_prices
    from labeler.labeling import label_run
    from labeler.labeling.store import LabelStore
    from labeler.run.data import RunData
    from labeler.run.schemas import Usage

    (run / "labels.sqlite").unlink(missing_ok=True)
    anthropic = judge_name.startswith("anthropic:")
    options = JudgeOptions(
        base_url=None if anthropic else f"{base_url}/v1", openai_api="chat", scorers=scorers
    )  # fmt: skip
    judge = make_judge(judge_name, options)
    store = LabelStore(run / "labels.sqlite")
    start = time.perf_counter()
    report = label_run(RunData.open(run), store, judge, sample_per_layer=per_layer,
                       concurrency=concurrency)  # fmt: skip
    elapsed = time.perf_counter() - start
    assert report.failed == 0, report
    rows = [s.judgment for s in store.judgments(judge_name).values() if s.judgment is not None]
    store.close()
    stages = sorted({k for j in rows for k in j.usage})
    tokens: dict[str, dict[str, float]] = {}
    for stage in stages:
        usages = [j.usage.get(stage, Usage()) for j in rows]
        tokens[stage] = {
            "calls": statistics.fmean(u.calls for u in usages),
            "input": statistics.fmean(u.total_input for u in usages),
            "cached": statistics.fmean(u.cached_tokens for u in usages),
            "output": statistics.fmean(u.output_tokens for u in usages),
        }
    prices = load_prices(None)
    total = sum((sum(j.usage.values(), Usage()) for j in rows), Usage())
    batch = prices.cost(judge_name, total, "batch")
    per_feature = None if batch is None else batch / len(rows)
    return elapsed, report.labeled, tokens, per_feature


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    fake_arguments(parser)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with served_run(args.run, args.latency) as (run, base_url):
        for wire, judge_name in JUDGES.items():
            for scorers in SCORER_SETS.values():
                rates: list[float] = []
                for _ in range(args.repeats if wire == "chat" else 1):
                    elapsed, n, tokens, dollars = label_once(
                        run, judge_name, base_url, scorers, args.per_layer, args.concurrency
                    )
                    rates.append(n / elapsed)
                calls = sum(t["calls"] for t in tokens.values())
                ideal = args.concurrency / (args.latency * calls)
                rate = statistics.median(rates)
                print(f"\n{judge_name}, scorers {','.join(scorers)}: {n} features")
                for stage, t in tokens.items():
                    print(f"  {stage:9s} {t['calls']:.2f} calls, {t['input']:,.0f} in "
                          f"({t['cached']:,.0f} cached), {t['output']:,.0f} out")  # fmt: skip
                in_all = sum(t["input"] for t in tokens.values())
                out_all = sum(t["output"] for t in tokens.values())
                print(f"  per feature: {calls:.2f} calls, {in_all:,.0f} in, {out_all:,.0f} out")
                if dollars is not None:
                    paper = dollars * PAPER_FEATURES
                    print(f"  batch price: ${dollars:.6f}/feature; "
                          f"{PAPER_FEATURES:,} features: ${paper:,.0f}")  # fmt: skip
                print(f"  concurrency {args.concurrency}: {rate:.2f} features/s (ideal "
                      f"{ideal:.2f}, fraction {rate / ideal:.2f}; runs "
                      f"{', '.join(f'{r:.2f}' for r in rates)})", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
