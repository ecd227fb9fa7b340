"""Detection scores: accuracy, precision, recall, and AUROC from probabilities."""

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
    return DetectionScore(
        accuracy=(tp + tn) / n if n else 0.0,
        precision=tp / (tp + fp) if tp + fp else 0.0,
        recall=tp / (tp + fn) if tp + fn else 0.0,
        n_positive=tp + fn,
        n_negative=tn + fp,
        auroc=auroc(labels, probs) if probs is not None else None,
    )
