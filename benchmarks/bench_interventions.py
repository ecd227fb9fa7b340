"""Generation with and without an intervention on the branch's features.

A random Qwen2-shaped decoder with a calibrated random adapter generates greedily; the
same generation runs plain (the adapter model), with a selection ablated, with the
selection added to the hybrid model, and as the hybrid (branch off). Tokens per second,
median of the repeats, and each condition's ratio to the plain generation's time.

.venv/bin/python benchmarks/bench_interventions.py [--layers 4] [--d-model 256]
    [--features 4096] [--selected 200] [--new-tokens 64] [--batch 4] [--repeats 5]
    [--device cpu] [--dtype float32]
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

from adapters.interventions import Intervention, intervening
from adapters.random_adapter import ModelShape, random_adapter


def generate(adapter: Any, prompt: torch.Tensor, new_tokens: int) -> float:
    """Seconds to generate ``new_tokens`` for every prompt of the batch."""
    settings = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens,
                "do_sample": False, "pad_token_id": 0}  # fmt: skip
    if prompt.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.no_grad():
        adapter.model.generate(prompt, **settings)
    if prompt.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--features", type=int, default=4096)
    parser.add_argument("--selected", type=int, default=200, help="features per layer")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    shape = ModelShape.scaled(args.layers, args.d_model, args.features, 4000)
    gen = torch.Generator().manual_seed(0)
    calibration = torch.randint(0, shape.vocab_size, (4, 64), generator=gen)
    adapter = random_adapter(shape, calibration, l0=32.0, seed=1, dtype=dtype,
                             device=args.device)  # fmt: skip
    prompt = torch.randint(0, shape.vocab_size, (args.batch, 32), generator=gen).to(args.device)
    picked = torch.randperm(args.features, generator=gen)[: args.selected].tolist()
    selection = [(layer, i) for layer in range(args.layers) for i in picked]
    conditions: dict[str, Intervention | None] = {
        "plain (adapter on)": None,
        f"{args.selected} features/layer ablated": Intervention.ablating(selection),
        f"{args.selected} features/layer added to the hybrid": Intervention.added_to_hybrid(
            selection
        ),
        "hybrid (branch off)": Intervention(branch=0.0),
    }
    generate(adapter, prompt, 4)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in conditions}
    for _ in range(args.repeats):  # interleaved, so drift on a shared machine hits all
        for name, intervention in conditions.items():
            if intervention is None:
                times[name].append(generate(adapter, prompt, args.new_tokens))
            else:
                with intervening(adapter, intervention):
                    times[name].append(generate(adapter, prompt, args.new_tokens))
    plain = statistics.median(times["plain (adapter on)"])
    tokens = args.batch * args.new_tokens
    print(f"{args.layers} layers, d_model {args.d_model}, {args.features} features/layer, "
          f"{args.dtype} on {args.device}; batch {args.batch} x {args.new_tokens} new tokens, "
          f"median of {args.repeats}")  # fmt: skip
    print("| condition | tokens/s | time / plain |")
    print("|---|---:|---:|")
    for name, runs in times.items():
        median = statistics.median(runs)
        print(f"| {name} | {tokens / median:,.0f} | {median / plain:.3f} |")


if __name__ == "__main__":
    main()
