"""Bulk labeling at batch and flex prices, the reply cache, and batch rounds, against the
loopback fake through the real SDKs.

1. Cost per feature of the demo run at the packaged prices (genai-prices), synchronous,
   batch and flex, per judge: the demo run is labeled once per wire format (the fake
   counts tokens at about four characters each, with prompt caching of the shared
   instructions), and the measured usage is priced at each tier.
2. Requests the reply cache saves on an ensemble re-run: an ensemble labels the run, then
   a fresh copy of it with the same LABELER_CACHE_DIR.
3. The batch transport's wall time when every batch takes S seconds at the provider,
   and its submissions per 1,000 features.

.venv/bin/python benchmarks/bench_batches.py [--run RUN] [--seconds 2 10] [--repeats 3]
    [--max-active 50000 240]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PRICED = {
    "chat": ["openai:gpt-5-nano", "openai:gpt-5-mini", "openai:gpt-5"],
    "anthropic": ["anthropic:claude-haiku-4-5", "anthropic:claude-sonnet-4-5"],
}


def fresh_copy(run: Path, where: Path) -> Path:
    shutil.rmtree(where, ignore_errors=True)
    shutil.copytree(run, where)
    (where / "labels.sqlite").unlink(missing_ok=True)
    return where


def judge(name: str, base_url: str) -> Any:
    from labeler.judges import make_judge
    from labeler.judges.base import JudgeOptions

    wire_url = None if name.startswith("anthropic:") else f"{base_url}/v1"
    return make_judge(name, JudgeOptions(base_url=wire_url, openai_api="chat"))


def label_locally(run: Path, names: list[str], base_url: str) -> dict[str, Any]:
    from labeler.labeling import label_judges
    from labeler.labeling.store import LabelStore
    from labeler.run.data import RunData

    store = LabelStore(run / "labels.sqlite")
    reports = label_judges(RunData.open(run), store, [judge(n, base_url) for n in names],
                           concurrency=16)  # fmt: skip
    usage = {n: total_usage(store, n) for n in names}
    store.close()
    return {"reports": reports, "usage": usage}


def total_usage(store: Any, name: str) -> Any:
    from labeler.run.schemas import Usage

    return sum((u for _, _, usage, _ in store.accounting(name) for u in usage.values()), Usage())


def costs(run: Path, root: Path, base_url: str) -> None:
    from labeler.judges.pricing import load_prices

    prices = load_prices()
    print(f"## cost per feature ({prices.source})")
    print("| judge | features | sync $/feature | batch $/feature | flex $/feature | "
          "batch/sync |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for wire, names in PRICED.items():
        copy = fresh_copy(run, root / f"cost-{wire}")
        measured = label_locally(copy, [names[0]], base_url)
        usage = measured["usage"][names[0]]
        n = measured["reports"][names[0]].labeled
        for name in names:
            sync = prices.cost(name, usage, "standard")
            batch = prices.cost(name, usage, "batch")
            flex = prices.cost(name, usage, "flex") if wire == "chat" else None
            assert sync is not None and batch is not None
            flex_text = "-" if flex is None else f"{flex / n:.6f}"
            print(f"| {name} | {n} | {sync / n:.6f} | {batch / n:.6f} | {flex_text} | "
                  f"{batch / sync:.2f} |")  # fmt: skip
        print(f"(tokens measured with {names[0]}: {usage.input_tokens + usage.cached_tokens:,} "
              f"in, {usage.cached_tokens:,} of them cached, {usage.output_tokens:,} out, "
              f"{usage.calls:,} calls)")  # fmt: skip


def cache(run: Path, root: Path, fake: Any) -> None:
    names = ["openai:gpt-5-mini", "anthropic:claude-haiku-4-5"]
    os.environ["LABELER_CACHE_DIR"] = str(root / "cache")
    try:
        before = len(fake.requests)
        label_locally(fresh_copy(run, root / "ensemble-a"), names, fake.base_url)
        first = len(fake.requests) - before
        before = len(fake.requests)
        again = label_locally(fresh_copy(run, root / "ensemble-b"), names, fake.base_url)
        second = len(fake.requests) - before
    finally:
        del os.environ["LABELER_CACHE_DIR"]
    cached = sum(u.cached_replies for u in again["usage"].values())
    print("## reply cache: an ensemble of two judges, then the same on a fresh copy")
    print(f"first labeling: {first:,} calls; re-run: {second:,} calls, {cached:,} replies "
          f"from the cache ({cached / max(first, 1):.0%} of the requests saved)")  # fmt: skip


def batches(run: Path, root: Path, fake: Any, seconds: list[float], repeats: int,
            actives: list[int]) -> None:  # fmt: skip
    from tests.fake_llm import BatchSettings as Simulated

    from labeler.labeling.store import LabelStore
    from labeler.labeling.transports.batch import BatchSettings, label_in_batches
    from labeler.run.data import RunData

    print("## batch transport: wall time with every batch taking S s at the provider")
    print("| S (s) | features in flight | features | submissions | per 1,000 features | "
          "requests | wall (s), median | wall / S |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for s, active in [(s, a) for a in actives for s in seconds]:
        walls: list[float] = []
        subs = requests = features = 0
        for i in range(repeats):
            fake.reset()
            fake.batches.settings = Simulated(in_progress_s=s)
            copy = fresh_copy(run, root / f"batch-{s}-{i}")
            store = LabelStore(copy / "labels.sqlite")
            start = time.perf_counter()
            reports, _ = label_in_batches(RunData.open(copy), store,
                                          [judge("openai:gpt-5-mini", fake.base_url)],
                                          BatchSettings(poll_s=min(1.0, s / 4),
                                                        max_active=active))  # fmt: skip
            walls.append(time.perf_counter() - start)
            store.close()
            features = reports["openai:gpt-5-mini"].labeled
            subs = len(fake.batches.created)
            requests = sum(b.n_requests for b in fake.batches.created)
        wall = statistics.median(walls)
        print(f"| {s:g} | {active:,} | {features} | {subs} | {1000 * subs / features:.1f} | "
              f"{requests:,} | {wall:.1f} | {wall / s:.2f} |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, default=None, help="a collected run (default: "
                        "the demo's, built here)")  # fmt: skip
    parser.add_argument("--seconds", type=float, nargs="+", default=[2.0, 10.0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-active", type=int, nargs="+", default=[50_000, 240],
                        help="features in flight at once (--max-inflight)")  # fmt: skip
    args = parser.parse_args()
    from tests.fake_llm import FakeLLMServer, oracle

    os.environ.setdefault("OPENAI_API_KEY", "sk-bench")
    os.environ.setdefault("ANTHROPIC_API_KEY", "sk-bench")
    with tempfile.TemporaryDirectory() as tmp, FakeLLMServer(oracle) as fake:
        root = Path(tmp)
        os.environ["ANTHROPIC_BASE_URL"] = fake.base_url
        run = args.run
        if run is None:
            from bench_judges import build_run

            run = build_run(root / "demo")
        costs(run, root, fake.base_url)
        cache(run, root, fake)
        batches(run, root, fake, args.seconds, args.repeats, args.max_active)


if __name__ == "__main__":
    main()
