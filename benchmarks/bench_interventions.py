"""Interventions on the branch's features: what they cost in generation, and what the
teacher-forced measure costs against a bare forward pass.

A random Qwen2-shaped decoder with a calibrated random adapter, the conditions
interleaved over the repeats (so drift on a shared machine hits all), tokens per second
at the median and each condition's time against the first one's:

- ``--measure generation`` (default): greedy generation, plain (the adapter model), with
  a selection ablated, with the selection added to the hybrid model, and as the hybrid
  (branch off); a 32-token prompt, ``--new-tokens`` per row, vocabulary 4,000;
- ``--measure teacher-forced``: random "thinking" sequences read as a bare forward pass
  (the logits, nothing else) and as ``labeler intervene --teacher-forced`` reads them
  (a log-softmax over the vocabulary, the word set's probability summed at every
  predicted position), plain and with the selection ablated; vocabulary 32,000.

.venv/bin/python benchmarks/bench_interventions.py [--measure generation|teacher-forced]
    [--layers 4] [--d-model 256] [--features 4096] [--vocab V] [--selected 200]
    [--new-tokens 64] [--batch 4] [--sequences 8] [--length 512] [--repeats 5]
    [--device cpu] [--dtype float32]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from adapters.interventions import Intervention, intervening
from adapters.random_adapter import ModelShape, random_adapter
from collectors.batching import make_batch
from collectors.corpus import REGION_CODE, TokenizedCorpus
from labeler.causal.teacher_forced import expectations

Work = Callable[[], object]


def _timed(work: Work, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    work()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _generation(adapter: Any, args: argparse.Namespace, selection: list[tuple[int, int]],
                gen: torch.Generator) -> tuple[dict[str, Work], int, str]:  # fmt: skip
    prompt = torch.randint(0, args.vocab, (args.batch, 32), generator=gen).to(args.device)
    settings = {"max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens,
                "do_sample": False, "pad_token_id": 0}  # fmt: skip

    def under(intervention: Intervention | None) -> Work:
        def work() -> None:
            with torch.no_grad():
                if intervention is None:
                    adapter.model.generate(prompt, **settings)
                else:
                    with intervening(adapter, intervention):
                        adapter.model.generate(prompt, **settings)

        return work

    conditions = {
        "plain (adapter on)": under(None),
        f"{args.selected} features/layer ablated": under(Intervention.ablating(selection)),
        f"{args.selected} features/layer added to the hybrid": under(
            Intervention.added_to_hybrid(selection)
        ),
        "hybrid (branch off)": under(Intervention(branch=0.0)),
    }
    return (
        conditions,
        args.batch * args.new_tokens,
        (f"batch {args.batch} x {args.new_tokens} new tokens"),
    )


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


def _teacher_forced(adapter: Any, args: argparse.Namespace, selection: list[tuple[int, int]],
                    gen: torch.Generator) -> tuple[dict[str, Work], int, str]:  # fmt: skip
    corpus = _corpus(args.sequences, args.length, args.vocab)
    sequences = np.arange(args.sequences)
    batch = make_batch(corpus, sequences, adapter.device)
    words = torch.randperm(args.vocab, generator=gen)[:6].tolist()

    def bare() -> None:
        with torch.no_grad():
            adapter.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)

    def measured(intervention: Intervention) -> Work:
        return lambda: list(expectations(adapter, corpus, sequences, intervention, words))

    conditions = {
        "bare forward (logits only)": bare,
        "teacher-forced, plain": measured(Intervention()),
        f"teacher-forced, {args.selected} features/layer ablated": measured(
            Intervention.ablating(selection)
        ),
    }
    return conditions, args.sequences * args.length, (f"{args.sequences} x {args.length} tokens")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--measure", default="generation", choices=["generation", "teacher-forced"])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--features", type=int, default=4096)
    parser.add_argument(
        "--vocab", type=int, default=None, help="default 4000 (generation), 32000 (teacher-forced)"
    )
    parser.add_argument("--selected", type=int, default=200, help="features per layer")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--sequences", type=int, default=8)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    if args.vocab is None:
        args.vocab = 4000 if args.measure == "generation" else 32000
    shape = ModelShape.scaled(args.layers, args.d_model, args.features, args.vocab)
    gen = torch.Generator().manual_seed(0)
    calibration = torch.randint(0, shape.vocab_size, (4, 64), generator=gen)
    adapter = random_adapter(shape, calibration, l0=32.0, seed=1,
                             dtype=getattr(torch, args.dtype), device=args.device)  # fmt: skip
    picked = torch.randperm(args.features, generator=gen)[: args.selected].tolist()
    selection = [(layer, i) for layer in range(args.layers) for i in picked]
    build = _generation if args.measure == "generation" else _teacher_forced
    conditions, tokens, what = build(adapter, args, selection, gen)
    for work in conditions.values():  # warm-up
        work()
    times: dict[str, list[float]] = {name: [] for name in conditions}
    for _ in range(args.repeats):
        for name, work in conditions.items():
            times[name].append(_timed(work, args.device))
    first = statistics.median(next(iter(times.values())))
    print(f"{args.layers} layers, d_model {args.d_model}, {args.features} features/layer, "
          f"vocab {args.vocab}, {args.dtype} on {args.device}; {what}, "
          f"median of {args.repeats}")  # fmt: skip
    print(f"| condition | tokens/s | time / {next(iter(times)).split(' (')[0]} |")
    print("|---|---:|---:|")
    for name, runs in times.items():
        median = statistics.median(runs)
        print(f"| {name} | {tokens / median:,.0f} | {median / first:.3f} |")


if __name__ == "__main__":
    main()
