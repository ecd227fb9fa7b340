"""The audit as a PNG: each category's share by the judges' labels and corrected by the
audit, with 95% intervals; and, where judges resampled, a reliability diagram."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from labeler.reporting.audit_summary import AuditSummary
from labeler.reporting.plots import COLORS

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def audit_figure(audit: AuditSummary, run: str, unit: str) -> Figure:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import PercentFormatter

    panels = 2 if audit.calibration else 1
    fig, axes = plt.subplots(1, panels, figsize=(7.5 * panels, 4.6), squeeze=False)
    ax = axes[0][0]
    categories = list(audit.by_category)
    width = 0.38
    for i, category in enumerate(categories):
        s = audit.by_category[category]
        color = COLORS.get(category, "#888888")
        first = i == 0
        judges_label = "judges' labels" if first else None
        ax.bar(i - width / 2, 100 * s.judges_share, width, color=color, alpha=0.45,
               edgecolor="black", hatch="//", label=judges_label)  # fmt: skip
        ax.bar(i + width / 2, 100 * s.share, width, color=color, edgecolor="black",
               yerr=[[100 * (s.share - s.ci_low)], [100 * (s.ci_high - s.share)]], capsize=4,
               label="audited, 95% CI with the judges' error" if i == 0 else None)  # fmt: skip
    ax.set_xticks(range(len(categories)), categories)
    ax.set_ylabel(f"% of alive {unit}s")
    ax.yaxis.set_major_formatter(PercentFormatter(100))
    ax.set_ylim(bottom=0)
    r = audit.reasoning
    title = f"{run}: shares corrected by {audit.n_used:,} audited {unit}s"
    if r is not None:
        title += (
            f"\nreasoning {r.share:.1%} (95% CI {r.ci_low:.1%} to {r.ci_high:.1%}); "
            f"judges alone {r.judges_share:.1%}"
        )
    ax.set_title(title, fontsize=10)
    ax.legend(frameon=False, fontsize=8, loc="upper left")
    if audit.calibration:
        cal = axes[0][1]
        cal.plot([0, 1], [0, 1], color="#888888", linestyle="--", linewidth=1,
                 label="perfectly calibrated")  # fmt: skip
        for c in audit.calibration:
            xs = [b.confidence for b in c.bins]
            ys = [b.accuracy for b in c.bins]
            sizes = [20 + 6 * b.n for b in c.bins]
            ece = "-" if c.ece is None else f"{c.ece:.3f}"
            cal.plot(xs, ys, marker="o", linewidth=1, label=f"{c.judge} (ECE {ece}, n {c.n})")
            cal.scatter(xs, ys, s=sizes, alpha=0.3)
        cal.set_xlim(0, 1.02)
        cal.set_ylim(0, 1.02)
        cal.set_xlabel("resampled confidence (share of resamples agreeing with the label)")
        cal.set_ylabel("share people agreed with (audit-weighted)")
        cal.set_title("reliability of the resampled confidence\n(marker area: audited "
                      f"{unit}s in the bin)", fontsize=10)  # fmt: skip
        cal.legend(frameon=False, fontsize=8, loc="upper left")
    fig.tight_layout()
    return fig


def plot_audit(audit: AuditSummary, run: str, unit: str, path: Path) -> None:
    from labeler.reporting.plots import _save

    _save(audit_figure(audit, run, unit), path)
