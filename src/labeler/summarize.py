"""The share of reasoning features with its uncertainty, and the category breakdown."""

from __future__ import annotations

import math
from collections import Counter

from pydantic import BaseModel

from adapters.errors import UserError
from labeler.accounting import judge_status
from labeler.store import LabelStore
from prompts import CATEGORIES

Z95 = 1.959963984540054


class Share(BaseModel):
    count: int
    n: int
    share: float
    ci_low: float
    ci_high: float


def wilson(count: int, n: int, z: float = Z95) -> Share:
    """A share with its Wilson score interval (95% by default)."""
    if n == 0:
        return Share(count=0, n=0, share=0.0, ci_low=0.0, ci_high=1.0)
    p = count / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return Share(count=count, n=n, share=p, ci_low=max(0.0, centre - half),
                 ci_high=min(1.0, centre + half))  # fmt: skip


class Summary(BaseModel):
    run: str
    judge: str
    n_planned: int
    n_labeled: int
    n_failed: int
    n_unlabeled: int
    failures_by_reason: dict[str, int]
    reasoning: Share
    reasoning_if_missing_counted: tuple[float, float]
    by_category: dict[str, Share]
    by_subcategory: dict[str, Share]
    by_mechanism: dict[str, Share]
    by_domain_type: dict[str, Share]
    by_layer: dict[str, dict[str, int]]
    cost_usd: float | None = None
    cost_per_labeled_usd: float | None = None


def reason_group(reason: str | None) -> str:
    """A failure's kind and stage ("invalid_reply: classify"), without the detail."""
    return ":".join((reason or "unknown").split(":")[:2]).strip()


def pick_judge(store: LabelStore, judge: str | None) -> str:
    judges = store.judges()
    if judge is not None:
        if judge not in judges:
            raise UserError(f"no judgments by {judge!r} in {store.path}; judges there: {judges}")
        return judge
    if not judges:
        raise UserError(
            f"{store.path.parent}: no labels yet; run `labeler label {store.path.parent}` first"
        )
    if len(judges) > 1:
        raise UserError(f"several judges in {store.path}: {judges}; choose one with --judge")
    return judges[0]


def summarize(store: LabelStore, run_name: str, judge: str | None = None) -> Summary:
    judge = pick_judge(store, judge)
    planned = store.planned()
    stored = store.judgments(judge)
    ok = [s.judgment for s in stored.values() if s.status == "ok" and s.judgment is not None]
    n_failed = sum(1 for s in stored.values() if s.status == "failed")
    n_labeled = len(ok)
    n_unlabeled = len(planned) - n_labeled - n_failed
    cats = Counter(j.classification.category for j in ok)
    reasoning = [j.classification for j in ok if j.classification.category == "reasoning"]
    domain = [j.classification for j in ok if j.classification.category == "domain"]
    layer_of = {fid: layer for fid, layer, _ in planned}
    by_layer: dict[str, Counter[str]] = {}
    for j in ok:
        by_layer.setdefault(str(layer_of.get(j.feature_id, -1)), Counter())[
            j.classification.category
        ] += 1
    n_reasoning = cats["reasoning"]
    n_all = len(planned)
    status = judge_status(store, judge, n_all)
    return Summary(
        run=run_name,
        judge=judge,
        n_planned=n_all,
        n_labeled=n_labeled,
        n_failed=n_failed,
        n_unlabeled=n_unlabeled,
        failures_by_reason=dict(
            Counter(
                reason_group(s.reason) for s in stored.values() if s.status == "failed"
            ).most_common()
        ),
        reasoning=wilson(n_reasoning, n_labeled),
        reasoning_if_missing_counted=(
            n_reasoning / n_all if n_all else 0.0,
            (n_reasoning + n_all - n_labeled) / n_all if n_all else 0.0,
        ),
        by_category={c: wilson(cats[c], n_labeled) for c in CATEGORIES},
        by_subcategory=_shares(Counter(c.subcategory or "" for c in reasoning)),
        by_mechanism=_shares(Counter(c.mechanism or "" for c in reasoning)),
        by_domain_type=_shares(Counter(c.domain_type or "" for c in domain)),
        by_layer={
            layer: {c: counts[c] for c in CATEGORIES}
            for layer, counts in sorted(by_layer.items(), key=lambda kv: int(kv[0]))
        },
        cost_usd=status.cost_usd,
        cost_per_labeled_usd=status.cost_per_labeled_usd,
    )


def _shares(counts: Counter[str]) -> dict[str, Share]:
    n = sum(counts.values())
    return {key: wilson(count, n) for key, count in counts.most_common()}
