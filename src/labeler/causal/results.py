"""What an intervention study found: per condition, its measures; per mode (ablated,
added), the selection's effect against its reference, the controls' effects, and the
permutation p-value of the selection among them (over the distinct controls drawn)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel

from labeler.causal.conditions import MODES, REFERENCE, Condition
from labeler.causal.measures import (
    Effect,
    Response,
    closes_thinking,
    is_correct,
    paired_rate_effect,
    permutation_p,
    rate_effect,
    rate_per_1000,
    smallest_p,
)


class ConditionResult(BaseModel):
    name: str
    mode: str | None
    control: int | None
    n_features: int
    n: int
    """Responses (sampled) or traces (teacher-forced) measured."""
    tokens: int
    rate: float
    """The word set per 1,000 generated (or predicted) tokens."""
    mean_length: float | None = None
    closed_share: float | None = None
    accuracy: float | None = None
    n_with_reference: int = 0


class EffectResult(BaseModel):
    condition: str
    reference: str
    reference_rate: float
    rate: float
    difference: float
    low: float
    """``low``, ``high``: the 95% percentile bootstrap interval of the difference."""
    high: float
    ratio: float | None
    excludes_zero: bool
    reference_low: float = 0.0
    """``reference_low`` .. ``rate_high``: each rate's own 95% percentile bootstrap
    interval, from the same resamples (never below zero)."""
    reference_high: float = 0.0
    rate_low: float = 0.0
    rate_high: float = 0.0

    @staticmethod
    def of(condition: str, reference: str, effect: Effect) -> EffectResult:
        return EffectResult(
            condition=condition, reference=reference, reference_rate=effect.baseline,
            rate=effect.condition, difference=effect.difference, low=effect.low,
            high=effect.high, ratio=effect.ratio, excludes_zero=effect.excludes_zero,
            reference_low=effect.baseline_low, reference_high=effect.baseline_high,
            rate_low=effect.condition_low, rate_high=effect.condition_high,
        )  # fmt: skip


class ModeResult(BaseModel):
    mode: str
    selection: EffectResult
    controls: list[EffectResult]
    p_value: float | None
    """How often a control moved the rate as far (None without controls)."""
    smallest_p: float | None = None
    """The smallest p-value this many controls can give, ``1 / (1 + K)``."""


class StudyReport(BaseModel):
    measure: Literal["sampled", "teacher_forced"]
    words: list[str]
    unspelled_words: list[str] = []
    n_selected: int
    selected_per_layer: dict[str, int]
    n_controls: int
    """The distinct control selections drawn (and measured)."""
    controls_asked: int | None = None
    """``--controls``: more than ``n_controls`` when the pool held fewer distinct sets."""
    complete: bool
    conditions: list[ConditionResult]
    modes: list[ModeResult]


def _per_layer(condition: Condition) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for layer, _ in condition.features:
        counts[str(layer)] += 1
    return dict(sorted(counts.items(), key=lambda kv: int(kv[0])))


def _modes(conditions: Sequence[Condition], effect_of: Any, present: set[str]) -> list[ModeResult]:
    out = []
    for mode in MODES:
        if mode not in present or REFERENCE[mode] not in present:
            continue
        selection = EffectResult.of(mode, REFERENCE[mode], effect_of(REFERENCE[mode], mode))
        controls = [
            EffectResult.of(c.name, REFERENCE[mode], effect_of(REFERENCE[mode], c.name))
            for c in conditions
            if c.mode == mode and c.control is not None and c.name in present
        ]
        p = (
            permutation_p(selection.difference, [c.difference for c in controls])
            if controls
            else None
        )
        out.append(ModeResult(
            mode=mode, selection=selection, controls=controls, p_value=p,
            smallest_p=smallest_p(len(controls)) if controls else None,
        ))  # fmt: skip
    return out


def _header(conditions: Sequence[Condition]) -> dict[str, Any]:
    selected = next((c for c in conditions if c.control is None and c.mode), None)
    return {
        "n_selected": len(selected.features) if selected else 0,
        "selected_per_layer": _per_layer(selected) if selected else {},
        "n_controls": len({c.control for c in conditions if c.control is not None}),
    }


def sampled_report(
    conditions: Sequence[Condition], rows: Sequence[dict[str, Any]], words: Sequence[str],
    references: dict[str, str | None], expected: int, seed: int = 0,
) -> StudyReport:  # fmt: skip
    """``rows``: the generation log's lines; ``expected``: responses per condition."""
    by_condition: dict[str, list[Response]] = defaultdict(list)
    for row in rows:
        by_condition[row["condition"]].append(
            Response(row["text"], row["n_tokens"], references.get(row["prompt"]))
        )
    results = []
    for c in conditions:
        responses = by_condition.get(c.name, [])
        if not responses:
            continue
        graded = [ok for r in responses if (ok := is_correct(r)) is not None]
        results.append(ConditionResult(
            name=c.name, mode=c.mode, control=c.control, n_features=len(c.features),
            n=len(responses), tokens=sum(r.n_tokens for r in responses),
            rate=rate_per_1000(responses, words),
            mean_length=sum(r.n_tokens for r in responses) / len(responses),
            closed_share=sum(closes_thinking(r.text) for r in responses) / len(responses),
            accuracy=sum(graded) / len(graded) if graded else None,
            n_with_reference=len(graded),
        ))  # fmt: skip

    def effect_of(reference: str, name: str) -> Effect:
        return rate_effect(by_condition[reference], by_condition[name], words, seed=seed)

    present = {r.name for r in results}
    complete = all(len(by_condition.get(c.name, [])) == expected for c in conditions)
    return StudyReport(
        measure="sampled", words=list(words), complete=complete, conditions=results,
        modes=_modes(conditions, effect_of, present), **_header(conditions),
    )  # fmt: skip


def teacher_forced_report(
    conditions: Sequence[Condition], rows: Sequence[dict[str, Any]], words: Sequence[str],
    unspelled: Sequence[str], n_traces: int, seed: int = 0,
) -> StudyReport:  # fmt: skip
    by_condition: dict[str, dict[int, tuple[float, int]]] = defaultdict(dict)
    for row in rows:
        by_condition[row["condition"]][row["trace"]] = (row["expected"], row["positions"])
    results = []
    for c in conditions:
        values = by_condition.get(c.name, {})
        if not values:
            continue
        tokens = sum(n for _, n in values.values())
        rate = 1000.0 * sum(e for e, _ in values.values()) / tokens if tokens else 0.0
        results.append(ConditionResult(
            name=c.name, mode=c.mode, control=c.control, n_features=len(c.features),
            n=len(values), tokens=tokens, rate=rate,
        ))  # fmt: skip

    def effect_of(reference: str, name: str) -> Effect:
        base, cond = by_condition[reference], by_condition[name]
        traces = sorted(set(base) & set(cond))
        return paired_rate_effect(
            [base[t][0] for t in traces], [cond[t][0] for t in traces],
            [base[t][1] for t in traces], seed=seed,
        )  # fmt: skip

    present = {r.name for r in results}
    complete = all(len(by_condition.get(c.name, {})) == n_traces for c in conditions)
    return StudyReport(
        measure="teacher_forced", words=list(words), unspelled_words=list(unspelled),
        complete=complete, conditions=results, modes=_modes(conditions, effect_of, present),
        **_header(conditions),
    )  # fmt: skip
