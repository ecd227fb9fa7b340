"""PNG plots of a summary, for people."""

from __future__ import annotations

from pathlib import Path

from labeler.summarize import Summary
from prompts import CATEGORIES

COLORS = {
    "reasoning": "#d1495b",
    "domain": "#00798c",
    "language": "#edae49",
    "uninterpretable": "#8d96a3",
}


def plot_layers(summary: Summary, path: Path) -> None:
    """Per-layer stacked bars of category shares, with the overall reasoning share."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(summary.by_layer)
    totals = [max(sum(summary.by_layer[la].values()), 1) for la in layers]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.5 * len(layers) + 3), 4.0))
    bottom = [0.0] * len(layers)
    for category in CATEGORIES:
        heights = [summary.by_layer[la][category] / t for la, t in zip(layers, totals, strict=True)]
        ax.bar(layers, heights, bottom=bottom, label=category, color=COLORS[category])
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    r = summary.reasoning
    ax.set_title(
        f"Feature categories by layer ({summary.judge})\n"
        f"reasoning {r.share:.1%} [{r.ci_low:.1%}, {r.ci_high:.1%}] of {r.n} labeled"
    )
    ax.set_xlabel("layer")
    ax.set_ylabel("share of labeled features")
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
