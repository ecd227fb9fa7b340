"""Detection scores: accuracy, precision, recall, F1, balanced accuracy, and AUROC and
average precision (AUPRC) from probabilities.

Of these, F1, AUPRC (and AUROC, balanced accuracy) pass the sanity checks of Oikarinen
et al., "Evaluation of Neuron Explanations: A Unified Framework with Sanity Checks"
(ICML 2025): a perfect explanation scores 1, and an explanation whose answers are
independent of the truth scores at chance (the base rate for F1 and AUPRC, 0.5 for
balanced accuracy and AUROC) whatever the share of activating examples. Plain accuracy
drifts with that share: "always active" on 90% activating examples scores 0.9.

Scores that need both classes are null where one is missing, with the reason in
``undefined``: over activating examples alone accuracy is recall, and every "active"
answer is right, so a feature without non-activating examples would score 1.00 whatever
its explanation. Recall is null only without activating examples. The functions take
plain lists, so any scorer (detection, fuzzing, intruder) can use them."""

from __future__ import annotations

from labeler.run.schemas import DetectionScore


def _counts(labels: list[bool], predicted: list[bool]) -> tuple[int, int, int, int]:
    """(tp, fp, fn, tn)."""
    pairs = list(zip(labels, predicted, strict=True))
    tp = sum(y and p for y, p in pairs)
    fp = sum((not y) and p for y, p in pairs)
    fn = sum(y and not p for y, p in pairs)
    return tp, fp, fn, len(pairs) - tp - fp - fn


def f1_score(labels: list[bool], predicted: list[bool]) -> float | None:
    """The harmonic mean of precision and recall, ``2 tp / (2 tp + fp + fn)`` (0 when
    nothing is found); None without both classes."""
    tp, fp, fn, tn = _counts(labels, predicted)
    if tp + fn == 0 or fp + tn == 0:
        return None
    return 2 * tp / (2 * tp + fp + fn)


def balanced_accuracy(labels: list[bool], predicted: list[bool]) -> float | None:
    """The mean of the true-positive and the true-negative rate; None without both
    classes."""
    tp, fp, fn, tn = _counts(labels, predicted)
    if tp + fn == 0 or fp + tn == 0:
        return None
    return (tp / (tp + fn) + tn / (tn + fp)) / 2


def auroc(labels: list[bool], scores: list[float]) -> float | None:
    """The probability that a random positive scores above a random negative (ties count
    one half); None without both classes."""
    pos = [s for s, y in zip(scores, labels, strict=True) if y]
    neg = [s for s, y in zip(scores, labels, strict=True) if not y]
    if not pos or not neg:
        return None
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def average_precision(labels: list[bool], scores: list[float]) -> float | None:
    """The area under the precision-recall curve as a step-wise sum, without
    interpolation (scikit-learn's ``average_precision_score``): over each distinct
    score t, from the highest, ``(R_t - R_previous) * P_t`` with precision and recall of
    "score >= t". Tied scores enter together, so the order of the input does not matter.
    None without both classes."""
    n_positive = sum(labels)
    if n_positive == 0 or n_positive == len(labels):
        return None
    ranked = sorted(zip(scores, labels, strict=True), key=lambda pair: -pair[0])
    ap, tp, seen, i = 0.0, 0, 0, 0
    while i < len(ranked):
        threshold, new_tp = ranked[i][0], 0
        while i < len(ranked) and ranked[i][0] == threshold:
            new_tp += ranked[i][1]
            seen += 1
            i += 1
        tp += new_tp
        ap += new_tp * tp / seen
    return ap / n_positive


def detection_score(
    labels: list[bool], predicted: list[bool], probs: list[float] | None = None
) -> DetectionScore:
    tp, fp, fn, tn = _counts(labels, predicted)
    n = len(labels)
    n_positive, n_negative = tp + fn, tn + fp
    missing = [name for name, k in (("activating", n_positive), ("non-activating", n_negative))
               if k == 0]  # fmt: skip
    undefined = f"no {' and no '.join(missing)} examples were scored" if missing else None
    return DetectionScore(
        accuracy=None if undefined else (tp + tn) / n,
        precision=None if undefined else (tp / (tp + fp) if tp + fp else 0.0),
        recall=tp / n_positive if n_positive else None,
        n_positive=n_positive,
        n_negative=n_negative,
        auroc=auroc(labels, probs) if probs is not None else None,
        undefined=undefined,
        f1=f1_score(labels, predicted),
        balanced_accuracy=balanced_accuracy(labels, predicted),
        auprc=average_precision(labels, probs) if probs is not None else None,
    )
