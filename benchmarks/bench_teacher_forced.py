"""The teacher-forced measure against a bare forward pass.

A random Qwen2-shaped decoder with a calibrated random adapter reads a batch of random
"thinking" sequences: as a bare forward pass (the logits, nothing else), and as the
teacher-forced measure does it (the forward pass under an intervention, a log-softmax over
the vocabulary, the word set's probability summed at every predicted position), plain
and with a selection ablated. Tokens per second, median of the repeats, interleaved.

.venv/bin/python benchmarks/bench_teacher_forced.py [--layers 4] [--d-model 256]
    [--features 4096] [--vocab 32000] [--selected 200] [--sequences 8] [--length 512]
    [--repeats 5] [--device cpu] [--dtype float32]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from adapters.interventions import Intervention
from adapters.random_adapter import ModelShape, random_adapter
from collectors.batching import make_batch
from collectors.corpus import REGION_CODE, TokenizedCorpus
from labeler.causal.teacher_forced import expectations


def _corpus(n: int, length: int, vocab: int) -> TokenizedCorpus:
    rng = np.random.default_rng(0)
    total = n * length
    return TokenizedCorpus(
        token_ids=rng.integers(0, vocab, total), regions=np.full(total, REGION_CODE["thinking"],
        dtype=np.int8), think_bins=np.zeros(total, dtype=np.int8),
        offsets=np.arange(0, total + 1, length), domains=np.zeros(n, dtype=np.int16),
        domain_names=["math"], truncated=np.zeros(n, dtype=bool),
        unterminated=np.zeros(n, dtype=bool),
    )  # fmt: skip


def _timed(work: Callable[[], object], device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    work()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--features", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--selected", type=int, default=200, help="features per layer")
    parser.add_argument("--sequences", type=int, default=8)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    shape = ModelShape.scaled(args.layers, args.d_model, args.features, args.vocab)
    gen = torch.Generator().manual_seed(0)
    calibration = torch.randint(0, shape.vocab_size, (4, 64), generator=gen)
    adapter = random_adapter(shape, calibration, l0=32.0, seed=1, dtype=dtype,
                             device=args.device)  # fmt: skip
    corpus = _corpus(args.sequences, args.length, args.vocab)
    sequences = np.arange(args.sequences)
    batch = make_batch(corpus, sequences, adapter.device)
    words = torch.randperm(args.vocab, generator=gen)[:6].tolist()
    picked = torch.randperm(args.features, generator=gen)[: args.selected].tolist()
    ablated = Intervention.ablating([(la, i) for la in range(args.layers) for i in picked])

    def bare() -> None:
        with torch.no_grad():
            adapter.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)

    conditions: dict[str, Callable[[], object]] = {
        "bare forward (logits only)": bare,
        "teacher-forced, plain": lambda: list(
            expectations(adapter, corpus, sequences, Intervention(), words)
        ),
        f"teacher-forced, {args.selected} features/layer ablated": lambda: list(
            expectations(adapter, corpus, sequences, ablated, words)
        ),
    }
    for work in conditions.values():  # warm-up
        work()
    times: dict[str, list[float]] = {name: [] for name in conditions}
    for _ in range(args.repeats):
        for name, work in conditions.items():
            times[name].append(_timed(work, args.device))
    tokens = args.sequences * args.length
    bare_median = statistics.median(times["bare forward (logits only)"])
    print(f"{args.layers} layers, d_model {args.d_model}, {args.features} features/layer, "
          f"vocab {args.vocab}, {args.dtype} on {args.device}; {args.sequences} x "
          f"{args.length} tokens, median of {args.repeats}")  # fmt: skip
    print("| measure | tokens/s | time / bare |")
    print("|---|---:|---:|")
    for name, runs in times.items():
        median = statistics.median(runs)
        print(f"| {name} | {tokens / median:,.0f} | {median / bare_median:.3f} |")


if __name__ == "__main__":
    main()
