"""Running an intervention study: every condition over every prompt (sampled) or every
corpus trace (teacher-forced), skipping what the study's log already holds."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from adapters.branch import AdapterModel
from collectors.batching import plan_batches
from collectors.corpus import TokenizedCorpus
from labeler.causal.conditions import Condition
from labeler.causal.generation import Row, SamplingSettings, generate
from labeler.causal.prompts import Prompt
from labeler.causal.records import ResultLog
from labeler.causal.teacher_forced import expectations

Progress = Callable[[int, int], None]
"""Called after each batch with (units done in it, tokens processed in it)."""

GENERATION_KEY = ("condition", "prompt", "sample")
TEACHER_FORCED_KEY = ("condition", "trace")
# What a log line must hold to be a result (any other line is damaged and measured again).
GENERATION_FIELDS = {"condition": str, "prompt": str, "sample": int, "text": str,
                     "n_tokens": int, "ended": bool}  # fmt: skip
TEACHER_FORCED_FIELDS = {"condition": str, "trace": int, "expected": (int, float),
                         "positions": int}  # fmt: skip


@dataclass(frozen=True)
class Work:
    condition: Condition
    rows: list[Row]


def sampled_work(
    conditions: Sequence[Condition], prompts: Sequence[Prompt], samples: int, log: ResultLog,
    batch_size: int,
) -> list[Work]:  # fmt: skip
    """The batches still to generate, condition by condition (one intervention a batch)."""
    work = []
    for condition in conditions:
        rows = [
            Row(p.id, s, p.text)
            for p in prompts
            for s in range(samples)
            if (condition.name, p.id, s) not in log
        ]
        rows.sort(key=lambda r: len(r.text))  # similar lengths pad less
        for start in range(0, len(rows), batch_size):
            work.append(Work(condition, rows[start : start + batch_size]))
    return work


def run_sampled(
    adapter: AdapterModel, tokenizer: Any, work: Sequence[Work], settings: SamplingSettings,
    log: ResultLog, progress: Progress,
) -> None:  # fmt: skip
    for item in work:
        generated = generate(adapter, tokenizer, item.rows, item.condition.intervention, settings)
        log.add(
            {"condition": item.condition.name, "prompt": g.prompt_id, "sample": g.sample,
             "text": g.text, "n_tokens": g.n_tokens, "ended": g.ended}
            for g in generated
        )  # fmt: skip
        progress(len(generated), sum(g.n_tokens for g in generated))


def run_teacher_forced(
    adapter: AdapterModel, corpus: TokenizedCorpus, conditions: Sequence[Condition],
    word_ids: list[int], log: ResultLog, batch_tokens: int, progress: Progress,
) -> None:  # fmt: skip
    plan = plan_batches(corpus.lengths(), batch_tokens)
    lengths = corpus.lengths()
    for condition in conditions:
        for sequences in plan:
            todo = sequences[[(condition.name, int(t)) not in log for t in sequences]]
            if not len(todo):
                continue
            found = list(expectations(adapter, corpus, todo, condition.intervention, word_ids))
            log.add(
                {"condition": condition.name, "trace": e.trace, "expected": e.expected,
                 "positions": e.positions}
                for e in found
            )  # fmt: skip
            progress(len(found), int(lengths[todo].sum()))
