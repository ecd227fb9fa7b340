"""Celery fleet throughput and rate-limit accuracy against a loopback fake LLM.

1. Features per second with the fake server at a fixed latency: the local executor at
   concurrency C, then one and two `celery worker` processes (threads pool, concurrency
   C each) driven by `labeler label --executor celery`, each in its own process. The
   rate is features / (last reply - first request) as the server saw them, so process
   start-up does not count; worker CPU per feature is read from /proc.
2. Rate-limiter accuracy: two workers under a fleet-wide --rpm limit; requests the
   server saw per minute of the run, and in the busiest 10-second window, against the
   limit.

.venv/bin/python benchmarks/bench_fleet.py [--latency 0.2] [--concurrency 16]
    [--per-layer 100] [--repeats 3] [--rpm 1200] [--rpm-per-layer 25] [--limit-only]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from tests.fake_llm import FakeLLMServer, oracle  # noqa: E402
from tests.fleet import BIN, Worker, fleet_env  # noqa: E402
from tests.redis_server import RedisServer  # noqa: E402

from bench_judges import build_run  # noqa: E402

JUDGE = "openai:bench"
TICKS = os.sysconf("SC_CLK_TCK")


def proc_cpu(pid: int) -> float:
    """CPU seconds of a process and its reaped children."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(v) for v in fields[11:15]) / TICKS


def served_rate(run: Path, fake: FakeLLMServer) -> tuple[int, float]:
    """Features labeled, and per second of the server's busy span."""
    with sqlite3.connect(run / "labels.sqlite") as conn:
        n = conn.execute("SELECT count(*) FROM judgments WHERE status='ok'").fetchone()[0]
    times = [r.time for r in fake.requests]
    fake.reset()
    return n, n / (max(times) + fake.latency - min(times))


def fresh(run: Path, root: Path, name: str) -> Path:
    target = root / name
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(run, target)
    (target / "labels.sqlite").unlink(missing_ok=True)
    return target


def label_args(run: Path, base_url: str, per_layer: int, *extra: str) -> list[str]:
    return [str(BIN / "labeler"), "label", str(run), "--judge", JUDGE, "--base-url",
            f"{base_url}/v1", "--sample-per-layer", str(per_layer), *extra]  # fmt: skip


def run_local(run: Path, fake: FakeLLMServer, per_layer: int, concurrency: int,
              env: dict[str, str]) -> float:  # fmt: skip
    subprocess.run(label_args(run, fake.base_url, per_layer, "--concurrency", str(concurrency)),
                   env=env, check=True, capture_output=True)  # fmt: skip
    return served_rate(run, fake)[1]


def run_fleet(
    run: Path, fake: FakeLLMServer, per_layer: int, workers: list[Worker], env: dict[str, str],
) -> tuple[float, float]:  # fmt: skip
    before = [proc_cpu(w.process.pid) for w in workers]
    subprocess.run(label_args(run, fake.base_url, per_layer, "--executor", "celery"),
                   env=env, check=True, capture_output=True)  # fmt: skip
    cpu = sum(proc_cpu(w.process.pid) - b for w, b in zip(workers, before, strict=True))
    n, rate = served_rate(run, fake)
    return rate, 1000 * cpu / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--per-layer", type=int, default=100, help="features per layer (4 layers)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rpm", type=float, default=1200)
    parser.add_argument("--rpm-per-layer", type=int, default=25)
    parser.add_argument("--limit-only", action="store_true",
                        help="measure the rate limiter alone")  # fmt: skip
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    results: dict[str, object] = {"cpus": os.cpu_count()}
    try:
        run = build_run(root / "demo")
        # the labelers run in other processes, so the server has this one to itself
        with RedisServer(root / "redis") as redis_server:
            env = fleet_env(redis_server.url, LABELER_TASK_TIME_LIMIT="120",
                            LABELER_VISIBILITY_TIMEOUT="300")  # fmt: skip
            if not args.limit_only:
                results["throughput"] = throughput(run, root, env, args)
            results["rate_limit"] = limiter_accuracy(run, root, env, args)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(results, indent=2))


def throughput(run: Path, root: Path, env: dict[str, str],
               args: argparse.Namespace) -> dict[str, object]:  # fmt: skip
    results: dict[str, object] = {
        "latency_s": args.latency, "concurrency": args.concurrency,
        "features": 4 * args.per_layer,
        "ideal_one_worker_features_per_s": args.concurrency / (args.latency * 4),
    }  # fmt: skip
    rates: dict[str, list[float]] = {"local": [], "1 worker": [], "2 workers": []}
    cpu: dict[str, list[float]] = {"1 worker": [], "2 workers": []}
    with FakeLLMServer(oracle, latency=args.latency) as fake:
        for repeat in range(args.repeats):
            rates["local"].append(run_local(fresh(run, root, f"l{repeat}"), fake,
                                            args.per_layer, args.concurrency, env))  # fmt: skip
            for n_workers in (1, 2):
                label = "1 worker" if n_workers == 1 else "2 workers"
                workers = [
                    Worker(f"b{i}", env, root / f"w{repeat}{n_workers}{i}.log",
                           concurrency=args.concurrency).wait_ready()
                    for i in range(n_workers)
                ]  # fmt: skip
                try:
                    rate, ms = run_fleet(fresh(run, root, f"f{repeat}{n_workers}"), fake,
                                         args.per_layer, workers, env)  # fmt: skip
                finally:
                    for w in workers:
                        w.stop()
                rates[label].append(rate)
                cpu[label].append(ms)
                print(f"repeat {repeat}: {label}: {rate:.1f} features/s, {ms:.1f} ms "
                      "worker CPU per feature", flush=True)  # fmt: skip
            print(f"repeat {repeat}: local: {rates['local'][-1]:.1f} features/s", flush=True)
    medians = {k: statistics.median(v) for k, v in rates.items()}
    results["features_per_s"] = {k: round(v, 2) for k, v in medians.items()}
    results["all_runs"] = rates
    results["worker_cpu_ms_per_feature"] = {
        k: round(statistics.median(v), 1) for k, v in cpu.items()
    }
    results["two_over_one"] = round(medians["2 workers"] / medians["1 worker"], 2)
    return results


def limiter_accuracy(run: Path, root: Path, env: dict[str, str],
                     args: argparse.Namespace) -> dict[str, float]:  # fmt: skip
    with FakeLLMServer(oracle, latency=args.latency) as fake:
        workers = [Worker(f"r{i}", env, root / f"r{i}.log", concurrency=args.concurrency)
                   .wait_ready() for i in range(2)]  # fmt: skip
        try:
            target = fresh(run, root, "limited")
            subprocess.run(label_args(target, fake.base_url, args.rpm_per_layer, "--executor",
                                      "celery", "--rpm", str(args.rpm)),
                           env=env, check=True, capture_output=True)  # fmt: skip
        finally:
            for w in workers:
                w.stop()
        times = sorted(r.time for r in fake.requests)
    rate, burst = args.rpm / 60, args.rpm / 60  # the bucket holds one second of the rate
    span = times[-1] - times[0]
    found: dict[str, float] = {
        "limit_rpm": args.rpm,
        "requests": len(times),
        "span_s": round(span, 2),
        # after the initial burst, requests per minute against the limit
        "steady_over_limit": round((len(times) - burst) / span * 60 / args.rpm, 3),
    }
    for window in (10, 60):
        if span < window:
            continue
        busiest = max(sum(1 for t in times[i:] if t < s + window) for i, s in enumerate(times))
        found[f"busiest_{window}s"] = busiest
        found[f"busiest_{window}s_over_allowed"] = round(busiest / (burst + rate * window), 3)
    return found


if __name__ == "__main__":
    main()
