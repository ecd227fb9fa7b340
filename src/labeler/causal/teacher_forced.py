"""The teacher-forced measure: no sampling, the model reads the corpus and says how
likely the word set is next.

At every position whose next token is inside the thinking, the model's next-token
distribution gives the probability that the next token is one of the word set's tokens
(a token that decodes to exactly one of the words, whatever its case, spaces and
punctuation). Their sum over a trace is the trace's expected count; per 1,000 predicted
tokens, pooled over traces, it is the expected rate, which an intervention moves just as
it moves the sampled rate. Words that no single token spells are not counted here (the
study says which).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from adapters.branch import AdapterModel
from adapters.interventions import Intervention, intervening
from collectors.batching import make_batch
from collectors.corpus import REGION_CODE, TokenizedCorpus
from labeler.causal.measures import words_of


@dataclass(frozen=True)
class WordTokens:
    ids: list[int]
    unspelled: list[str]
    """Words of the set that no single token decodes to."""


def word_tokens(tokenizer: Any, words: Iterable[str]) -> WordTokens:
    wanted = {w.lower() for w in words}
    special = set(tokenizer.all_special_ids)
    ids, spelled = [], set()
    for token_id in range(len(tokenizer)):
        if token_id in special:
            continue
        found = words_of(tokenizer.decode([token_id]))
        if len(found) == 1 and found[0] in wanted:
            ids.append(token_id)
            spelled.add(found[0])
    return WordTokens(ids, sorted(wanted - spelled))


@dataclass(frozen=True)
class TraceExpectation:
    trace: int
    expected: float
    """The sum over predicted positions of the word set's next-token probability."""
    positions: int


def expectations(
    adapter: AdapterModel, corpus: TokenizedCorpus, sequences: np.ndarray,
    intervention: Intervention, word_ids: list[int],
) -> Iterator[TraceExpectation]:  # fmt: skip
    """Each listed trace's expected count of the word set under ``intervention``."""
    batch = make_batch(corpus, sequences, adapter.device)
    index = torch.tensor(word_ids, device=adapter.device, dtype=torch.long)
    with intervening(adapter, intervention), torch.no_grad():
        logits = adapter.model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask
        ).logits.float()
    log_norm = torch.logsumexp(logits, dim=-1)
    p_words = torch.exp(torch.logsumexp(logits.index_select(-1, index), dim=-1) - log_norm)
    rows, width = batch.input_ids.shape
    regions = batch.regions.view(rows, width)
    real = batch.attention_mask.bool()
    predicted = torch.zeros_like(real)  # position t predicts token t + 1 inside the thinking
    predicted[:, :-1] = real[:, 1:] & (regions[:, 1:] == REGION_CODE["thinking"])
    expected = (p_words * predicted).sum(dim=1).double().cpu().numpy()
    counts = predicted.sum(dim=1).cpu().numpy()
    for row, trace in enumerate(sequences.tolist()):
        yield TraceExpectation(int(trace), float(expected[row]), int(counts[row]))
