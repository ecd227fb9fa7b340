"""Inter-rater agreement: published worked examples, textbook identities, and the polars entry."""

from __future__ import annotations

from fractions import Fraction
from itertools import permutations
from pathlib import Path

import numpy as np
import numpy.typing as npt
import polars as pl
import pytest

from labeler.reporting.agreement import (
    MISSING,
    SMALL_N,
    AgreementReport,
    PairAgreement,
    agreement,
    cohen_kappa,
    krippendorff_alpha_nominal,
    percent_agreement,
    unit_percent_agreement,
)
from labeler.reporting.agreement_plot import agreement_figure, heatmap_cells, plot_agreement

M = MISSING
IntArray = npt.NDArray[np.int64]

# Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability", section C: 4 observers
# A-D (rows) × 12 units (columns), values 1-5, missing cells. Nominal alpha = 0.743.
KRIPPENDORFF_2011 = np.array(
    [
        [1, 2, 3, 3, 2, 1, 4, 1, 2, M, M, M],
        [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, M, 3],
        [M, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, M],
        [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, M],
    ]
).T  # units × raters


# --- independent references, written from the definitions with plain loops -------------


def reference_kappa(a: list[int], b: list[int]) -> float:
    """Cohen (1960): (p_o - p_e) / (1 - p_e) over units both rated."""
    pairs = [(x, y) for x, y in zip(a, b, strict=True) if x != M and y != M]
    n = len(pairs)
    p_o = sum(x == y for x, y in pairs) / n
    cats = {x for x, _ in pairs} | {y for _, y in pairs}
    p_e = sum(
        (sum(x == c for x, _ in pairs) / n) * (sum(y == c for _, y in pairs) / n) for c in cats
    )
    return (p_o - p_e) / (1 - p_e)


def reference_alpha(ratings: IntArray) -> float:
    """Krippendorff's alpha as 1 - D_o / D_e over pairable values (nominal metric).

    D_o: mean within-unit disagreement, each unit's pairs weighted 1 / (m_u - 1);
    D_e: disagreement between all pairs of pairable values regardless of unit.
    """
    units = [[int(v) for v in row if v != M] for row in ratings]
    units = [u for u in units if len(u) >= 2]
    values = [v for u in units for v in u]
    n = len(values)
    d_o = (
        sum(
            sum(u[i] != u[j] for i in range(len(u)) for j in range(len(u)) if i != j) / (len(u) - 1)
            for u in units
        )
        / n
    )
    counts = {c: values.count(c) for c in set(values)}
    d_e = sum(counts[c] * counts[k] for c in counts for k in counts if c != k) / (n * (n - 1))
    return 1 - d_o / d_e


def scott_pi(a: IntArray, b: IntArray) -> float:
    """Scott (1955): chance agreement from the pooled distribution of both raters."""
    p_o = float(np.mean(a == b))
    pooled = np.concatenate([a, b])
    p_e = sum(float(np.mean(pooled == c)) ** 2 for c in np.unique(pooled))
    return (p_o - p_e) / (1 - p_e)


def correlated(rng: np.random.Generator, n: int, raters: int, k: int, p: float) -> IntArray:
    """Each rater copies a hidden true label with probability p, else guesses at random."""
    truth = rng.integers(0, k, n)
    guess = rng.integers(0, k, (n, raters))
    return np.where(rng.random((n, raters)) < p, truth[:, None], guess)


# --- Krippendorff's alpha -----------------------------------------------------------------


def test_alpha_reproduces_krippendorff_2011_worked_example() -> None:
    alpha = krippendorff_alpha_nominal(KRIPPENDORFF_2011)
    assert alpha is not None
    assert round(alpha, 3) == 0.743
    # The paper's own arithmetic: n = 40 pairable values, n_c = 9, 13, 10, 5, 3 and 8 of
    # the 40 coincidences off the diagonal, so alpha = 1 - 39 · 8 / (40² - Σ n_c²).
    exact = 1 - Fraction(39 * 8, 40**2 - (9**2 + 13**2 + 10**2 + 5**2 + 3**2))
    assert alpha == pytest.approx(float(exact), abs=1e-12)


def test_alpha_ignores_units_with_a_single_rating() -> None:
    full = krippendorff_alpha_nominal(KRIPPENDORFF_2011)
    # Unit 12 has one rating; dropping it, or adding more lone ratings, changes nothing.
    assert krippendorff_alpha_nominal(KRIPPENDORFF_2011[:11]) == pytest.approx(full)
    lone = np.array([[5, M, M, M], [M, M, 1, M], [M, M, M, M]])
    assert krippendorff_alpha_nominal(np.vstack([KRIPPENDORFF_2011, lone])) == pytest.approx(full)


def test_alpha_ignores_a_rater_who_rated_nothing() -> None:
    silent = np.full((KRIPPENDORFF_2011.shape[0], 1), M)
    with_silent = np.hstack([KRIPPENDORFF_2011, silent])
    assert krippendorff_alpha_nominal(with_silent) == pytest.approx(
        krippendorff_alpha_nominal(KRIPPENDORFF_2011)
    )


def test_alpha_matches_the_pairable_values_definition_on_random_data() -> None:
    rng = np.random.default_rng(7)
    for _ in range(50):
        n, raters, k = int(rng.integers(3, 40)), int(rng.integers(2, 6)), int(rng.integers(2, 6))
        ratings = correlated(rng, n, raters, k, p=float(rng.random()))
        ratings[rng.random(ratings.shape) < 0.3] = M
        alpha = krippendorff_alpha_nominal(ratings)
        pairable = [row[row != M] for row in ratings if np.count_nonzero(row != M) >= 2]
        if not pairable:
            assert alpha is None
        elif len(np.unique(np.concatenate(pairable))) == 1:
            assert alpha == 1.0
        else:
            assert alpha == pytest.approx(reference_alpha(ratings), abs=1e-12)


def test_alpha_is_invariant_to_category_names_and_rater_order() -> None:
    base = krippendorff_alpha_nominal(KRIPPENDORFF_2011)
    relabel = np.array([M, 99, 40, 7, 0, 12, 3])  # new code at index value + 1; -1 stays -1
    assert krippendorff_alpha_nominal(relabel[KRIPPENDORFF_2011 + 1]) == pytest.approx(base)
    for order in permutations(range(4)):
        assert krippendorff_alpha_nominal(KRIPPENDORFF_2011[:, order]) == pytest.approx(base)
    sparse = np.where(KRIPPENDORFF_2011 == M, M, KRIPPENDORFF_2011 * 1_000_003)
    assert krippendorff_alpha_nominal(sparse) == pytest.approx(base)


def test_alpha_with_two_raters_and_no_missing_data_is_scotts_pi_rescaled() -> None:
    # Two raters, N units, n = 2N values. Each disagreeing unit puts 2 coincidences off the
    # diagonal, so Σ_{c≠k} O_ck = n (1 - p_o); Σ_{c≠k} n_c n_k = n² (1 - p_e) with p_e
    # Scott's pooled chance agreement. Hence 1 - alpha = (n - 1) / n · (1 - pi).
    rng = np.random.default_rng(11)
    for n_units, k, p in [(10, 2, 0.5), (37, 3, 0.8), (500, 4, 0.3), (2000, 5, 0.0)]:
        ratings = correlated(rng, n_units, 2, k, p)
        n = 2 * n_units
        pi = scott_pi(ratings[:, 0], ratings[:, 1])
        alpha = krippendorff_alpha_nominal(ratings)
        assert alpha == pytest.approx(1 - (n - 1) / n * (1 - pi), abs=1e-12)


def test_alpha_degenerate_cases() -> None:
    assert krippendorff_alpha_nominal(np.array([[0, M], [M, 1]])) is None  # nothing pairable
    assert krippendorff_alpha_nominal(np.zeros((0, 3), dtype=np.int64)) is None
    assert krippendorff_alpha_nominal(np.array([[2, 2, M], [2, 2, 2]])) == 1.0  # one value
    assert krippendorff_alpha_nominal(np.array([[0, 0], [1, 1], [2, 2]])) == 1.0
    # Systematic disagreement: every unit split, alpha below zero.
    alpha = krippendorff_alpha_nominal(np.array([[0, 1], [1, 0], [0, 1], [1, 0]]))
    assert alpha is not None and alpha < 0


# --- Cohen's kappa and percent agreement ------------------------------------------------


def test_kappa_classic_two_by_two_table() -> None:
    # 20 yes/yes, 5 yes/no, 10 no/yes, 15 no/no: p_o = 0.7, p_e = 0.5·0.6 + 0.5·0.4 = 0.5.
    yes, no = 1, 0
    a = np.array([yes] * 20 + [yes] * 5 + [no] * 10 + [no] * 15)
    b = np.array([yes] * 20 + [no] * 5 + [yes] * 10 + [no] * 15)
    assert cohen_kappa(a, b) == pytest.approx(0.4, abs=1e-12)
    assert cohen_kappa(b, a) == pytest.approx(0.4, abs=1e-12)
    assert percent_agreement(a, b) == pytest.approx(0.7)


def test_kappa_matches_the_textbook_formula_on_random_data_with_missing() -> None:
    rng = np.random.default_rng(5)
    for _ in range(50):
        ratings = correlated(rng, int(rng.integers(5, 80)), 2, int(rng.integers(2, 5)), 0.6)
        ratings[rng.random(ratings.shape) < 0.25] = M
        a, b = ratings[:, 0], ratings[:, 1]
        both = (a != M) & (b != M)
        kappa = cohen_kappa(a, b)
        if not both.any():
            assert kappa is None
            continue
        if len(np.unique(np.concatenate([a[both], b[both]]))) == 1:
            assert kappa == 1.0
            continue
        assert kappa == pytest.approx(reference_kappa(a.tolist(), b.tolist()), abs=1e-12)


def test_missing_ratings_are_excluded_from_kappa_and_percent() -> None:
    a = np.array([0, 1, 2, 1, M, 0, 2, M])
    b = np.array([0, 1, 1, 1, 2, M, 2, M])
    both = np.array([0, 1, 2, 3, 6])
    assert cohen_kappa(a, b) == pytest.approx(cohen_kappa(a[both], b[both]))
    assert percent_agreement(a, b) == pytest.approx(4 / 5)
    # What a rater said on a unit the other skipped has no influence.
    a2 = a.copy()
    a2[5] = 2
    assert cohen_kappa(a2, b) == cohen_kappa(a, b)


def test_perfect_agreement_gives_one() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 300)
    ratings = np.stack([labels] * 3, axis=1)
    ratings[::7, 1] = M
    assert cohen_kappa(ratings[:, 0], ratings[:, 1]) == 1.0
    assert percent_agreement(ratings[:, 0], ratings[:, 1]) == 1.0
    assert krippendorff_alpha_nominal(ratings) == pytest.approx(1.0)
    assert unit_percent_agreement(ratings) == 1.0
    # Both raters using one category everywhere: expected agreement 1, documented as 1.0.
    assert cohen_kappa(np.full(10, 3), np.full(10, 3)) == 1.0


def test_kappa_and_percent_are_none_without_common_units() -> None:
    assert cohen_kappa(np.array([0, M]), np.array([M, 1])) is None
    assert percent_agreement(np.array([0, M]), np.array([M, 1])) is None
    assert cohen_kappa(np.array([], dtype=np.int64), np.array([], dtype=np.int64)) is None


def test_independent_random_raters_give_kappa_and_alpha_near_zero() -> None:
    rng = np.random.default_rng(2024)
    n = 229_376
    shares = [0.08, 0.5, 0.3, 0.12]  # reasoning, domain, language, uninterpretable
    ratings = np.stack([rng.choice(4, size=n, p=shares) for _ in range(4)], axis=1)
    ratings[rng.random(ratings.shape) < 0.2] = M
    # Standard error is about 1 / sqrt(n) ≈ 0.002 here.
    for i, j in [(0, 1), (0, 3), (2, 3)]:
        kappa = cohen_kappa(ratings[:, i], ratings[:, j])
        assert kappa is not None and abs(kappa) < 0.015
        # Raw agreement is not near zero: it is chance agreement, Σ p_c².
        assert percent_agreement(ratings[:, i], ratings[:, j]) == pytest.approx(
            sum(p * p for p in shares), abs=0.01
        )
    alpha = krippendorff_alpha_nominal(ratings)
    assert alpha is not None and abs(alpha) < 0.01


def test_agreeing_raters_are_far_from_zero() -> None:
    # The converse of the test above, so that one cannot pass by always returning 0.
    ratings = correlated(np.random.default_rng(3), 20_000, 3, 4, p=0.7)
    alpha = krippendorff_alpha_nominal(ratings)
    kappa = cohen_kappa(ratings[:, 0], ratings[:, 1])
    # Copying with p = 0.7 else guessing among 4: kappa ≈ p² = 0.49.
    assert alpha == pytest.approx(0.49, abs=0.03)
    assert kappa == pytest.approx(0.49, abs=0.03)


def test_unit_percent_agreement_counts_agreeing_pairs_per_unit() -> None:
    ratings = np.array([[0, 0, 0], [0, 1, 0], [1, 1, M], [2, M, M], [0, 1, 2]])
    # Units: 3/3 pairs, 1/3, 1/1, (not pairable), 0/3.
    assert unit_percent_agreement(ratings) == pytest.approx((1 + 1 / 3 + 1 + 0) / 4)
    assert unit_percent_agreement(np.array([[0, M], [M, 1]])) is None


@pytest.mark.parametrize(
    ("a", "b", "match"),
    [
        (np.array([0, 1]), np.array([0, 1, 2]), "differ in length"),
        (np.array([0.0, 1.0]), np.array([0, 1]), "integer"),
        (np.array([0, -2]), np.array([0, 1]), "below"),
        (np.array([[0, 1]]), np.array([[0, 1]]), "1-dimensional"),
    ],
)
def test_bad_codes_are_refused(a: IntArray, b: IntArray, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        cohen_kappa(a, b)


# --- the polars entry point ---------------------------------------------------------------

HEUR, GPT, ANA = "heuristic", "openai:gpt-5-mini", "human:ana"


def small_labels() -> pl.DataFrame:
    rows = [
        ("f1", GPT, "reasoning"),
        ("f1", HEUR, "reasoning"),
        ("f2", HEUR, "domain"),
        ("f1", ANA, "reasoning"),
        ("f2", GPT, "language"),
        ("f2", ANA, "domain"),
        ("f3", HEUR, "language"),
        ("f3", GPT, "language"),
        ("f4", HEUR, "uninterpretable"),
    ]
    return pl.DataFrame(rows, schema=["feature_id", "rater", "category"], orient="row")


def test_agreement_end_to_end_against_hand_computation() -> None:
    report = agreement(small_labels())
    assert report.raters == [GPT, HEUR, ANA]  # first seen, not sorted
    assert report.n_units == 4
    by_pair = {(p.rater_a, p.rater_b): p for p in report.pairs}
    assert set(by_pair) == {(GPT, HEUR), (GPT, ANA), (HEUR, ANA)}
    # GPT vs HEUR on f1-f3: agree on f1, f3. p_o = 2/3, p_e = (1·1 + 2·1) / 9 = 1/3 → kappa 1/2.
    assert by_pair[GPT, HEUR].n == 3
    assert by_pair[GPT, HEUR].percent == pytest.approx(2 / 3)
    assert by_pair[GPT, HEUR].kappa == pytest.approx(0.5)
    # GPT vs ANA on f1, f2: agree on f1. p_e = 1/4 → kappa (1/2 - 1/4) / (3/4) = 1/3.
    assert by_pair[GPT, ANA].n == 2
    assert by_pair[GPT, ANA].percent == pytest.approx(0.5)
    assert by_pair[GPT, ANA].kappa == pytest.approx(1 / 3)
    # HEUR vs ANA on f1, f2: agree on both.
    assert (by_pair[HEUR, ANA].n, by_pair[HEUR, ANA].percent, by_pair[HEUR, ANA].kappa) == (
        2,
        1.0,
        1.0,
    )
    # Pairable values: f1 R R R, f2 D L D, f3 L L; n = 8, n_c = 3, 2, 3; f2 puts
    # 2 · (2·1) / 2 = 2 coincidences off the diagonal: alpha = 1 - 7 · 2 / (64 - 22) = 2/3.
    assert report.alpha == pytest.approx(2 / 3)
    # Per unit share of agreeing pairs: f1 1, f2 1/3, f3 1; f4 has one rating.
    assert report.percent == pytest.approx(7 / 9)
    # What alpha and percent compare: f1-f3, not f4, which only the heuristic labeled.
    assert report.n_compared == 3
    assert report.small_sample and all(p.small_sample for p in report.pairs)


def test_figures_on_fewer_than_small_n_features_are_flagged() -> None:
    def labels(n: int) -> pl.DataFrame:
        rows = [(f"L0F{i}", rater, "reasoning" if i % 3 else "domain")
                for i in range(n) for rater in (GPT, HEUR)]  # fmt: skip
        rows.append(("L1F0", HEUR, "language"))  # rated once: counted in no figure
        return pl.DataFrame(rows, schema=["feature_id", "rater", "category"], orient="row")

    few, enough = agreement(labels(SMALL_N - 1)), agreement(labels(SMALL_N))
    assert SMALL_N == 30  # the documented threshold (docs/review.md)
    assert (few.n_units, few.n_compared, few.pairs[0].n) == (SMALL_N, SMALL_N - 1, SMALL_N - 1)
    assert few.small_sample and few.pairs[0].small_sample
    assert (enough.n_compared, enough.pairs[0].n) == (SMALL_N, SMALL_N)
    assert not enough.small_sample and not enough.pairs[0].small_sample
    # The flag follows n whatever a caller or a file says, and survives a round trip.
    assert PairAgreement(rater_a="a", rater_b="b", n=1, kappa=1.0, percent=1.0).small_sample
    stale = few.model_dump() | {"small_sample": False}
    assert AgreementReport.model_validate(stale).small_sample
    assert AgreementReport.model_validate_json(enough.model_dump_json()) == enough


def test_agreement_reproduces_krippendorff_2011_from_long_form() -> None:
    observers = ["A", "B", "C", "D"]
    rows = [
        (f"unit{u + 1}", observers[r], str(KRIPPENDORFF_2011[u, r]))
        for u in range(KRIPPENDORFF_2011.shape[0])
        for r in range(4)
        if KRIPPENDORFF_2011[u, r] != M
    ]
    labels = pl.DataFrame(rows, schema=["feature_id", "rater", "category"], orient="row")
    report = agreement(labels)
    assert report.raters == ["A", "B", "D", "C"]  # first seen: C skipped unit 1
    assert report.n_units == 12
    assert report.alpha is not None and round(report.alpha, 3) == 0.743
    assert len(report.pairs) == 6
    by_pair = {(p.rater_a, p.rater_b): p for p in report.pairs}
    # A and B both rated units 1-9 and agree on all but unit 6.
    assert by_pair["A", "B"].n == 9
    assert by_pair["A", "B"].percent == pytest.approx(8 / 9)


def test_agreement_refuses_a_duplicate_rating() -> None:
    labels = pl.concat(
        [
            small_labels(),
            pl.DataFrame({"feature_id": ["f2"], "rater": [ANA], "category": ["domain"]}),
        ]
    )
    with pytest.raises(ValueError, match=r"'f2'.*2 times.*'human:ana'"):
        agreement(labels)


def test_agreement_refuses_missing_columns_and_nulls() -> None:
    with pytest.raises(ValueError, match="category"):
        agreement(small_labels().drop("category"))
    with_null = small_labels().with_columns(
        pl.when(pl.col("feature_id") == "f3")
        .then(None)
        .otherwise(pl.col("category"))
        .alias("category")
    )
    with pytest.raises(ValueError, match="null category"):
        agreement(with_null)


def test_agreement_of_nothing_and_of_one_rater() -> None:
    empty = pl.DataFrame(
        schema={"feature_id": pl.String, "rater": pl.String, "category": pl.String}
    )
    assert agreement(empty) == AgreementReport(
        raters=[], n_units=0, n_compared=0, pairs=[], alpha=None, percent=None
    )
    alone = agreement(small_labels().filter(pl.col("rater") == HEUR))
    assert (alone.raters, alone.n_units, alone.pairs, alone.alpha) == ([HEUR], 4, [], None)


def test_agreement_at_full_scale_matches_the_arrays() -> None:
    rng = np.random.default_rng(1)
    n_units, raters = 229_376, ["heuristic", "openai:gpt-5-mini", "human:ana", "human:bo"]
    categories = np.array(["reasoning", "domain", "language", "uninterpretable"])
    ratings = correlated(rng, n_units, 4, 4, p=0.6)
    ratings[rng.random(ratings.shape) < 0.1] = M
    unit, rater = np.nonzero(ratings != M)
    order = rng.permutation(unit.size)
    labels = pl.DataFrame(
        {
            "feature_id": np.char.add("L", unit.astype(str))[order],
            "rater": np.array(raters)[rater][order],
            "category": categories[ratings[unit, rater]][order],
        }
    )
    report = agreement(labels)
    assert report.n_units == int(np.count_nonzero((ratings != M).any(axis=1)))
    assert report.alpha == pytest.approx(krippendorff_alpha_nominal(ratings), abs=1e-12)
    assert report.percent == pytest.approx(unit_percent_agreement(ratings), abs=1e-12)
    # Category codes in the report are alphabetical; kappa does not depend on the coding.
    first = {name: i for i, name in enumerate(report.raters)}
    for pair in report.pairs:
        a, b = ratings[:, raters.index(pair.rater_a)], ratings[:, raters.index(pair.rater_b)]
        assert first[pair.rater_a] < first[pair.rater_b]
        assert pair.kappa == pytest.approx(cohen_kappa(a, b), abs=1e-12)
        assert pair.n == int(np.count_nonzero((a != M) & (b != M)))


# --- the plot -----------------------------------------------------------------------------


def test_plot_agreement_writes_a_png(tmp_path: Path) -> None:
    import matplotlib.image

    report = agreement(small_labels())
    report.pairs.append(
        PairAgreement(rater_a=HEUR, rater_b="nobody", n=0, kappa=None, percent=None)
    )
    report.pairs.append(PairAgreement(rater_a=GPT, rater_b="many", n=960, kappa=0.8, percent=0.9))
    report.raters.extend(["nobody", "many"])
    path = tmp_path / "agreement.png"
    plot_agreement(report, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 10_000
    image = matplotlib.image.imread(path)
    height, width = image.shape[:2]
    assert height >= 400 and width >= 400
    # Not blank: the heatmap has colour, not only white and grey.
    rgb = image[..., :3]
    assert float(np.ptp(rgb[..., 0] - rgb[..., 2])) > 0.3


def test_plot_agreement_refuses_an_empty_report(tmp_path: Path) -> None:
    empty = AgreementReport(raters=[], n_units=0, n_compared=0, pairs=[], alpha=None, percent=None)
    with pytest.raises(ValueError, match="no raters"):
        plot_agreement(empty, tmp_path / "empty.png")
    assert not (tmp_path / "empty.png").exists()


def _few_and_many() -> AgreementReport:
    """Three raters: one pair agrees perfectly on a single feature, another on 960."""
    pairs = [
        PairAgreement(rater_a="a", rater_b="b", n=1, kappa=1.0, percent=1.0),
        PairAgreement(rater_a="a", rater_b="c", n=960, kappa=1.0, percent=1.0),
        PairAgreement(rater_a="b", rater_b="c", n=0, kappa=None, percent=None),
    ]
    return AgreementReport(raters=["a", "b", "c"], n_units=961, n_compared=961, pairs=pairs,
                           alpha=1.0, percent=1.0)  # fmt: skip


def test_heatmap_colours_only_cells_with_enough_features() -> None:
    cells = {(c.row, c.col): c for c in heatmap_cells(_few_and_many())}
    assert len(cells) == 9
    few, many, empty = cells[0, 1], cells[0, 2], cells[1, 2]
    assert (few.n, few.kappa, few.coloured) == (1, 1.0, False)
    assert (many.n, many.kappa, many.coloured) == (960, 1.0, True)
    assert (empty.n, empty.kappa, empty.coloured) == (0, None, False)
    assert cells[1, 0] == few.model_copy(update={"row": 1, "col": 0})  # symmetric
    assert not any(cells[i, i].coloured for i in range(3))  # the diagonal
    # every off-diagonal cell says its n
    assert "n=1" in few.caption and "n=960" in many.caption and "n=0" in empty.caption
    assert few.caption.startswith("1.00") and many.caption.startswith("1.00")


def test_heatmap_figure_greys_and_hatches_cells_under_the_minimum() -> None:
    import matplotlib.pyplot as plt

    fig = agreement_figure(_few_and_many())
    try:
        ax = fig.axes[0]
        grid = ax.images[0].get_array()
        assert grid is not None
        mask = np.ma.getmaskarray(grid)
        # only a-c (960 features) is drawn in colour; a-b (1 feature) is not
        assert [(i, j) for i in range(3) for j in range(3) if not mask[i, j]] == [(0, 2), (2, 0)]
        hatched = sorted(
            (round(p.get_x() + 0.5), round(p.get_y() + 0.5)) for p in ax.patches if p.get_hatch()
        )
        assert hatched == [(0, 1), (1, 0)]  # (x, y): the pair with too few, not the empty one
        assert f"under {SMALL_N}" in ax.get_title() and "hatched" in ax.get_title()
        texts = [t.get_text() for t in ax.texts]
        assert sum("n=1" in t and "n=1," not in t for t in texts) == 2
    finally:
        plt.close(fig)
