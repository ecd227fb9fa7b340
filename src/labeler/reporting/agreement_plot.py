"""PNG heatmap of an agreement report: pairwise Cohen's kappa between raters."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

from labeler.reporting.agreement import SMALL_N, AgreementReport

if TYPE_CHECKING:
    from matplotlib.figure import Figure


class HeatmapCell(BaseModel):
    """One cell of the heatmap: a pair of raters (both orders), or a rater with itself."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    row: int
    col: int
    kappa: float | None = Field(description="None on the diagonal and where undefined")
    n: int | None = Field(description="features both raters labeled; None on the diagonal")
    caption: str = Field(description="the text drawn in the cell: kappa and n")
    coloured: bool = Field(
        description=f"kappa drawn in colour: it is defined and rests on at least {SMALL_N} "
        "features (else the cell is grey, and hatched when there are a few)"
    )


def heatmap_cells(report: AgreementReport) -> list[HeatmapCell]:
    """Every cell of the heatmap, row by row: its kappa, n, caption and whether its
    kappa is drawn in colour (only when it rests on ``SMALL_N`` features or more: a
    kappa of 1.00 over one feature must not look like one over 960)."""
    size = len(report.raters)
    where = {rater: i for i, rater in enumerate(report.raters)}
    cells = {(i, j): HeatmapCell(row=i, col=j, kappa=None, n=None, caption="—", coloured=False)
             for i in range(size) for j in range(size)}  # fmt: skip
    for pair in report.pairs:
        i, j = where[pair.rater_a], where[pair.rater_b]
        few = " (few)" if 0 < pair.n < SMALL_N else ""
        value = "n/a" if pair.kappa is None else f"{pair.kappa:.2f}"
        cell = HeatmapCell(
            row=i, col=j, kappa=pair.kappa, n=pair.n, caption=f"{value}\nn={pair.n:,}{few}",
            coloured=pair.kappa is not None and pair.n >= SMALL_N,
        )  # fmt: skip
        cells[i, j] = cell
        cells[j, i] = cell.model_copy(update={"row": j, "col": i})
    return [cells[i, j] for i in range(size) for j in range(size)]


def _title(report: AgreementReport) -> str:
    alpha = "n/a" if report.alpha is None else f"{report.alpha:.3f}"
    percent = "n/a" if report.percent is None else f"{report.percent:.1%}"
    n = report.n_compared
    few = f", under {SMALL_N}: too few to rely on" if report.small_sample else ""
    return (
        "Cohen's κ on the category, for each pair of raters\n"
        f"(each cell: κ and n, the features both labeled; n under {SMALL_N}: "
        "grey, hatched, marked (few))\n"
        f"all raters: Krippendorff's α = {alpha}, agreement = {percent}\n"
        f"over the {n:,} feature{'' if n == 1 else 's'} labeled by two raters or more{few}"
    )


def agreement_figure(report: AgreementReport) -> Figure:
    """Heatmap of pairwise Cohen's kappa, each cell captioned with kappa and n.

    Kappa is coloured on its full range, -1 to 1, where it rests on at least SMALL_N
    features; a pair with fewer features in common is drawn grey and hatched (its kappa
    still written, with "(few)"); the diagonal and pairs with no feature in common are
    left grey. Raises ValueError for a report without raters.
    """
    if not report.raters:
        raise ValueError("the agreement report has no raters to plot")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.patches import Rectangle

    cells = heatmap_cells(report)
    size = len(report.raters)
    values = np.full((size, size), np.nan)
    for cell in cells:
        if cell.coloured and cell.kappa is not None:
            values[cell.row, cell.col] = cell.kappa
    side = max(4.0, 1.3 * size + 2.5)
    fig, ax = plt.subplots(figsize=(side + 1.0, side))
    cmap = plt.get_cmap("RdBu").with_extremes(bad="#eeeeee")
    image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=-1.0, vmax=1.0)
    for cell in cells:
        if not cell.coloured and cell.n:  # a kappa on too few features
            ax.add_patch(Rectangle((cell.col - 0.5, cell.row - 0.5), 1.0, 1.0, fill=False,
                                   hatch="///", edgecolor="#bbbbbb", linewidth=0.0))  # fmt: skip
        dark = cell.coloured and cell.kappa is not None and abs(cell.kappa) > 0.6
        ax.text(cell.col, cell.row, cell.caption, ha="center", va="center", fontsize=9,
                color="white" if dark else "black")  # fmt: skip
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
