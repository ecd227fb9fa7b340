"""How a judge's labels compare with the planted ground truth of a demo model."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from pydantic import BaseModel

from labeler.labeling.store import LabelStore

INTERPRETABLE = ("reasoning", "domain", "language")


class GroundTruthReport(BaseModel):
    n_compared: int
    planted_reasoning_share: float
    interpretable_accuracy: float
    n_interpretable: int
    accuracy_by_category: dict[str, float]
    reasoning_subcategory_accuracy: float
    reasoning_mechanism_accuracy: float
    domain_type_accuracy: float
    confusion: dict[str, dict[str, int]]
    dead_planted: int
    dead_found_alive: int


def compare_with_ground_truth(path: Path, store: LabelStore, judge: str) -> GroundTruthReport:
    truth = {t["feature_id"]: t for t in json.loads(path.read_text(encoding="utf-8"))}
    planned = {fid for fid, _, _ in store.planned()}
    judged = {
        fid: s.judgment.classification
        for fid, s in store.judgments(judge).items()
        if s.judgment is not None
    }
    confusion: dict[str, Counter[str]] = {}
    hits: Counter[str] = Counter()
    totals: Counter[str] = Counter()
    sub_hits = mech_hits = n_reasoning = dom_hits = n_domain = 0
    for fid, label in judged.items():
        planted = truth[fid]
        cat = planted["category"]
        confusion.setdefault(cat, Counter())[label.category] += 1
        totals[cat] += 1
        hits[cat] += int(label.category == cat)
        if cat == "reasoning" and label.category == "reasoning":
            n_reasoning += 1
            sub_hits += int(label.subcategory == planted["subcategory"])
            mech_hits += int(label.mechanism == planted["mechanism"])
        if cat == "domain" and label.category == "domain":
            n_domain += 1
            dom_hits += int(label.domain_type == planted["domain_type"])
    n_interp = sum(totals[c] for c in INTERPRETABLE)
    alive_planted = [truth[f] for f in planned]
    dead = [t for t in truth.values() if t["category"] == "dead"]
    return GroundTruthReport(
        n_compared=len(judged),
        planted_reasoning_share=(
            sum(t["category"] == "reasoning" for t in alive_planted) / max(len(alive_planted), 1)
        ),
        interpretable_accuracy=sum(hits[c] for c in INTERPRETABLE) / max(n_interp, 1),
        n_interpretable=n_interp,
        accuracy_by_category={c: hits[c] / totals[c] for c in totals},
        reasoning_subcategory_accuracy=sub_hits / max(n_reasoning, 1),
        reasoning_mechanism_accuracy=mech_hits / max(n_reasoning, 1),
        domain_type_accuracy=dom_hits / max(n_domain, 1),
        confusion={k: dict(v) for k, v in confusion.items()},
        dead_planted=len(dead),
        dead_found_alive=sum(1 for t in dead if t["feature_id"] in planned),
    )
