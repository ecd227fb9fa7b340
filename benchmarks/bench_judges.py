"""LLM-judge throughput against a loopback fake with a fixed latency, through the real SDK.

Features per second at several concurrencies, as a fraction of the ideal that latency
and concurrency allow (concurrency / (latency x 4 calls per feature)), and tokens per
feature for each stage. The fake server runs in its own process.

.venv/bin/python benchmarks/bench_judges.py [--latency 0.2] [--repeats 3] [--wire chat]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CALLS_PER_FEATURE = 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def build_run(root: Path) -> Path:
    from adapters.branch import load_adapter
    from collectors.collect import CollectJob, collect_run
    from collectors.corpus import read_traces, tokenize_traces
    from collectors.demo_model import build_demo
    from collectors.run_format import CollectParams

    paths = build_demo(root / "inputs")
    adapter, tokenizer, folder = load_adapter(str(paths.checkpoint), "cpu", "float32")
    corpus = tokenize_traces(list(read_traces(paths.corpus)), tokenizer, 1024)
    run = root / "run"
    collect_run(CollectJob(adapter, tokenizer, corpus, CollectParams(), folder, paths.corpus), run)
    return run


def start_server(port: int, latency: float) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.fake_llm", "--port", str(port), "--latency", str(latency)],
        cwd=REPO, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if "listening" not in line:
        proc.kill()
        raise RuntimeError(f"fake server did not start: {line!r}")
    return proc


def label_once(run: Path, wire: str, base_url: str, concurrency: int, n_per_layer: int
               ) -> tuple[float, int, dict[str, dict[str, float]]]:  # fmt: skip
    from labeler.judges import make_judge
    from labeler.judges.base import JudgeOptions
    from labeler.labeling import label_run
    from labeler.labeling.store import LabelStore
    from labeler.run.data import RunData

    (run / "labels.sqlite").unlink(missing_ok=True)
    name = "anthropic:bench" if wire == "anthropic" else "openai:bench"
    options = JudgeOptions(base_url=None if wire == "anthropic" else f"{base_url}/v1",
                           openai_api="chat" if wire == "chat" else "responses")  # fmt: skip
    judge = make_judge(name, options)
    data = RunData.open(run)
    store = LabelStore(run / "labels.sqlite")
    store.add_planned([])  # warm the store
    start, cpu_start = time.perf_counter(), cpu_seconds()
    report = label_run(data, store, judge, sample_per_layer=n_per_layer, concurrency=concurrency)
    elapsed = time.perf_counter() - start
    tokens_cpu = {"cpu_ms_per_feature": {"client": 1000 * (cpu_seconds() - cpu_start)
                                         / max(1, report.labeled)}}  # fmt: skip
    assert report.failed == 0, report
    tokens: dict[str, dict[str, float]] = {}
    rows = [s.judgment for s in store.judgments(name).values() if s.judgment is not None]
    for stage in ("explain", "detect", "classify"):
        usages = [j.usage[stage] for j in rows]
        tokens[stage] = {
            "calls": statistics.fmean(u.calls for u in usages),
            "input": statistics.fmean(u.total_input for u in usages),
            "cached": statistics.fmean(u.cached_tokens for u in usages),
            "output": statistics.fmean(u.output_tokens for u in usages),
        }
    store.close()
    return elapsed, report.labeled, tokens | tokens_cpu


def cpu_seconds() -> float:
    """CPU time of this process (the labeler; the fake server runs in its own)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--wire", choices=["chat", "responses", "anthropic"], default="chat")
    parser.add_argument("--concurrency", default="1,8,32,128")
    parser.add_argument("--seconds", type=float, default=8.0,
                        help="Aim each measurement at about this long.")  # fmt: skip
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    os.environ.setdefault("ANTHROPIC_API_KEY", "bench")
    os.environ.setdefault("OPENAI_API_KEY", "bench")
    with tempfile.TemporaryDirectory() as tmp:
        run = build_run(Path(tmp))
        port = free_port()
        server = start_server(port, args.latency)
        base_url = f"http://127.0.0.1:{port}"
        os.environ["ANTHROPIC_BASE_URL"] = base_url
        results = []
        try:
            for concurrency in (int(c) for c in args.concurrency.split(",")):
                ideal = concurrency / (args.latency * CALLS_PER_FEATURE)
                per_layer = max(2, min(240, round(ideal * args.seconds / 4)))
                rates, cpu_ms = [], []
                tokens: dict[str, dict[str, float]] = {}
                for _ in range(args.repeats):
                    elapsed, n, tokens = label_once(run, args.wire, base_url, concurrency,
                                                    per_layer)  # fmt: skip
                    rates.append(n / elapsed)
                    cpu_ms.append(tokens.pop("cpu_ms_per_feature")["client"])
                rate = statistics.median(rates)
                results.append({"concurrency": concurrency, "features": n,
                                "features_per_s": rate, "ideal": ideal,
                                "fraction": rate / ideal, "runs": rates,
                                "client_cpu_ms_per_feature": statistics.median(cpu_ms),
                                "tokens": tokens})  # fmt: skip
                print(f"concurrency {concurrency:4d}: {rate:7.2f} features/s over {n} features "
                      f"(ideal {ideal:.2f}; fraction {rate / ideal:.2f}; runs "
                      f"{', '.join(f'{r:.2f}' for r in rates)}; labeler CPU "
                      f"{statistics.median(cpu_ms):.1f} ms/feature)", flush=True)  # fmt: skip
        finally:
            server.terminate()
            server.wait(timeout=10)
    print("\ntokens per feature by stage (last run): calls, input (of it cached), output")
    for stage, t in results[-1]["tokens"].items():  # type: ignore[union-attr]
        print(f"  {stage:9s} {t['calls']:.0f} calls, {t['input']:,.0f} in "
              f"({t['cached']:,.0f} cached), {t['output']:,.0f} out")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()


def fake_arguments(parser: argparse.ArgumentParser) -> None:
    """The options every benchmark against the loopback fake takes."""
    parser.add_argument(
        "--run", type=Path, default=None, help="A collected run to copy (default: the demo's)."
    )
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--per-layer", type=int, default=24)
    parser.add_argument("--concurrency", type=int, default=8)


@contextlib.contextmanager
def served_run(given: Path | None, latency: float) -> Iterator[tuple[Path, str]]:
    """A private copy of ``given`` without labels (or the demo, built), and the base URL
    of a fake server answering with ``latency``, stopped afterwards."""
    os.environ.setdefault("ANTHROPIC_API_KEY", "bench")
    os.environ.setdefault("OPENAI_API_KEY", "bench")
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        if given is not None:
            shutil.copytree(given, run)
            (run / "labels.sqlite").unlink(missing_ok=True)
        else:
            run = build_run(Path(tmp))
        port = free_port()
        server = start_server(port, latency)
        base_url = f"http://127.0.0.1:{port}"
        os.environ["ANTHROPIC_BASE_URL"] = base_url
        try:
            yield run, base_url
        finally:
            server.terminate()
            server.wait(timeout=10)
