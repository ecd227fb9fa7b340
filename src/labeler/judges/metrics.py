"""Detection scores: accuracy, precision, recall, and AUROC from probabilities.

Accuracy and precision need both classes: over activating examples alone accuracy is
recall, and every "active" answer is right, so a feature without non-activating
examples would score 1.00 whatever its explanation. Such scores are null, with the reason
in ``undefined``; recall is null only without activating examples."""

from __future__ import annotations

from labeler.run.schemas import DetectionScore


def auroc(labels: list[bool], scores: list[float]) -> float | None:
    """The probability that a random positive scores above a random negative (ties count
    one half); None without both classes."""
    pos = [s for s, y in zip(scores, labels, strict=True) if y]
    neg = [s for s, y in zip(scores, labels, strict=True) if not y]
    if not pos or not neg:
        return None
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def detection_score(
    labels: list[bool], predicted: list[bool], probs: list[float] | None = None
) -> DetectionScore:
    tp = sum(y and p for y, p in zip(labels, predicted, strict=True))
    fp = sum((not y) and p for y, p in zip(labels, predicted, strict=True))
    fn = sum(y and not p for y, p in zip(labels, predicted, strict=True))
    tn = len(labels) - tp - fp - fn
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
    )
