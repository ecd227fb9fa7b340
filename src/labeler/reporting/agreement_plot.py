"""PNG heatmap of an agreement report: pairwise Cohen's kappa between raters."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from labeler.reporting.agreement import SMALL_N, AgreementReport

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _kappa_grid(report: AgreementReport) -> tuple[list[list[float]], list[list[str]]]:
    """Symmetric kappa matrix (NaN on the diagonal and where undefined) and cell captions."""
    size = len(report.raters)
    where = {rater: i for i, rater in enumerate(report.raters)}
    kappa = [[math.nan] * size for _ in range(size)]
    captions = [["—"] * size for _ in range(size)]
    for pair in report.pairs:
        i, j = where[pair.rater_a], where[pair.rater_b]
        value = math.nan if pair.kappa is None else pair.kappa
        few = " (few)" if pair.small_sample else ""
        caption = f"{'n/a' if pair.kappa is None else f'{pair.kappa:.2f}'}\nn={pair.n:,}{few}"
        kappa[i][j] = kappa[j][i] = value
        captions[i][j] = captions[j][i] = caption
    return kappa, captions


def _title(report: AgreementReport) -> str:
    alpha = "n/a" if report.alpha is None else f"{report.alpha:.3f}"
    percent = "n/a" if report.percent is None else f"{report.percent:.1%}"
    n = report.n_compared
    few = f", under {SMALL_N}: too few to rely on" if report.small_sample else ""
    return (
        "Cohen's κ on the category, for each pair of raters\n"
        f"(each cell: κ and n, the features both labeled; (few): n under {SMALL_N})\n"
        f"all raters: Krippendorff's α = {alpha}, agreement = {percent}\n"
        f"over the {n:,} feature{'' if n == 1 else 's'} labeled by two raters or more{few}"
    )


def agreement_figure(report: AgreementReport) -> Figure:
    """Heatmap of pairwise Cohen's kappa, each cell captioned with kappa and n.

    Kappa is coloured on its full range, -1 to 1; the diagonal and pairs with no unit in
    common are left blank; a pair with fewer than SMALL_N units in common is marked
    "(few)". Raises ValueError for a report without raters.
    """
    if not report.raters:
        raise ValueError("the agreement report has no raters to plot")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kappa, captions = _kappa_grid(report)
    size = len(report.raters)
    side = max(4.0, 1.3 * size + 2.5)
    fig, ax = plt.subplots(figsize=(side + 1.0, side))
    cmap = plt.get_cmap("RdBu").with_extremes(bad="#eeeeee")
    image = ax.imshow(kappa, cmap=cmap, vmin=-1.0, vmax=1.0)
    for i in range(size):
        for j in range(size):
            value = kappa[i][j]
            dark = not math.isnan(value) and abs(value) > 0.6
            ax.text(
                j,
                i,
                captions[i][j],
                ha="center",
                va="center",
                fontsize=9,
                color="white" if dark else "black",
            )
    ax.set_xticks(range(size), report.raters, rotation=30, ha="right")
    ax.set_yticks(range(size), report.raters)
    ax.set_title(_title(report), fontsize=10)
    fig.colorbar(image, ax=ax, label="Cohen's κ", fraction=0.046, pad=0.04)
    fig.tight_layout()
    return fig


def plot_agreement(report: AgreementReport, path: Path) -> None:
    """Write :func:`agreement_figure` as a PNG."""
    fig = agreement_figure(report)
    import matplotlib.pyplot as plt

    try:
        fig.savefig(path, dpi=120, bbox_inches="tight")
    finally:
        plt.close(fig)
