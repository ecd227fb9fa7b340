"""What a labeling did and what it cost (``labeler status``), and what one would cost
before it runs (``labeler label --dry-run``)."""

from __future__ import annotations

import datetime as dt
import logging
import statistics
import time
from collections import Counter
from collections.abc import Sequence

from pydantic import BaseModel, Field

from labeler.judges import Judge
from labeler.judges.backend import Prompt
from labeler.judges.llm_judge import LLMJudge
from labeler.judges.pricing import PriceTable
from labeler.judges.prompting import (
    classify_prompt,
    detect_prompt,
    detection_snippets,
    explain_prompt,
    fuzz_prompt,
    intruder_prompt,
    system_prompt,
)
from labeler.judges.resampling import resampled_record
from labeler.judges.scorers import INTRUDER_TRIALS, fuzz_items, intruder_trials
from labeler.labeling.call_journal import forget, unanswered
from labeler.labeling.store import LabelStore
from labeler.run.data import RunData
from labeler.run.schemas import Snippet, Usage

log = logging.getLogger(__name__)

CHARS_PER_TOKEN = 4.0
ESTIMATE_SAMPLE = 20
MEASURED_MIN = 5
# Output tokens per call when nothing has been measured yet (a non-reasoning model): a
# fuzzing reply holds ten booleans as a detection reply does, an intruder reply five numbers.
DEFAULT_OUTPUT_TOKENS = {"explain": 30, "detect": 40, "classify": 80, "fuzz": 40, "intruder": 20,
                         "resample": 80}  # fmt: skip
PLACEHOLDER_EXPLANATION = " ".join(["word"] * 15)


class JudgeStatus(BaseModel):
    judge: str
    planned: int
    labeled: int
    failed: int
    pending: int
    failed_by_kind: dict[str, int]
    usage: Usage
    usage_by_stage: dict[str, Usage]
    cost_usd: float | None
    cost_per_labeled_usd: float | None
    queued: int | None = Field(None, description="stage tasks waiting in the fleet's queues")
    running: int | None = Field(None, description="features (local) or stage tasks (fleet)")
    throughput_per_s: float | None = Field(None, description="over the last 5 minutes")
    eta_s: float | None = Field(None, description="pending / throughput")
    unanswered_calls: int = Field(
        0,
        description="calls a killed labeler had sent and never heard back from: billed, "
        "their usage and cost estimated and included above",
    )


THROUGHPUT_WINDOW_S = 300.0


def throughput(store: LabelStore, judge: str, now: float | None = None) -> float | None:
    """Judgments stored per second over the last five minutes (None: fewer than two)."""
    now = time.time() if now is None else now
    since = dt.datetime.fromtimestamp(now - THROUGHPUT_WINDOW_S, dt.UTC)
    rows = store.finished_since(since.isoformat(timespec="milliseconds"), judge)
    stamps = [dt.datetime.fromisoformat(t).timestamp() for t in rows]
    if len(stamps) < 2:
        return None
    return (len(stamps) - 1) / max(now - stamps[0], 1e-3)


def with_live_state(
    status: JudgeStatus, queued: int | None, running: int | None, rate: float | None
) -> JudgeStatus:
    eta = (
        status.pending / rate if rate and status.pending else (0.0 if not status.pending else None)
    )
    return status.model_copy(
        update={"queued": queued, "running": running, "throughput_per_s": rate, "eta_s": eta}
    )


def judge_status(store: LabelStore, judge: str, n_planned: int) -> JudgeStatus:
    rows = store.accounting(judge)
    labeled = sum(1 for status, *_ in rows if status == "ok")
    failed_kinds = Counter(
        (reason or "unknown").split(":", 1)[0] for status, reason, *_ in rows if status == "failed"
    )
    by_stage: dict[str, Usage] = {}
    costs: list[float | None] = []
    for _status, _reason, usage, cost in rows:
        for stage, u in usage.items():
            by_stage[stage] = by_stage.get(stage, Usage()) + u
        costs.append(cost)
    unanswered = store.unanswered(judge)
    for stage, u, cost in unanswered:  # estimated: sent by a labeler killed before the reply
        by_stage[stage] = by_stage.get(stage, Usage()) + u
        costs.append(cost)
    known = [c for c in costs if c is not None]
    total = sum(known) if known or not costs else None
    failed = sum(failed_kinds.values())
    return JudgeStatus(
        judge=judge,
        planned=n_planned,
        labeled=labeled,
        failed=failed,
        pending=max(0, n_planned - labeled - failed),
        failed_by_kind=dict(failed_kinds.most_common()),
        usage=sum(by_stage.values(), Usage()),
        usage_by_stage=by_stage,
        cost_usd=total,
        cost_per_labeled_usd=total / labeled if total is not None and labeled else None,
        unanswered_calls=len(unanswered),
    )


def run_status(store: LabelStore) -> list[JudgeStatus]:
    n_planned = len(store.planned())
    return [judge_status(store, judge, n_planned) for judge in store.judges()]


class Estimate(BaseModel):
    """Calls, tokens and dollars a labeling would take."""

    judge: str
    features: int
    calls: int
    input_tokens: int
    cached_tokens: int
    output_tokens: int
    cost_usd: float | None
    output_measured: bool
    batch_cost_usd: float | None = Field(
        None, description="the same through the provider's batch API (None: it has none)"
    )


def _tokens(text: str) -> int:
    return round(len(text) / CHARS_PER_TOKEN)


def _measured_output(store: LabelStore | None, judge: str) -> dict[str, float] | None:
    """Mean output tokens per call and stage of this judge's earlier judgments."""
    if store is None:
        return None
    rows = [usage for status, _, usage, _ in store.accounting(judge) if status == "ok" and usage]
    if len(rows) < MEASURED_MIN:
        return None
    out: dict[str, float] = {}
    for stage in DEFAULT_OUTPUT_TOKENS:
        per_call = [u[stage].output_tokens / u[stage].calls for u in rows if u.get(stage)]
        if per_call:
            out[stage] = statistics.fmean(per_call)
    return out


def estimate(
    run: RunData,
    judge: Judge,
    feature_ids: list[str],
    prices: PriceTable,
    store: LabelStore | None = None,
    rescore: dict[str, list[str]] | None = None,
) -> Estimate:
    """Render the prompts of up to 20 of the features and extrapolate: input tokens at
    about 4 characters a token, the shared instructions read from the prompt cache after
    the first call; output tokens as measured on this judge's earlier judgments in the
    store, else typical values of a non-reasoning model. The scorers beyond detection
    the judge was built with (fuzz, intruder) add their prompts and calls.

    ``rescore`` maps a scorer to features judged already whose judgment lacks it: the
    labeling asks only that scorer's call of them (the other stages are stored)."""
    rescore = {s: ids for s, ids in (rescore or {}).items() if ids}
    n = len(feature_ids)
    features = len(set(feature_ids).union(*rescore.values()))
    extra_calls = sum(len(ids) for ids in rescore.values())
    calls = n * judge.calls_per_feature + extra_calls
    if not isinstance(judge, LLMJudge) or calls == 0:
        return Estimate(judge=judge.name, features=features, calls=calls,
                        input_tokens=0, cached_tokens=0, output_tokens=0, cost_usd=0.0,
                        output_measured=False)  # fmt: skip
    scorers = [s for s in ("fuzz", "intruder") if s in judge.scorers]
    resample = ["resample"] if judge.resamples else []  # K calls a feature
    full = ["explain", "detect_top", "detect_random", "classify", *scorers, *resample]
    user_tokens = {stage: 0.0 for stage in full}
    for stage in full:
        ids = feature_ids if stage not in rescore else feature_ids + rescore[stage]
        if ids:
            user_tokens[stage] = statistics.fmean(
                _tokens(p.user) for p in _sample_prompts(run, judge, ids, stage)
            )
    system_tokens = _tokens(system_prompt())
    measured = _measured_output(store, judge.name)
    # a stage not measured yet (a scorer asked for the first time) takes the default
    per_stage = {k: float(v) for k, v in DEFAULT_OUTPUT_TOKENS.items()} | (measured or {})
    input_tokens = output_tokens = 0.0
    for stage in full:
        per_feature = judge.resamples if stage == "resample" else 1
        n_calls = n * per_feature + len(rescore.get(stage, []))
        input_tokens += user_tokens[stage] * n_calls
        output_tokens += per_stage[stage.removesuffix("_top").removesuffix("_random")] * n_calls
    usage = Usage(
        calls=calls,
        input_tokens=round(input_tokens) + system_tokens,
        cached_tokens=system_tokens * max(0, calls - 1),
        output_tokens=round(output_tokens),
    )
    return Estimate(
        judge=judge.name,
        features=features,
        calls=calls,
        input_tokens=usage.input_tokens,
        cached_tokens=usage.cached_tokens,
        output_tokens=usage.output_tokens,
        cost_usd=prices.cost(judge.name, usage, judge.tier),
        output_measured=measured is not None,
        batch_cost_usd=prices.cost(judge.name, usage, "batch") if _batchable(judge) else None,
    )


def _sample_prompts(
    run: RunData, judge: LLMJudge, feature_ids: list[str], stage: str
) -> list[Prompt]:
    """One stage's prompts for up to 20 of the features, a placeholder explanation
    standing in for the one the labeling would get."""
    settings = judge.settings
    negatives = [Snippet(tokens=list(t), activating=False) for t in run.negatives["tokens"][:5]]
    prompts: list[Prompt] = []
    for record in run.records(feature_ids[:ESTIMATE_SAMPLE]):
        if stage == "explain":
            prompts.append(explain_prompt(record, settings.n_examples, settings.explain_from))
        elif stage == "classify":
            prompts.append(classify_prompt(record, settings.n_examples, settings.n_logits))
        elif stage == "resample":  # the first resample's half stands for every one's
            shown = record.of_kind("top")[: settings.n_examples]
            half = resampled_record(record, shown, settings.seed, 0)
            prompts.append(classify_prompt(half, settings.n_examples, settings.n_logits))
        elif stage == "fuzz":
            prompts.append(fuzz_prompt(PLACEHOLDER_EXPLANATION, fuzz_items(record, settings.seed)))
        elif stage == "intruder":
            trials = intruder_trials(record, negatives[:INTRUDER_TRIALS], settings.seed)
            prompts.append(intruder_prompt(trials))
        else:
            positives = record.of_kind(stage.removeprefix("detect_"))[: settings.n_positives]
            snippets = detection_snippets(positives, negatives, 0)
            prompts.append(detect_prompt(PLACEHOLDER_EXPLANATION, snippets))
    return prompts


def _batchable(judge: LLMJudge) -> bool:
    from labeler.judges.batch_api import batch_api

    return batch_api(judge.backend) is not None


def count_unanswered(store: LabelStore, judges: Sequence[Judge]) -> int:
    """Store the calls the run's journal holds as sent and never answered (a labeler
    killed with calls in flight), their cost estimated with the judge's prices, then
    start the journal afresh; how many. Called under the run's lock, before any call."""
    folder = store.path.parent
    calls = unanswered(folder)
    by_name = {j.name: j for j in judges}
    for call in calls:
        output = DEFAULT_OUTPUT_TOKENS.get(call.stage, 0)
        usage = Usage(calls=1, input_tokens=call.input_tokens, output_tokens=output)
        judge = by_name.get(call.judge)
        cost = judge.cost({call.stage: usage}) if isinstance(judge, LLMJudge) else None
        store.add_unanswered(call.judge, call.stage, usage, cost)
    forget(folder)
    if calls:
        log.warning(
            "%d calls were sent by a labeler of %s that stopped before their replies came: "
            "billed, they are counted in its cost (estimated)", len(calls), folder,
        )  # fmt: skip
    return len(calls)
