"""Sampling responses under an intervention, batched, each row with its own seed.

Every (prompt, sample) pair draws its tokens from its own random stream, seeded from the
study's seed, the prompt's id and the sample's number, never from the batch it lands in:
a response does not depend on which rows share its batch, so a resumed study draws
exactly what an uninterrupted one would, and every condition sees the same random
numbers for the same prompt (its differences come from the model, not the draw).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from adapters.branch import AdapterModel
from adapters.interventions import Intervention, intervening


@dataclass(frozen=True)
class SamplingSettings:
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0


@dataclass(frozen=True)
class Row:
    prompt_id: str
    sample: int
    text: str
    """The laid-out prompt."""


@dataclass(frozen=True)
class Generated:
    prompt_id: str
    sample: int
    text: str
    n_tokens: int
    ended: bool
    """Whether the model ended its response (end of sequence) before the token limit."""


def row_seed(seed: int, prompt_id: str, sample: int) -> int:
    digest = hashlib.sha256(f"{seed}\0{prompt_id}\0{sample}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class _RowSampler:
    """A logits processor that samples each row from its own generator and leaves only
    the drawn token possible (generation then runs greedy over it)."""

    def __init__(self, seeds: Sequence[int], settings: SamplingSettings, device: torch.device):
        self.settings = settings
        self.generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        logits = scores.float()
        if self.settings.temperature > 0:
            probs = torch.softmax(logits / self.settings.temperature, dim=-1)
            if self.settings.top_p < 1.0:
                probs = _nucleus(probs, self.settings.top_p)
            picks = torch.cat([
                torch.multinomial(probs[i], 1, generator=g)
                for i, g in enumerate(self.generators)
            ])  # fmt: skip
        else:
            picks = logits.argmax(dim=-1)
        out = torch.full_like(scores, float("-inf"))
        out.scatter_(1, picks.unsqueeze(1), 0.0)
        return out


def _nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    ordered, order = probs.sort(dim=-1, descending=True)
    outside = ordered.cumsum(dim=-1) - ordered > top_p
    ordered = ordered.masked_fill(outside, 0.0)
    kept = torch.zeros_like(probs).scatter_(-1, order, ordered)
    return kept / kept.sum(dim=-1, keepdim=True)


def generate(
    adapter: AdapterModel, tokenizer: Any, rows: Sequence[Row], intervention: Intervention,
    settings: SamplingSettings,
) -> list[Generated]:  # fmt: skip
    """One batch of responses under ``intervention`` (left-padded prompts)."""
    from transformers import LogitsProcessorList

    tokenizer.padding_side = "left"
    encoded = tokenizer(
        [r.text for r in rows], return_tensors="pt", padding=True, add_special_tokens=False
    ).to(adapter.device)
    seeds = [row_seed(settings.seed, r.prompt_id, r.sample) for r in rows]
    sampler = _RowSampler(seeds, settings, adapter.device)
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    with intervening(adapter, intervention), torch.no_grad():
        output = adapter.model.generate(
            **encoded, max_new_tokens=settings.max_new_tokens, do_sample=False, num_beams=1,
            logits_processor=LogitsProcessorList([sampler]), pad_token_id=pad,
            eos_token_id=eos, temperature=None, top_p=None, top_k=None,
        )  # fmt: skip
    new = output[:, encoded["input_ids"].shape[1] :].tolist()
    results = []
    for row, ids in zip(rows, new, strict=True):
        ended = eos in ids
        if ended:
            ids = ids[: ids.index(eos) + 1]
        text = tokenizer.decode(ids[:-1] if ended else ids, skip_special_tokens=False)
        results.append(Generated(row.prompt_id, row.sample, text, len(ids), ended))
    return results
