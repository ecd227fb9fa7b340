"""What a feature's page shows (``GET /api/feature/ID``, and each page of a static
export): the review view (:func:`labeler.review.queue.feature_view`) with every judge's
scores of every scorer, whether the reviewers disagree and the output score's promoted
tokens as shown."""

from __future__ import annotations

from typing import Any

from labeler.labeling.store import LabelStore
from labeler.reporting.disputes import DisputeRules
from labeler.reporting.label_table import judgment_frame
from labeler.review.queue import feature_view, reviewers_disagree
from labeler.review.tokens import shown_tokens
from labeler.run.data import RunData


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
    run: RunData, store: LabelStore, rules: DisputeRules, feature_id: str
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
    return data
