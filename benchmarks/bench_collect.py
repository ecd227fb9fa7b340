"""Collector speed and memory on a random model with a calibrated sparse adapter.

Measures, over the same token-budget batches of a synthetic reasoning corpus:
- tokens/s of the collection (all layers, top-k + uniform sample + deciles + negatives);
- its ratio to a bare forward pass of the same adapter model (branch on, nothing
  recorded), the goal being at most 1.25;
- the speed-up over the naive reference (one sequence per forward, a Python loop over
  every nonzero activation, as the paper's collector does), timed on a slice;
- peak memory (max RSS of a fresh process) of a whole `collect_run` at 65,536 features,
  at two corpus sizes, to show it does not grow with the corpus.

CPU:  .venv/bin/python benchmarks/bench_collect.py
GPU, the paper's shape (28 x 3584, 8192 features per layer, bf16, random weights):
      .venv/bin/python benchmarks/bench_collect.py --paper-shape --device cuda
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from adapters.random_adapter import ModelShape, random_adapter
from adapters.tiny_tokenizer import train_bpe_tokenizer
from collectors.batching import make_batch, plan_batches
from collectors.collect import Collector
from collectors.corpus import SPECIAL_TOKENS, TokenizedCorpus, read_traces, tokenize_traces
from collectors.naive import naive_collect
from collectors.run_format import CollectParams
from collectors.synthetic_corpus import write_corpus

PARAMS = CollectParams(n_quantiles=10, per_quantile=3, max_length=1024, batch_tokens=8192)


def build_inputs(root: Path, n_traces: int, vocab_size: int) -> tuple[Any, TokenizedCorpus, Path]:
    corpus_path = root / "corpus.jsonl"
    write_corpus(corpus_path, n_traces, seed=11)
    traces = list(read_traces(corpus_path))
    texts = [t.prompt + t.response for t in traces]
    tokenizer = train_bpe_tokenizer(
        texts, SPECIAL_TOKENS, vocab_size, SPECIAL_TOKENS[0], SPECIAL_TOKENS[1], SPECIAL_TOKENS[4]
    )
    corpus = tokenize_traces(traces, tokenizer, PARAMS.max_length)
    return tokenizer, corpus, corpus_path


def build_adapter(
    shape: ModelShape, corpus: TokenizedCorpus, l0: float, device: str, dtype: torch.dtype
) -> Any:
    """Calibrated on 48 sequences spread over the corpus."""
    picks = np.unique(np.linspace(0, corpus.n_sequences - 1, 48).astype(int))
    sequences = [torch.from_numpy(corpus.sequence(int(i))) for i in picks]
    return random_adapter(shape, sequences, l0=l0, seed=0, dtype=dtype, device=device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_bare(adapter: Any, corpus: TokenizedCorpus, batches: list[np.ndarray]) -> float:
    decoder = adapter.model.get_decoder()
    device = adapter.device
    prepared = [make_batch(corpus, b, device) for b in batches]
    sync(device)
    start = time.perf_counter()
    with torch.no_grad():
        for batch in prepared:
            decoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    sync(device)
    return time.perf_counter() - start


def time_collect(adapter: Any, corpus: TokenizedCorpus, batches: list[np.ndarray]) -> float:
    layers = list(range(adapter.n_layers))
    collector = Collector(adapter, corpus, PARAMS, layers)
    sync(adapter.device)
    start = time.perf_counter()
    for batch in batches:
        collector.process(batch)
    sync(adapter.device)
    return time.perf_counter() - start


def speed(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer, corpus, _ = build_inputs(Path(tmp), args.traces, args.vocab)
    if args.paper_shape:
        shape = ModelShape.paper(vocab_size=len(tokenizer))
    else:
        shape = ModelShape(
            arch="qwen2", n_layers=args.layers, d_model=args.d_model,
            intermediate=4 * args.d_model, n_heads=args.d_model // 64,
            n_kv_heads=max(args.d_model // 256, 1), vocab_size=len(tokenizer),
            n_features=args.features,
        )  # fmt: skip
    adapter = build_adapter(shape, corpus, args.l0, args.device, dtype)
    batches = plan_batches(corpus.lengths(), PARAMS.batch_tokens)
    time_bare(adapter, corpus, batches[:2])  # warm-up
    bare, collect = [], []
    for _ in range(args.repeats):
        bare.append(time_bare(adapter, corpus, batches))
        collect.append(time_collect(adapter, corpus, batches))
    n_tokens = corpus.n_tokens
    result: dict[str, Any] = {
        "shape": shape.__dict__,
        "device": str(device),
        "dtype": str(dtype),
        "n_tokens": n_tokens,
        "n_batches": len(batches),
        "bare_s": statistics.median(bare),
        "collect_s": statistics.median(collect),
        "collect_tokens_per_s": n_tokens / statistics.median(collect),
        "ratio_collect_to_bare": statistics.median(
            c / b for c, b in zip(collect, bare, strict=True)
        ),
    }
    # Measured sparsity: active features per token per layer.
    collector = Collector(adapter, corpus, PARAMS, list(range(adapter.n_layers)))
    for batch in batches[:4]:
        collector.process(batch)
    counted = sum(int(acc.count.sum()) for acc in collector.acc.values())
    tokens = sum(len(b) and int(corpus.lengths()[b].sum()) for b in batches[:4])
    result["active_per_token_per_layer"] = counted / tokens / adapter.n_layers
    if args.naive_sequences and device.type == "cpu":
        head = min(args.naive_sequences, corpus.n_sequences)
        subset = TokenizedCorpus(
            token_ids=corpus.token_ids[: corpus.offsets[head]],
            regions=corpus.regions[: corpus.offsets[head]],
            think_bins=corpus.think_bins[: corpus.offsets[head]],
            offsets=corpus.offsets[: head + 1],
            domains=corpus.domains[:head],
            domain_names=corpus.domain_names,
            truncated=corpus.truncated[:head],
            unterminated=corpus.unterminated[:head],
        )
        start = time.perf_counter()
        naive_collect(adapter, subset, PARAMS, list(range(adapter.n_layers)))
        naive_s = time.perf_counter() - start
        one_by_one = [np.array([i]) for i in range(head)]
        naive_forward_s = time_bare(adapter, subset, one_by_one)
        result["naive_tokens_per_s"] = subset.n_tokens / naive_s
        result["naive_ratio_to_its_forward"] = naive_s / naive_forward_s
        result["speedup_over_naive"] = result["collect_tokens_per_s"] / result["naive_tokens_per_s"]
    return result


def memory_child(args: argparse.Namespace) -> None:
    """Run one whole collection and print its peak RSS (a fresh process per measure)."""
    from collectors.collect import CollectJob, collect_run

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tokenizer, corpus, corpus_path = build_inputs(root, args.traces, args.vocab)
        shape = ModelShape(
            arch="qwen2", n_layers=8, d_model=args.d_model, intermediate=4 * args.d_model,
            n_heads=args.d_model // 64, n_kv_heads=1, vocab_size=len(tokenizer),
            n_features=8192,
        )  # fmt: skip
        adapter = build_adapter(shape, corpus, args.l0, "cpu", torch.float32)
        from adapters.branch import save_adapter

        save_adapter(adapter, tokenizer, root / "ckpt")
        start = time.perf_counter()
        collect_run(
            CollectJob(adapter, tokenizer, corpus, PARAMS, root / "ckpt", corpus_path), root / "run"
        )
        elapsed = time.perf_counter() - start
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps({"traces": args.traces, "n_tokens": corpus.n_tokens,
                          "peak_rss_mib": peak, "collect_run_s": elapsed}))  # fmt: skip


def memory(args: argparse.Namespace) -> list[dict[str, Any]]:
    out = []
    for traces in args.memory_traces:
        command = [sys.executable, __file__, "--memory-child", "--traces", str(traces),
                   "--d-model", str(args.d_model), "--vocab", str(args.vocab)]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True, check=True)
        out.append(json.loads(result.stdout.strip().splitlines()[-1]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--paper-shape", action="store_true")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--features", type=int, default=4096)
    parser.add_argument("--l0", type=float, default=4.0, help="target active features/token/layer")
    parser.add_argument("--traces", type=int, default=200)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--naive-sequences", type=int, default=10)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument(
        "--memory-traces",
        type=lambda v: [int(x) for x in v.split(",")],
        default=[400, 1200],
        help="corpus sizes (traces) of the peak-memory runs at 65,536 features",
    )
    parser.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.memory_child:
        memory_child(args)
        return
    report: dict[str, Any] = {} if args.skip_speed else {"speed": speed(args)}
    if not args.skip_memory and not args.paper_shape:
        report["memory_65536_features"] = memory(args)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
