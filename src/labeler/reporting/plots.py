"""PNG plots of a summary, for people."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from labeler.reporting.summarize import RunSummary
from prompts import CATEGORIES

COLORS = {
    "reasoning": "#d1495b",
    "domain": "#00798c",
    "language": "#edae49",
    "uninterpretable": "#8d96a3",
}

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def layers_figure(summary: RunSummary) -> Figure:
    """Per-layer stacked bars of the final labels' category shares, in percent of each
    layer's alive features (estimated from its labeled ones, counted under each bar), with
    the population reasoning share in the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import PercentFormatter

    by_layer = summary.final.by_layer
    layers = list(by_layer)
    labeled = [sum(by_layer[la].values()) for la in layers]
    fig, ax = plt.subplots(figsize=(max(7.5, 0.7 * len(layers) + 4), 4.8))
    bottom = [0.0] * len(layers)
    for category in CATEGORIES:
        heights = [
            100 * by_layer[la][category] / max(n, 1) for la, n in zip(layers, labeled, strict=True)
        ]
        ax.bar(layers, heights, bottom=bottom, label=category, color=COLORS[category])
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    r, unit = summary.final.reasoning, summary.unit
    audited = summary.audit.reasoning if summary.audit is not None else None
    ax.set_title(
        f"{summary.run}: final labels by layer, % of each layer's alive {unit}s\n"
        f"reasoning: {r.share:.1%} of {summary.final.n_alive_covered:,} alive {unit}s "
        f"(95% CI {r.ci_low:.1%} to {r.ci_high:.1%}),\n"
        f"from {r.count:,} reasoning of {r.n:,} labeled"
        + (
            f"; audited {audited.share:.1%} ({audited.ci_low:.1%} to {audited.ci_high:.1%}, "
            "judges' error included)"
            if audited is not None
            else "; CI without the judges' error (no audit)"
        ),
        fontsize=10,
    )
    alive = [summary.n_alive_by_layer.get(la, 0) for la in layers]
    ax.set_xticks(
        range(len(layers)),
        [f"{la}\n{n:,}/{a:,}" for la, n, a in zip(layers, labeled, alive, strict=True)],
    )
    ax.set_xlabel(f"layer (labeled/alive {unit}s)")
    ax.set_ylabel(f"% of the layer's alive {unit}s\n(estimated from its labeled ones)")
    ax.set_ylim(0, 100)
    ax.yaxis.set_major_formatter(PercentFormatter(100))
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    fig.tight_layout()
    return fig


def plot_layers(summary: RunSummary, path: Path) -> None:
    """Write :func:`layers_figure` as a PNG."""
    _save(layers_figure(summary), path)


def comparison_figure(this: RunSummary, other: RunSummary) -> Figure:
    """Category shares of two runs' final labels side by side, in percent of each run's
    alive features, with 95% intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import PercentFormatter

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    width = 0.38
    for offset, summary, hatch in ((-width / 2, this, ""), (width / 2, other, "//")):
        estimates = [summary.final.by_category[c] for c in CATEGORIES]
        xs = [i + offset for i in range(len(CATEGORIES))]
        heights = [100 * e.share for e in estimates]
        errors = [[100 * (e.share - e.ci_low) for e in estimates],
                  [100 * (e.ci_high - e.share) for e in estimates]]  # fmt: skip
        ax.bar(xs, heights, width, yerr=errors, capsize=3, hatch=hatch, edgecolor="black",
               color=[COLORS[c] for c in CATEGORIES], label=summary.run)  # fmt: skip
    ax.set_xticks(range(len(CATEGORIES)), list(CATEGORIES))
    ax.set_ylabel(f"% of the run's alive {this.unit}s (95% CI)")
    ax.yaxis.set_major_formatter(PercentFormatter(100))
    ax.set_ylim(bottom=0)
    ax.set_title(
        f"Final labels by category, % of each run's alive {this.unit}s\n"
        f"plain: {this.run}; hatched: {other.run}",
        fontsize=10,
    )
    ax.legend(frameon=False)
    fig.tight_layout()
    return fig


def plot_comparison(this: RunSummary, other: RunSummary, path: Path) -> None:
    """Write :func:`comparison_figure` as a PNG."""
    _save(comparison_figure(this, other), path)


def _save(fig: Figure, path: Path) -> None:
    import matplotlib.pyplot as plt

    try:
        fig.savefig(path, dpi=120, bbox_inches="tight")
    finally:
        plt.close(fig)
