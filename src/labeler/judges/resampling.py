"""The classifier asked again on random halves of a feature's examples (``label
--resamples K``): how stable a label is.

A label is the classification of everything the classifier was shown. Asked ``K`` more
times, each time on a seeded random subset of about half of those examples, a judge
that gives the same category every time had a clear case; one that changes its answer
with the examples it happens to see had not. The subsets are the same for every judge
(the heuristic, an LLM, the fake server's oracle) and every run of the same ``--seed``:
resample ``number`` of a feature draws from a generator seeded by the seed, the feature
and the number alone, so a resample asked again is the same request (the reply cache
answers it) and a larger ``K`` later adds only the new ones.

:func:`resampling` turns the answers into the judgment's ``resamples``: the categories,
the share that agree with the label (``confidence``) and the most common answer with its
share.
"""

from __future__ import annotations

import random
from collections import Counter
from typing import cast

from labeler.run.schemas import Example, FeatureRecord, Resampling
from prompts import Category

MAX_RESAMPLES = 20
"""The most classifier calls ``--resamples`` may add per feature."""


def resample_examples(
    examples: list[Example], seed: int, feature_id: str, number: int
) -> list[Example]:
    """About half of ``examples`` (rounded up, at least one), in their order: the subset
    of resample ``number`` (0-based) of feature ``feature_id``."""
    if not examples:
        return []
    keep = (len(examples) + 1) // 2
    rng = random.Random(f"resample:{seed}:{feature_id}:{number}")
    chosen = sorted(rng.sample(range(len(examples)), keep))
    return [examples[i] for i in chosen]


def resampled_record(
    feature: FeatureRecord, shown: list[Example], seed: int, number: int
) -> FeatureRecord:
    """The feature as resample ``number`` shows it: of ``shown`` (the examples the
    classifier sees of the whole feature), only the resample's subset."""
    subset = resample_examples(shown, seed, feature.feature_id, number)
    return feature.model_copy(update={"examples": subset})


def resampling(categories: list[str], label: str) -> Resampling:
    """The resampled answers against the label's category; the mode's ties go to the
    label's category, then to the category named first."""
    if not categories:
        raise ValueError("no resampled answers")
    counts = Counter(categories)
    mode = min(counts, key=lambda c: (-counts[c], c != label, c))
    n = len(categories)
    return Resampling(
        categories=cast("list[Category]", list(categories)),
        confidence=counts[label] / n,
        mode=cast("Category", mode),
        mode_share=counts[mode] / n,
    )
