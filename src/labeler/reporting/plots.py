"""PNG plots of a summary, for people."""

from __future__ import annotations

from pathlib import Path

from labeler.reporting.summarize import RunSummary
from prompts import CATEGORIES

COLORS = {
    "reasoning": "#d1495b",
    "domain": "#00798c",
    "language": "#edae49",
    "uninterpretable": "#8d96a3",
}


def plot_layers(summary: RunSummary, path: Path) -> None:
    """Per-layer stacked bars of the final labels' category shares, with the population
    reasoning share."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_layer = summary.final.by_layer
    layers = list(by_layer)
    totals = [max(sum(by_layer[la].values()), 1) for la in layers]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.5 * len(layers) + 3), 4.0))
    bottom = [0.0] * len(layers)
    for category in CATEGORIES:
        heights = [by_layer[la][category] / t for la, t in zip(layers, totals, strict=True)]
        ax.bar(layers, heights, bottom=bottom, label=category, color=COLORS[category])
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    r = summary.final.reasoning
    ax.set_title(
        f"Final labels by layer ({summary.run})\n"
        f"reasoning {r.share:.1%} [{r.ci_low:.1%}, {r.ci_high:.1%}] of {summary.n_alive:,} "
        f"alive {summary.unit}s ({r.n:,} labeled)"
    )
    ax.set_xlabel("layer")
    ax.set_ylabel("share of labeled features")
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_comparison(this: RunSummary, other: RunSummary, path: Path) -> None:
    """Category shares of two runs' final labels side by side, with 95% intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.0, 4.0))
    width = 0.38
    for offset, summary, hatch in ((-width / 2, this, ""), (width / 2, other, "//")):
        estimates = [summary.final.by_category[c] for c in CATEGORIES]
        xs = [i + offset for i in range(len(CATEGORIES))]
        heights = [e.share for e in estimates]
        errors = [[e.share - e.ci_low for e in estimates], [e.ci_high - e.share for e in estimates]]
        ax.bar(xs, heights, width, yerr=errors, capsize=3, hatch=hatch, edgecolor="black",
               color=[COLORS[c] for c in CATEGORIES], label=summary.run)  # fmt: skip
    ax.set_xticks(range(len(CATEGORIES)), list(CATEGORIES))
    ax.set_ylabel("share of alive features (95% CI)")
    ax.set_title("Final labels: plain bars this run, hatched the other")
    ax.legend(frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
