"""Inter-rater agreement on nominal labels: Cohen's kappa, Krippendorff's alpha, raw agreement.

A *unit* is a feature, a *rater* a judge or a human reviewer, a *value* the category the rater
gave the unit. The array functions take integer category codes with ``-1`` meaning "not
rated"; :func:`agreement` takes the long table of labels and encodes it.

Degenerate cases are resolved the same way throughout: a statistic with nothing to compare
is ``None``; a chance-corrected statistic whose expected agreement is perfect (every value
the same single category) is ``1.0``, since there is then no disagreement to correct for.

Every figure carries its ``n``, the number of units it compares (for a pair, the units both
rated; for all raters, the units rated at least twice), and ``small_sample`` when that is
below :data:`SMALL_N` (30): a kappa of 1.0 over one feature says nothing, and over fewer
than 30 the sampling error of any of these figures is too large to rely on.
"""

from __future__ import annotations

from itertools import combinations

import numpy as np
import numpy.typing as npt
import polars as pl
from pydantic import BaseModel, ConfigDict, Field, model_validator

MISSING = -1
"""The code for "this rater did not rate this unit"."""

IntArray = npt.NDArray[np.int64]

SMALL_N = 30
"""Below this many units compared, a figure is flagged as resting on too few."""

_DENSE_LIMIT = 1 << 16
"""Codes below this index count arrays directly; larger ones are renumbered first."""


class PairAgreement(BaseModel):
    """Agreement between two raters over the units both rated."""

    model_config = ConfigDict(extra="forbid")

    rater_a: str
    rater_b: str
    n: int = Field(description="units rated by both: what kappa and percent compare")
    kappa: float | None = Field(description="Cohen's kappa; None when n is 0")
    percent: float | None = Field(description="share of common units with equal labels")
    small_sample: bool = Field(
        False, description=f"n is below {SMALL_N}: too few units to rely on (set from n)"
    )

    @model_validator(mode="after")
    def _flag_small(self) -> PairAgreement:
        self.small_sample = self.n < SMALL_N
        return self


class AgreementReport(BaseModel):
    """Agreement among all raters of a set of labels."""

    model_config = ConfigDict(extra="forbid")

    raters: list[str] = Field(description="in order of first appearance in the labels")
    n_units: int = Field(description="units rated by at least one rater")
    n_compared: int = Field(
        description="units rated at least twice: what alpha and percent compare"
    )
    pairs: list[PairAgreement] = Field(description="every unordered pair of raters")
    alpha: float | None = Field(
        description="Krippendorff's nominal alpha; None when no unit has two ratings"
    )
    percent: float | None = Field(
        description="mean over units rated at least twice of the share of agreeing rater pairs"
    )
    small_sample: bool = Field(
        False,
        description=f"n_compared is below {SMALL_N}: too few units to rely on (set from it)",
    )

    @model_validator(mode="after")
    def _flag_small(self) -> AgreementReport:
        self.small_sample = self.n_compared < SMALL_N
        return self


def _codes(x: npt.ArrayLike, ndim: int, name: str) -> IntArray:
    arr = np.asarray(x)
    if arr.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-dimensional, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must hold integer category codes, got dtype {arr.dtype}")
    out = arr.astype(np.int64, copy=False)
    if out.size and int(out.min()) < MISSING:
        raise ValueError(f"{name} holds a code below {MISSING} (the code for not rated)")
    return out


def _pair(a: npt.ArrayLike, b: npt.ArrayLike) -> tuple[IntArray, IntArray]:
    """The codes of the units both raters rated."""
    ca, cb = _codes(a, 1, "a"), _codes(b, 1, "b")
    if ca.shape != cb.shape:
        raise ValueError(f"a and b differ in length: {ca.shape[0]} and {cb.shape[0]}")
    both = (ca != MISSING) & (cb != MISSING)
    return ca[both], cb[both]


def _dense(codes: IntArray) -> IntArray:
    """Non-negative codes as small column indices: as they are, or renumbered if sparse."""
    if codes.size == 0 or int(codes.max()) < _DENSE_LIMIT:
        return codes
    return np.unique(codes, return_inverse=True)[1].astype(np.int64, copy=False)


def cohen_kappa(a: npt.ArrayLike, b: npt.ArrayLike) -> float | None:
    """Cohen's kappa between two raters, over the units both rated.

    ``a`` and ``b`` are integer category codes per unit, ``-1`` where that rater gave none.
    Returns None when no unit was rated by both. When expected agreement is 1 (both raters
    used one and the same category everywhere) kappa is 0/0; this returns 1.0 if observed
    agreement is also 1, else 0.0. (The two raters then agree on every unit, so in practice
    it is 1.0: perfect agreement is not penalised for lacking variety.)
    """
    ca, cb = _pair(a, b)
    n = int(ca.shape[0])
    if n == 0:
        return None
    inverse = _dense(np.concatenate([ca, cb]))
    k = int(inverse.max()) + 1
    count_a = np.bincount(inverse[:n], minlength=k)
    count_b = np.bincount(inverse[n:], minlength=k)
    agree = int(np.count_nonzero(ca == cb))
    # Exact integer arithmetic: kappa = (n·agree − Σ a_c b_c) / (n² − Σ a_c b_c).
    chance = int(np.dot(count_a, count_b))
    if chance == n * n:
        return 1.0 if agree == n else 0.0
    return (n * agree - chance) / (n * n - chance)


def percent_agreement(a: npt.ArrayLike, b: npt.ArrayLike) -> float | None:
    """Share of the units both raters rated on which they agree; None when there are none."""
    ca, cb = _pair(a, b)
    if ca.shape[0] == 0:
        return None
    return float(np.count_nonzero(ca == cb)) / float(ca.shape[0])


def _value_counts(ratings: IntArray) -> IntArray:
    """Counts matrix, units × categories: how many raters gave each unit each value.

    Categories are in code order; unused codes may leave empty columns.
    """
    n_units = ratings.shape[0]
    rated = ratings != MISSING
    unit_of = np.broadcast_to(np.arange(n_units)[:, None], ratings.shape)[rated]
    cat_of = _dense(ratings[rated])
    if cat_of.size == 0:
        return np.zeros((n_units, 0), dtype=np.int64)
    k = int(cat_of.max()) + 1
    flat = np.bincount(unit_of * k + cat_of, minlength=n_units * k)
    return flat.reshape(n_units, k).astype(np.int64, copy=False)


def krippendorff_alpha_nominal(ratings: npt.ArrayLike) -> float | None:
    """Krippendorff's alpha for nominal data, any number of raters, missing values allowed.

    ``ratings`` has shape (n_units, n_raters) of integer codes, ``-1`` where missing. Units
    with fewer than two ratings are not pairable and are ignored. With N the counts matrix
    (units × categories) and m_u the ratings of unit u, the coincidence matrix is
    O = Σ_u (n_u n_uᵀ − diag(n_u)) / (m_u − 1), its marginals n_c, n = Σ n_c, and
    alpha = 1 − (n − 1) Σ_{c≠k} O_ck / Σ_{c≠k} n_c n_k.

    Returns None when no unit is pairable. When the pairable values are all one category the
    expected disagreement is 0 and alpha is 0/0 (Krippendorff leaves it undefined); since
    the observed disagreement is then 0 too, this returns 1.0.
    """
    counts = _value_counts(_codes(ratings, 2, "ratings"))
    m = counts.sum(axis=1)
    pairable = m >= 2
    if not pairable.any():
        return None
    counts = counts[pairable]
    weights = 1.0 / (m[pairable] - 1)
    weighted = counts * weights[:, None]
    coincidence = weighted.T @ counts - np.diag(weighted.sum(axis=0))
    observed = float(coincidence.sum() - np.trace(coincidence))
    # Each pairable value adds exactly 1 to O's marginals, so they equal the value counts;
    # taking them from the integer counts keeps the single-category test exact.
    marginals = counts.sum(axis=0)
    n = int(marginals.sum())
    expected = n * n - int(np.dot(marginals, marginals))
    if expected == 0:
        return 1.0
    return 1.0 - (n - 1) * observed / expected


def unit_percent_agreement(ratings: npt.ArrayLike) -> float | None:
    """Mean over units rated at least twice of the share of rater pairs that agree.

    None when no unit has two ratings.
    """
    counts = _value_counts(_codes(ratings, 2, "ratings"))
    m = counts.sum(axis=1)
    pairable = m >= 2
    if not pairable.any():
        return None
    agreeing = (counts[pairable] * (counts[pairable] - 1)).sum(axis=1)
    mp = m[pairable]
    return float(np.mean(agreeing / (mp * (mp - 1))))


def _index(column: pl.Series, keys: pl.Series) -> npt.NDArray[np.int64]:
    """The position in ``keys`` of every value of ``column`` (all are present)."""
    positions = pl.int_range(keys.len(), eager=True, dtype=pl.Int64)
    found = column.replace_strict(keys, positions, return_dtype=pl.Int64)
    return found.to_numpy().astype(np.int64, copy=False)


def _ratings_matrix(labels: pl.DataFrame) -> tuple[list[str], int, IntArray]:
    """Raters in first-seen order, the number of units, and the units × raters code matrix."""
    absent = {"feature_id", "rater", "category"} - set(labels.columns)
    if absent:
        raise ValueError(
            f"labels lack column(s) {sorted(absent)}; need feature_id, rater, category"
        )
    table = labels.select(
        pl.col("feature_id").cast(pl.String),
        pl.col("rater").cast(pl.String),
        pl.col("category").cast(pl.String),
    )
    for column in table.columns:
        nulls = table[column].null_count()
        if nulls:
            raise ValueError(f"labels have {nulls} null {column} value(s)")
    raters = table["rater"].unique(maintain_order=True)
    units = table["feature_id"].unique(maintain_order=True)
    categories = table["category"].unique().sort()
    rater_of = _index(table["rater"], raters)
    unit_of = _index(table["feature_id"], units)
    cell = unit_of * raters.len() + rater_of
    times = np.bincount(cell, minlength=units.len() * raters.len())
    if times.max(initial=0) > 1:
        duplicated = np.flatnonzero(times > 1)
        unit, rater = divmod(int(duplicated[0]), raters.len())
        raise ValueError(
            f"{duplicated.size} duplicate (feature_id, rater) pair(s), the first: feature "
            f"{units[unit]!r} rated {int(times[duplicated[0]])} times by {raters[rater]!r}"
        )
    matrix = np.full((units.len(), raters.len()), MISSING, dtype=np.int64)
    matrix[unit_of, rater_of] = _index(table["category"], categories)
    return raters.to_list(), units.len(), matrix


def agreement(labels: pl.DataFrame) -> AgreementReport:
    """Agreement among the raters of a long table of labels.

    ``labels`` has one row per (feature_id, rater) with the category that rater gave; any
    other columns are ignored. Categories are compared as strings, whatever they are.
    Raises ValueError for a missing column, a null, or a (feature_id, rater) given twice.
    """
    raters, n_units, matrix = _ratings_matrix(labels)
    pairs = [
        PairAgreement(
            rater_a=raters[i],
            rater_b=raters[j],
            n=int(np.count_nonzero((matrix[:, i] != MISSING) & (matrix[:, j] != MISSING))),
            kappa=cohen_kappa(matrix[:, i], matrix[:, j]),
            percent=percent_agreement(matrix[:, i], matrix[:, j]),
        )
        for i, j in combinations(range(len(raters)), 2)
    ]
    return AgreementReport(
        raters=raters,
        n_units=n_units,
        n_compared=int(np.count_nonzero((matrix != MISSING).sum(axis=1) >= 2)),
        pairs=pairs,
        alpha=krippendorff_alpha_nominal(matrix),
        percent=unit_percent_agreement(matrix),
    )
