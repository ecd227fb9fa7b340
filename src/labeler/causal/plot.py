"""The study's figure: per mode, the reference, the selection and its controls side by
side (the selection with its bootstrap interval, each control as a dot, their spread as a
band)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from adapters.outputs import replacing
from labeler.causal.results import StudyReport

if TYPE_CHECKING:
    from matplotlib.figure import Figure

TITLES = {"ablated": "selection ablated in the adapter model",
          "added": "selection added to the hybrid model"}  # fmt: skip


def study_figure(report: StudyReport, title: str) -> Figure:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = report.modes or []
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(4.6 * max(1, len(panels)), 4.4),
                             squeeze=False)  # fmt: skip
    unit = "generated" if report.measure == "sampled" else "predicted"
    for ax, mode in zip(axes[0], panels, strict=False):
        s = mode.selection
        ax.bar([0], [s.reference_rate], color="#9e9e9e", width=0.6)
        ax.bar([1], [s.rate], color="#c0392b", width=0.6,
               yerr=[[s.rate - (s.reference_rate + s.low)], [s.reference_rate + s.high - s.rate]],
               capsize=6)  # fmt: skip
        if mode.controls:
            rates = [c.rate for c in mode.controls]
            ax.fill_between([1.65, 2.35], min(rates), max(rates), color="#3498db", alpha=0.15)
            ax.scatter([2 + 0.25 * ((i % 5) - 2) / 2 for i in range(len(rates))], rates,
                       color="#2471a3", zorder=3, s=18)  # fmt: skip
        p = f", p = {mode.p_value:.3g}" if mode.p_value is not None else ""
        ax.set_title(f"{TITLES[mode.mode]}\n{s.difference:+.2f} per 1,000{p}", fontsize=9)
        ax.set_xticks([0, 1, 2], [s.reference, "selection", f"{len(mode.controls)} controls"])
        ax.set_ylabel(f"{'/'.join(report.words)} per 1,000 {unit} tokens")
        ax.set_ylim(bottom=0)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_study(report: StudyReport, title: str, path: Path) -> None:
    """Write the figure to ``path`` whole or not at all: a figure cut short by a full
    disk would replace a good one with a file no viewer opens."""
    import matplotlib.pyplot as plt

    fig = study_figure(report, title)
    try:
        with replacing(path) as tmp:
            fig.savefig(tmp, dpi=120)
    finally:
        plt.close(fig)
