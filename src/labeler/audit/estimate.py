"""Shares corrected by a human audit: prediction-powered inference.

The judges label every planned feature; people decide a probability sample of them
(``labeler.audit.design``). Prediction-powered inference (Angelopoulos et al., Science
2023) estimates a share from the judges' labels ``Ŷ`` plus the audited features' errors
``Y - Ŷ``, each weighted by the inverse of its inclusion probability ``π`` (Zrnic and
Candès, "Active Statistical Inference", ICML 2024, for samples drawn with unequal
probabilities; in survey sampling this is the difference estimator, Särndal, Swensson
and Wretman 1992, §6.3). Per labeled feature::

    z_i = Ŷ_i + (audited_i / π_i) (Y_i - Ŷ_i)

Each ``z_i`` has mean ``Y_i`` over the audit's draw, whatever the judges got wrong, so
the stratified mean of ``z`` (each layer weighted by its alive features, as the judges'
estimate is) is unbiased for the share. It is the judges' share plus the share they
missed minus the share they gave wrongly; the 95% interval combines the three parts'
intervals (:func:`audited_share`), so it includes the judges' error. Where the judges
are right it is little wider than the judges-only one; the more they err, the wider.

Several audits are combined by averaging their corrections, each weighted by the
number of its features used (fixed before anyone reviews), so a second audit only adds.
An audit is used over the features people decided in its draw order up to the first
undecided one: that prefix is itself a sample with known probabilities (``design``). An
audit whose frame is no longer the set of labeled features (features labeled since) is
left out and named, since features outside its frame had no chance to be drawn.

The judges' precision and recall for a label are ratio estimates over the audited
features, with linearised variances (Särndal et al. §5.6) under Poisson sampling.
Calibration of the resampled confidence (``label --resamples``) is the expected
calibration error over ten bins (Naeini, Cooper and Hauskrecht, AAAI 2015; Guo et al.,
ICML 2017), each audited feature weighted by the features it stands for.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, Field

from labeler.audit.design import frame_hash, inclusion_probabilities
from labeler.judges.scorers import wilson_bounds
from labeler.labeling.store import AuditRow, LabelStore

N_BINS = 10
FloatArray = npt.NDArray[np.float64]


class AuditUse(BaseModel):
    """One audit as the estimate used it."""

    audit_id: int
    source: str = Field(description="'drawn', or the gold file its decisions came from")
    weighting: str
    n_drawn: int
    n_used: int = Field(description="decided features in draw order up to the first undecided")
    used: bool
    note: str | None = Field(None, description="why it is left out, or what is pending")


@dataclass(frozen=True)
class Sample:
    """The audited features the estimate uses: their positions in the population,
    inclusion probabilities and audit weights (an audit's share of the features used)."""

    index: npt.NDArray[np.int64]
    pi: FloatArray
    weight: FloatArray

    @property
    def size(self) -> int:
        return len(np.unique(self.index))


def labeled_population(store: LabelStore) -> list[str]:
    """The features some judge labeled (what audits are drawn from and estimates are
    of), in layer and index order."""
    rows = store.conn.execute(
        "SELECT feature_id FROM planned WHERE feature_id IN (SELECT feature_id FROM "
        "judgments WHERE status = 'ok' AND category IS NOT NULL) ORDER BY layer, idx"
    )
    return [str(fid) for (fid,) in rows]


@dataclass(frozen=True)
class Prefix:
    """The features of one audit that an estimate can use, with their inclusion
    probabilities: a drawn audit's decided features in draw order up to the first
    undecided one; an imported audit's decided features."""

    audit: AuditRow
    features: list[str]
    pi: list[float]
    pending: int = 0


def audit_prefixes(store: LabelStore, decided: set[str]) -> list[Prefix]:
    """Every audit's usable features, given the features people have decided."""
    out = []
    for audit in store.audits.all():
        rows = store.audits.frame(audit.audit_id)
        if audit.source == "drawn":
            drawn = sorted((p, f) for f, _, p, _ in rows if p is not None)
            prefix: list[str] = []
            for _, fid in drawn:
                if fid not in decided:
                    break
                prefix.append(fid)
            size = np.array([s or 0.0 for _, s, _, _ in rows], dtype=np.float64)
            pi_all = inclusion_probabilities(size, len(prefix))
            pi_of = dict(zip((f for f, _, _, _ in rows), pi_all.tolist(), strict=True))
            pis = [pi_of[f] for f in prefix]
            out.append(Prefix(audit, prefix, pis, len(drawn) - len(prefix)))
        else:
            kept = [(f, q) for f, _, _, q in rows if q is not None and f in decided]
            out.append(Prefix(audit, [f for f, _ in kept], [q for _, q in kept]))
    return out


def audit_sample(
    store: LabelStore, population: list[str], decided: set[str]
) -> tuple[Sample, list[AuditUse]]:
    """The usable audits' decided prefixes over ``population`` (the judge-labeled
    features, in the order the estimate's arrays follow)."""
    position = {fid: i for i, fid in enumerate(population)}
    current = frame_hash(population)
    parts: list[tuple[list[int], FloatArray, int]] = []
    uses: list[AuditUse] = []
    for prefix in audit_prefixes(store, decided):
        audit = prefix.audit
        base = {"audit_id": audit.audit_id, "source": audit.source,
                "weighting": audit.weighting, "n_drawn": audit.n_drawn}  # fmt: skip
        if audit.frame_hash != current:
            uses.append(AuditUse(**base, n_used=0, used=False, note=(
                f"drawn from {audit.n_frame:,} labeled features; {len(population):,} are "
                "labeled now: run `labeler audit` again")))  # fmt: skip
            continue
        note = (
            f"{prefix.pending} drawn features wait for a decision (the first undecided one "
            "stops the audit's use)" if prefix.pending else None
        )  # fmt: skip
        m = len(prefix.features)
        uses.append(AuditUse(**base, n_used=m, used=bool(m), note=note))
        if m:
            pis = np.array(prefix.pi, dtype=np.float64)
            parts.append(([position[f] for f in prefix.features], pis, m))
    total = sum(m for _, _, m in parts)
    index = np.array([i for idx, _, _ in parts for i in idx], dtype=np.int64)
    pi = np.concatenate([p for _, p, _ in parts]) if parts else np.zeros(0)
    weight = np.concatenate([np.full(m, m / total) for _, _, m in parts]) if parts else np.zeros(0)
    return Sample(index, pi, weight), uses


class AuditedShare(BaseModel):
    """A share estimated from the judges' labels corrected by the audit."""

    share: float
    ci_low: float
    ci_high: float
    std_error: float
    judges_share: float = Field(description="the same estimator on the judges' labels alone")


def pseudo_outcomes(yhat: FloatArray, y: FloatArray, sample: Sample) -> FloatArray:
    """``z``: the judges' label plus each audited feature's weighted error (``y`` is
    read only at the sample's positions)."""
    z = yhat.astype(np.float64).copy()
    if len(sample.index):
        error = y[sample.index] - yhat[sample.index]
        np.add.at(z, sample.index, sample.weight * error / sample.pi)
    return z


def stratified_mean(
    z: FloatArray, layers: npt.NDArray[np.int64], alive: dict[int, int]
) -> tuple[float, float]:
    """The layer-weighted mean of ``z`` and its standard error (no finite-population
    correction, as the judges' estimate in ``reporting.summarize``)."""
    present = [h for h in np.unique(layers).tolist() if alive.get(h, 0) > 0]
    total = sum(alive[h] for h in present)
    mean = variance = 0.0
    for h in present:
        part = z[layers == h]
        weight = alive[h] / total
        mean += weight * float(part.mean())
        n_h = len(part)
        spread = float(part.var(ddof=1)) if n_h > 1 else 0.25
        variance += weight * weight * spread / n_h
    return mean, math.sqrt(variance)


def plan_weights(layers: npt.NDArray[np.int64], alive: dict[int, int]) -> FloatArray:
    """Each labeled feature's share of the population: its layer's share of the alive
    features over the layer's labeled ones (0 in a layer without alive features)."""
    present = [h for h in np.unique(layers).tolist() if alive.get(h, 0) > 0]
    total = sum(alive[h] for h in present)
    out = np.zeros(len(layers))
    for h in present:
        mask = layers == h
        out[mask] = alive[h] / total / mask.sum()
    return out


@dataclass(frozen=True)
class Rate:
    """A population rate estimated from the audit, with its Wilson interval."""

    value: float
    low: float
    high: float


def error_rate(errors: FloatArray, sample: Sample, plan_weight: FloatArray) -> Rate:
    """The share of the population with an error of one kind (``errors`` is 0/1 at the
    sample's positions): Horvitz-Thompson under Poisson sampling, with a Wilson interval
    at an effective sample size in the manner of Korn and Graubard (Survey Methodology,
    1998): the binomial size with the estimate's variance where errors were seen, and
    Kish's effective size of the weights where none was (no error among 25 audited
    features still leaves room for some among the features nobody looked at)."""
    g = plan_weight[sample.index] * sample.weight / sample.pi
    e = errors[sample.index]
    rate = float((g * e).sum())
    kish = float(g.sum() ** 2 / (g * g).sum()) if len(g) and (g * g).sum() > 0 else 0.0
    if kish == 0.0:
        return Rate(rate, 0.0, 1.0)
    variance = float(((1.0 - sample.pi) * (g * e) ** 2).sum())
    clipped = min(max(rate, 0.0), 1.0)
    effective = kish
    if variance > 0 and 0.0 < clipped < 1.0:
        effective = clipped * (1 - clipped) / variance
    low, high = wilson_bounds(clipped, max(effective, 1.0))
    return Rate(rate, low, high)


def audited_share(
    yhat: FloatArray, y: FloatArray, sample: Sample, layers: npt.NDArray[np.int64],
    alive: dict[int, int],
) -> AuditedShare:  # fmt: skip
    """The prediction-powered share ``judges' share + missed - false`` and its 95%
    interval, built by the method of variance estimates recovery (MOVER; Zou and Donner,
    Statistics in Medicine 2008; Newcombe 1998 for a difference of proportions) from
    three intervals: the judges' share's (Wilson at its effective size, as
    ``reporting.summarize``), and the Wilson intervals of the share the judges missed
    (``Y = 1, Ŷ = 0``) and of the share they wrongly gave (``Y = 0, Ŷ = 1``). A plain
    normal interval around the same estimate undercovers badly when errors are rare
    and the audit small: no error drawn means no variance seen."""
    z = pseudo_outcomes(yhat, y, sample)
    share, se = stratified_mean(z, layers, alive)
    judged, judged_se = stratified_mean(yhat.astype(np.float64), layers, alive)
    has_spread = judged_se > 0 and 0.0 < judged < 1.0
    effective = judged * (1 - judged) / judged_se**2 if has_spread else float(len(yhat))
    j_low, j_high = wilson_bounds(judged, max(effective, 1.0))
    weights = plan_weights(layers, alive)
    missed = error_rate(((y == 1) & (yhat == 0)).astype(np.float64), sample, weights)
    wrong = error_rate(((y == 0) & (yhat == 1)).astype(np.float64), sample, weights)
    below = math.sqrt(
        (judged - j_low) ** 2 + (missed.value - missed.low) ** 2 + (wrong.high - wrong.value) ** 2
    )
    above = math.sqrt(
        (j_high - judged) ** 2 + (missed.high - missed.value) ** 2 + (wrong.value - wrong.low) ** 2
    )
    return AuditedShare(
        share=share,
        ci_low=max(0.0, share - below),
        ci_high=min(1.0, share + above),
        std_error=se,
        judges_share=judged,
    )


class Ratio(BaseModel):
    """A ratio over the population (precision or recall), estimated from the audit."""

    value: float | None
    ci_low: float | None
    ci_high: float | None
    n: int = Field(description="audited features in the denominator")


def ratio(
    numerator: FloatArray, denominator: FloatArray, sample: Sample, plan_weight: FloatArray
) -> Ratio:
    """``sum(g a) / sum(g b)`` over the sample (``g`` = plan weight x audit weight / π),
    with a Wilson interval at the effective size of its linearised variance."""
    at = sample.index
    g = plan_weight[at] * sample.weight / sample.pi
    a, b = numerator[at], denominator[at]
    n = int(np.count_nonzero(b))
    total_b = float((g * b).sum())
    if n == 0 or total_b <= 0:
        return Ratio(value=None, ci_low=None, ci_high=None, n=n)
    r = float((g * a).sum()) / total_b
    d = (a - r * b) / total_b
    variance = float(((1.0 - sample.pi) * (g * d) ** 2).sum())
    effective = r * (1 - r) / variance if variance > 0 and 0 < r < 1 else float(n)
    low, high = wilson_bounds(r, max(effective, 1.0))
    return Ratio(value=r, ci_low=low, ci_high=high, n=n)


class ReliabilityBin(BaseModel):
    low: float
    high: float
    n: int
    confidence: float = Field(description="mean confidence in the bin (weighted)")
    accuracy: float = Field(description="share the people agreed with (weighted)")


class Calibration(BaseModel):
    """How well a judge's resampled confidence predicts that people agree with it."""

    judge: str
    n: int = Field(description="audited features with a resampled confidence")
    ece: float | None = Field(description="expected calibration error over ten bins")
    bins: list[ReliabilityBin]


def calibration(
    judge: str, confidence: FloatArray, correct: FloatArray, sample: Sample,
    plan_weight: FloatArray,
) -> Calibration:  # fmt: skip
    """``confidence`` NaN where the judge has none; ``correct`` 1 where people agreed."""
    at = sample.index
    g = plan_weight[at] * sample.weight / sample.pi
    conf, ok = confidence[at], correct[at]
    keep = ~np.isnan(conf)
    conf, ok, g = conf[keep], ok[keep], g[keep]
    if not len(conf):
        return Calibration(judge=judge, n=0, ece=None, bins=[])
    bins = []
    ece = 0.0
    edges = np.linspace(0.0, 1.0, N_BINS + 1)
    which = np.minimum((conf * N_BINS).astype(int), N_BINS - 1)
    for b in range(N_BINS):
        mask = which == b
        if not mask.any():
            continue
        w = g[mask]
        mean_conf = float((w * conf[mask]).sum() / w.sum())
        accuracy = float((w * ok[mask]).sum() / w.sum())
        ece += float(w.sum() / g.sum()) * abs(accuracy - mean_conf)
        bins.append(
            ReliabilityBin(
                low=float(edges[b]),
                high=float(edges[b + 1]),
                n=int(mask.sum()),
                confidence=mean_conf,
                accuracy=accuracy,
            )
        )
    return Calibration(judge=judge, n=len(conf), ece=ece, bins=bins)
