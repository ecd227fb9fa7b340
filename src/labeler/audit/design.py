"""Which labeled features people audit, drawn with known inclusion probabilities.

The frame is every feature some judge labeled. Each gets a *size*: uniform, or (the
default) larger where its label is more likely wrong, so that people spend their time
where the judges may err. Following Zrnic and Candès ("Active Statistical Inference",
ICML 2024), the best inclusion probability of a feature is proportional to the square
root of the expected squared error of its label; the expected error is guessed from what
the run knows (:func:`error_guess`). The guess only decides how narrow the interval is:
the estimate (``labeler.audit.estimate``) is unbiased whatever it says, because every
feature keeps a known, positive probability. A fifth of every size is the frame's mean
size (a defensive mixture, Hesterberg 1995), so that no feature's weight explodes.

The draw is sequential Poisson sampling (Ohlsson 1998): each feature gets a seeded
uniform ``u``, and the features are drawn in increasing order of ``u / size``. The first
``m`` drawn are a sample of size ``m`` with inclusion probabilities ``min(1, c * size)``
(``c`` such that they sum to ``m``) whatever ``m`` is, so that the features reviewed so
far, in draw order, are themselves such a sample: a half-finished audit already gives
a valid estimate.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import numpy.typing as npt

from labeler.labeling.store import AuditRow, LabelStore

Weighting = Literal["uncertainty", "uniform"]
WEIGHTINGS: tuple[Weighting, ...] = ("uncertainty", "uniform")
DEFENSIVE_SHARE = 0.2
"""The share of each size that is the frame's mean size."""
MIN_ERROR = 0.02

STATED = {"high": 0.0, "medium": 0.1, "low": 0.2}
"""What a judge's own stated confidence adds to the guessed error."""


@dataclass(frozen=True)
class Signals:
    """What the judges' labels of one feature say about how sure they are."""

    categories: tuple[str, ...]
    stated: tuple[str, ...] = ()
    resample_confidence: float | None = None
    detection_f1: float | None = None
    intruder_accuracy: float | None = None


def error_guess(s: Signals) -> float:
    """A rough probability that the feature's label is wrong: judges that disagree on
    its category, a classifier that changes its answer on resampled examples (``label
    --resamples``), a judge unsure of itself, an explanation that predicts the
    activations poorly (detection F1) or windows that share nothing (intruder)."""
    guess = 0.05
    if len(set(s.categories)) > 1:
        guess += 0.5
    if s.resample_confidence is not None:
        guess += 0.4 * (1.0 - s.resample_confidence)
    guess += max((STATED.get(c, 0.1) for c in s.stated), default=0.0)
    guess += 0.2 * (1.0 - (s.detection_f1 if s.detection_f1 is not None else 0.5))
    if s.intruder_accuracy is not None:
        guess += 0.1 * (1.0 - s.intruder_accuracy)
    return min(1.0, max(MIN_ERROR, guess))


def signals_of(store: LabelStore) -> dict[str, Signals]:
    """Each judge-labeled feature's signals, from its successful judgments."""
    rows = store.conn.execute(  # one JSON parse per row: a multi-path extract
        "SELECT feature_id, category, confidence, json_extract(payload, '$.detection.f1', "
        "'$.resamples.confidence', '$.intruder.accuracy') FROM judgments "
        "WHERE status = 'ok' AND category IS NOT NULL ORDER BY feature_id, judge"
    )
    parts: dict[str, list[tuple[str, str | None, float | None, float | None, float | None]]]
    parts = {}
    for fid, category, stated, extracted in rows:
        f1, resampled, intruder = json.loads(extracted)
        parts.setdefault(str(fid), []).append((category, stated, f1, resampled, intruder))
    out = {}
    for fid, judged in parts.items():
        resampled = [r[3] for r in judged if r[3] is not None]
        f1s = [r[2] for r in judged if r[2] is not None]
        intruders = [r[4] for r in judged if r[4] is not None]
        out[fid] = Signals(
            categories=tuple(r[0] for r in judged),
            stated=tuple(r[1] for r in judged if r[1]),
            resample_confidence=min(resampled) if resampled else None,
            detection_f1=max(f1s) if f1s else None,
            intruder_accuracy=max(intruders) if intruders else None,
        )
    return out


def sizes(signals: dict[str, Signals], weighting: Weighting) -> dict[str, float]:
    """Each frame feature's size (relative inclusion probability)."""
    if weighting == "uniform":
        return dict.fromkeys(signals, 1.0)
    raw = {fid: math.sqrt(error_guess(s)) for fid, s in signals.items()}
    mean = sum(raw.values()) / max(len(raw), 1)
    return {fid: (1 - DEFENSIVE_SHARE) * v + DEFENSIVE_SHARE * mean for fid, v in raw.items()}


def frame_hash(feature_ids: Iterable[str]) -> str:
    """The identity of a frame: what an audit's probabilities are relative to."""
    digest = hashlib.sha256()
    for fid in sorted(feature_ids):
        digest.update(fid.encode() + b"\n")
    return digest.hexdigest()[:16]


def draw_order(feature_ids: list[str], size: npt.NDArray[np.float64], seed: int) -> list[int]:
    """Indices into ``feature_ids`` (sorted first, so a seed draws the same features
    whatever order they came in) in sequential Poisson order."""
    order = np.argsort(np.array(feature_ids), kind="stable")
    u = np.random.default_rng(seed).random(len(feature_ids))
    keys = np.empty(len(feature_ids))
    keys[order] = u / size[order]
    return [int(i) for i in np.argsort(keys, kind="stable")]


def inclusion_probabilities(size: npt.NDArray[np.float64], m: int) -> npt.NDArray[np.float64]:
    """``min(1, c * size)`` summing to ``m`` (the largest sizes capped at 1 in turn)."""
    n = len(size)
    if m <= 0 or n == 0:
        return np.zeros(n)
    if m >= n:
        return np.ones(n)
    pi = np.zeros(n)
    capped = np.zeros(n, dtype=bool)
    while True:
        free = ~capped
        c = (m - capped.sum()) / size[free].sum()
        pi[free] = c * size[free]
        over = free & (pi >= 1.0)
        if not over.any():
            break
        capped |= over
        pi[capped] = 1.0
    return np.clip(pi, 0.0, 1.0)


@dataclass(frozen=True)
class Drawn:
    audit_id: int
    feature_ids: list[str]
    n_frame: int
    already_decided: int


def draw_audit(
    store: LabelStore,
    n: int,
    seed: int,
    weighting: Weighting = "uncertainty",
    decided: set[str] | None = None,
    signals: dict[str, Signals] | None = None,
) -> Drawn:
    """Draw ``n`` judge-labeled features for people to decide, and store the audit with
    every frame feature's size (a later audit adds to it: ``labeler.audit.estimate``).
    ``signals``: :func:`signals_of` the store, read once by a caller drawing many."""
    signals = signals if signals is not None else signals_of(store)
    if not signals:
        raise ValueError("no feature has a judge's label to audit")
    size_of = sizes(signals, weighting)
    fids = list(size_of)
    size = np.array([size_of[f] for f in fids], dtype=np.float64)
    order = draw_order(fids, size, seed)[: min(n, len(fids))]
    position = {fids[i]: k + 1 for k, i in enumerate(order)}
    audit = AuditRow(
        audit_id=0, n_drawn=len(order), seed=seed, weighting=weighting, n_frame=len(fids),
        frame_hash=frame_hash(fids), source="drawn",
        made_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    )  # fmt: skip
    audit_id = store.audits.add(audit, ((f, size_of[f], position.get(f), None) for f in fids))
    chosen = [fids[i] for i in order]
    return Drawn(audit_id, chosen, len(fids), sum(f in (decided or set()) for f in chosen))


@dataclass(frozen=True)
class NewAudit:
    drawn: Drawn
    seed: int
    unlabeled: int
    """planned features no judge has labeled yet (outside the audit's frame)"""


def new_audit(
    store: LabelStore, n: int, seed: int | None = None, weighting: Weighting = "uncertainty"
) -> NewAudit:
    """:func:`draw_audit` as ``labeler audit`` draws: the seed by default the number of
    audits the run has (each new audit draws anew; a copy of the run draws the same);
    an audit that would repeat an earlier one, or of a run without labels, refused."""
    from labeler.audit.estimate import labeled_population
    from labeler.errors import UserError

    folder = store.path.parent
    if weighting not in WEIGHTINGS:
        raise UserError(f"weighting {weighting!r}: choose one of {', '.join(WEIGHTINGS)}")
    if n < 1:
        raise UserError(f"n: {n}: draw at least one feature")
    earlier = store.audits.all()
    chosen = len(earlier) if seed is None else seed
    population = labeled_population(store)
    if not population:
        raise UserError(f"{folder}: no feature has a judge's label yet; run `labeler label "
                        f"{folder}` first")  # fmt: skip
    current = frame_hash(population)
    for a in earlier:
        if (a.source, a.seed, a.weighting, a.frame_hash) == ("drawn", chosen, weighting, current):
            raise UserError(
                f"audit {a.audit_id} was drawn with --seed {chosen} and --weighting "
                f"{weighting} from these same features: it would draw the same ones again; "
                "choose another --seed"
            )
    decided = {r.feature_id for r in store.reviews() if r.action == "decide"}
    drawn = draw_audit(store, n, chosen, weighting, decided)
    return NewAudit(drawn, chosen, len(store.planned()) - len(population))
