"""What a feature's page shows (``GET /api/feature/ID``, and each page of a static
export): the review view (:func:`labeler.review.queue.feature_view`) with every judge's
scores of every scorer, whether the reviewers disagree and the output score's promoted
tokens as shown; and what a researcher reads a feature by on Neuronpedia or
SAEDashboard:

- ``activation``: the histogram of its activations on the tokens where it fires
  (``labeler.run.spread``: estimated from its random examples, a uniform sample of those
  tokens; 32 equal bins over ``[act_min, act_max]``, each the estimated number of tokens,
  summing to ``count``), with ``density`` (the share of the corpus's tokens it fires on)
  and ``log10_density``;
- ``bottom_logit_values``: the logit lens's values of the tokens it demotes most (the
  promoted ones' are ``top_logit_values``);
- ``neighbours``: the features nearest it by decoder direction, by encoder direction and
  by co-activation (:mod:`labeler.review.neighbours`, built once by ``labeler browse``),
  each with its value, its label (a reviewer's latest decision, else a model judge's,
  else the heuristic's) and its explanation; ``neighbour_notes`` say what each kind
  rests on, or why it is missing."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

import polars as pl

from collectors.run_format import LOGIT_HISTOGRAM
from labeler.labeling.store import LabelStore
from labeler.reporting.disputes import DisputeRules
from labeler.reporting.label_table import HEURISTIC, judgment_frame
from labeler.review.neighbours import NEIGHBOUR_KINDS, NeighbourIndex
from labeler.review.queue import feature_view, reviewers_disagree
from labeler.review.tokens import shown_tokens
from labeler.run.data import RunData
from labeler.run.schemas import Example
from labeler.run.spread import HISTOGRAM_BINS, activation_spread

NO_NEIGHBOURS = "not built: labeler browse builds the neighbour index when it starts"


def judge_scores(store: LabelStore, feature_id: str) -> dict[str, dict[str, object]]:
    """Each judge's scores of one feature, as the page shows them: ``scores`` (detection,
    pooled: accuracy, precision, recall, F1, balanced accuracy, AUROC, AUPRC, counts),
    ``fuzz`` (the same metrics) and ``intruder`` (accuracy, chance, 95% interval,
    p-value, trials), each null where the judge was not asked for it or failed. The
    page's one ``detection`` number (accuracy) predates the other scorers."""
    frame = judgment_frame(store, full=True, feature_id=feature_id)
    fields = ("scores", "fuzz", "intruder")
    return {
        row["judge"]: {f: row[f] if row["status"] == "ok" else None for f in fields}
        for row in frame.select("judge", "status", *fields).iter_rows(named=True)
    }


def feature_payload(
    run: RunData,
    store: LabelStore,
    rules: DisputeRules,
    feature_id: str,
    neighbours: NeighbourIndex | None = None,
) -> dict[str, Any]:
    """Everything a feature's page shows, as JSON; UnknownFeature if it is not planned."""
    view = feature_view(run, store, feature_id, rules)
    data = view.model_dump(mode="json")
    data["disagreement"] = reviewers_disagree(view.reviews)
    scores = judge_scores(store, feature_id)
    for judge in data["judges"]:
        judge.update(scores.get(judge["judge"], {}))
    if view.output_score is not None:
        data["output_score"]["promoted_shown"] = shown_tokens(view.output_score.promoted)
    row = _feature_row(run, feature_id)
    data["activation"] = activation_histogram(view.examples, row, view.count)
    data["density"] = view.frequency
    data["log10_density"] = math.log10(view.frequency) if view.frequency > 0 else None
    data["bottom_logit_values"] = [float(v) for v in row.get("bottom_logit_values") or []]
    data["logit_histogram"] = logit_spread(row)
    data |= neighbour_lists(store, neighbours, view.layer, view.index)
    return data


def _feature_row(run: RunData, feature_id: str) -> dict[str, Any]:
    """The feature's row of features.parquet (the columns the page adds)."""
    columns = ("act_min", "act_max", "top_logit_values", "bottom_logit_values", LOGIT_HISTOGRAM)
    wanted = [c for c in columns if c in run.features.columns]
    rows = run.features.filter(pl.col("feature_id") == feature_id).select(wanted)
    return rows.row(0, named=True) if rows.height else {}


def activation_histogram(
    examples: Sequence[Example], row: dict[str, Any], count: int
) -> dict[str, Any] | None:
    """The histogram of the feature's activations on the tokens where it fires, estimated
    from its uniform sample of those tokens: the quantile examples, which partition the
    whole sample, else the random ones (its first ``n_random``); from every example when
    it has neither, which leans to the strongest (``sample`` says which). None without
    examples."""
    by_kind = {
        kind: [e.activation for e in examples if e.kind == kind] for kind in ("quantile", "random")
    }
    if by_kind["quantile"] and len(by_kind["quantile"]) >= len(by_kind["random"]):
        sample, source = by_kind["quantile"], "uniform"
    elif by_kind["random"]:
        sample, source = by_kind["random"], "uniform"
    else:
        sample, source = [e.activation for e in examples], "examples"
    if not sample:
        return None
    lo = min(float(row.get("act_min") or min(sample)), min(sample))
    hi = max(float(row.get("act_max") or max(sample)), max(sample))
    spread = activation_spread(sample, lo, hi, count)
    return {
        "lo": lo,
        "hi": hi,
        "bins": spread.histogram,
        "n_bins": HISTOGRAM_BINS,
        "sample": source,
        "n_sample": len(sample),
        "median": spread.quantile_values[49] if spread.quantile_values else None,
    }


def logit_spread(row: dict[str, Any]) -> dict[str, Any] | None:
    """How the logits of the whole vocabulary are spread (the collector's histogram: equal
    bins from the lowest logit to the highest, each the number of tokens in it); None for
    a run collected without it."""
    counts = row.get(LOGIT_HISTOGRAM)
    top, bottom = row.get("top_logit_values"), row.get("bottom_logit_values")
    if counts is None or not top or not bottom:
        return None
    return {"lo": float(bottom[0]), "hi": float(top[0]), "bins": [float(c) for c in counts]}


def neighbour_lists(
    store: LabelStore, index: NeighbourIndex | None, layer: int, feature: int
) -> dict[str, Any]:
    """``neighbours`` (kind -> list of ``{feature_id, value, shared, category,
    explanation}``) and ``neighbour_notes`` (kind -> what it rests on or why it is empty)."""
    if index is None:
        return {
            "neighbours": {kind: [] for kind in NEIGHBOUR_KINDS},
            "neighbour_notes": {kind: NO_NEIGHBOURS for kind in NEIGHBOUR_KINDS},
        }
    found = index.of(layer, feature)
    ids = sorted({n.feature_id for kind in found.values() for n in kind})
    labels = short_labels(store, ids)
    return {
        "neighbours": {
            kind: [
                {
                    "feature_id": n.feature_id,
                    "value": n.value,
                    "shared": n.shared,
                    **labels.get(n.feature_id, {"category": None, "explanation": None}),
                }
                for n in found.get(kind, [])
            ]
            for kind in NEIGHBOUR_KINDS
        },
        "neighbour_notes": {kind: index.notes.get(kind, "") for kind in NEIGHBOUR_KINDS},
    }


def short_labels(store: LabelStore, feature_ids: list[str]) -> dict[str, dict[str, str | None]]:
    """Each feature's category as a link shows it (a reviewer's latest decision, else a
    model judge's, else the heuristic's) and its preferred judge's explanation."""
    if not feature_ids:
        return {}
    wanted = json.dumps(feature_ids)
    out: dict[str, dict[str, str | None]] = {}
    judged = store.conn.execute(
        "SELECT feature_id, category, payload ->> '$.explanation' FROM judgments "
        "WHERE status = 'ok' AND feature_id IN (SELECT value FROM json_each(?)) "
        "ORDER BY feature_id, judge = ?, judge",
        (wanted, HEURISTIC),
    )
    for feature_id, category, explanation in judged:
        out.setdefault(str(feature_id), {"category": category, "explanation": explanation})
    decided = store.conn.execute(
        "SELECT feature_id, category FROM reviews WHERE action = 'decide' "
        "AND feature_id IN (SELECT value FROM json_each(?)) ORDER BY id",
        (wanted,),
    )
    for feature_id, category in decided:
        entry = out.setdefault(str(feature_id), {"category": None, "explanation": None})
        entry["category"] = category
    return out
