"""The study's figure: per mode, the reference, the selection and its controls side by
side, titled with the selection and the measure.

Each bar is a condition's rate with its own 95% percentile bootstrap interval (responses
resampled within the condition, or traces resampled, both conditions together): a rate
is never negative, so neither is any resample's rate nor the interval, and nothing is
clipped. A bar of zero height is drawn as a zero (a mark on the axis and the label
"0"), so it does not look like missing data. Each control's rate is a dot, their range
a band. The caption says all this under the panels; the PNG's ``Title`` and
``Description`` hold the title and the caption.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from adapters.outputs import replacing
from labeler.causal.measures import p_value_text
from labeler.causal.results import ModeResult, StudyReport

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

TITLES = {"ablated": "selection ablated in the adapter model",
          "added": "selection added to the hybrid model"}  # fmt: skip
MEASURES = {"sampled": "sampled", "teacher_forced": "teacher-forced"}
RESAMPLED = {"sampled": "responses resampled within the condition",
             "teacher_forced": "traces resampled, both conditions together"}  # fmt: skip
INTERVAL_GID = "interval"
ZERO_GID = "zero-bar"
CAPTION_GID = "caption"


def study_title(groups: Sequence[str], ids_file: Path | None, measure: str) -> str:
    """The selection and the measure: ``mechanism=output · teacher-forced``."""
    parts = list(groups) + ([f"features from {ids_file.name}"] if ids_file else [])
    return f"{' or '.join(parts) or 'selected features'} · {MEASURES.get(measure, measure)}"


def caption(report: StudyReport) -> str:
    """What the figure's marks mean."""
    asked = report.controls_asked
    short = (f" (asked for {asked}; the pool held no more distinct matched sets)"
             if asked is not None and asked > report.n_controls else "")  # fmt: skip
    return (
        f"{report.n_selected} selected feature{'' if report.n_selected == 1 else 's'}, "
        f"{report.n_controls} distinct matched control selections{short}. Bars: each "
        "condition's rate; error bars: its 95% percentile "
        f"bootstrap interval ({RESAMPLED[report.measure]}). Dots: each control's rate; band: "
        "their range. p = (1 + k) / (1 + K): k of the K controls changed the rate at least "
        "as much as the selection."
    )


def _bar(ax: Axes, x: float, rate: float, low: float, high: float, color: str) -> None:
    """A rate's bar, its interval, and its value (a zero drawn as a mark and "0")."""
    ax.bar([x], [rate], color=color, width=0.6)
    ax.vlines([x], low, high, color="#222222", linewidth=1.2, gid=INTERVAL_GID)
    ax.hlines([low, high], x - 0.08, x + 0.08, color="#222222", linewidth=1.2)
    if rate == 0:
        ax.plot([x], [0], marker="_", markersize=28, markeredgewidth=3, color=color,
                clip_on=False, zorder=4, gid=ZERO_GID)  # fmt: skip
    ax.annotate("0" if rate == 0 else f"{rate:.3g}", (x, max(rate, high)),
                xytext=(0, 3), textcoords="offset points", ha="center", va="bottom",
                fontsize=8)  # fmt: skip


def _panel(ax: Axes, mode: ModeResult, report: StudyReport, unit: str) -> None:
    s = mode.selection
    _bar(ax, 0, s.reference_rate, s.reference_low, s.reference_high, "#9e9e9e")
    _bar(ax, 1, s.rate, s.rate_low, s.rate_high, "#c0392b")
    if mode.controls:
        rates = [c.rate for c in mode.controls]
        ax.fill_between([1.65, 2.35], min(rates), max(rates), color="#3498db", alpha=0.15)
        spread = [0.5] if len(rates) == 1 else [i / (len(rates) - 1) for i in range(len(rates))]
        ax.scatter([1.7 + 0.6 * x for x in spread], rates, color="#2471a3", zorder=3, s=18)
    lines = [TITLES[mode.mode], f"change {s.difference:+.2f} per 1,000 [{s.low:+.2f}, "
             f"{s.high:+.2f}]"]  # fmt: skip
    if mode.p_value is not None:
        lines += p_value_text(mode.p_value, len(mode.controls), report.controls_asked).split("; ")
    ax.set_title("\n".join(lines), fontsize=8)
    ax.set_xticks([0, 1, 2], [s.reference, "selection", f"{len(mode.controls)} controls"])
    ax.set_ylabel(f"{'/'.join(report.words)} per 1,000 {unit} tokens")
    top = max([s.reference_high, s.rate_high, *(c.rate for c in mode.controls)], default=0)
    ax.set_ylim(0, top * 1.15 if top > 0 else 1)


def study_figure(report: StudyReport, title: str) -> Figure:
    """The figure; its ``_suptitle`` is ``title``, its caption a text of gid
    ``caption``, each interval a line collection of gid ``interval`` and each zero bar
    a mark of gid ``zero-bar``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = report.modes or []
    width = 4.6 * max(1, len(panels))
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(width, 5.4), squeeze=False)
    unit = "generated" if report.measure == "sampled" else "predicted"
    for ax, mode in zip(axes[0], panels, strict=False):
        _panel(ax, mode, report, unit)
    fig.suptitle(title, fontsize=10)
    text = textwrap.fill(caption(report), width=int(width * 17))
    fig.text(0.5, 0.01, text, ha="center", va="bottom", fontsize=7, gid=CAPTION_GID)
    fig.tight_layout(rect=(0, 0.04 + 0.025 * text.count("\n"), 1, 1))
    return fig


def plot_study(report: StudyReport, title: str, path: Path) -> None:
    """Write the figure to ``path`` whole or not at all: a figure cut short by a full
    disk would replace a good one with a file no viewer opens. A PNG or SVG holds the
    title and caption as its ``Title`` and ``Description``."""
    import matplotlib.pyplot as plt

    fig = study_figure(report, title)
    suffix = path.suffix.lower()
    metadata = (
        {"Title": title, "Description": caption(report)}
        if suffix in (".png", ".svg")
        else {"Title": title}
        if suffix == ".pdf"
        else None
    )
    try:
        with replacing(path) as tmp:
            fig.savefig(tmp, dpi=120, metadata=metadata)
    finally:
        plt.close(fig)
