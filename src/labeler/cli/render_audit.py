"""The audit's part of ``labeler summarize``'s printout (``labeler.reporting.audit_summary``)."""

from __future__ import annotations

from rich.markup import escape
from rich.table import Table

from labeler.audit.estimate import AuditedShare, Ratio
from labeler.reporting.summarize import RunSummary


def _share(s: AuditedShare) -> str:
    return f"{s.share:6.1%}  [{s.ci_low:.1%}, {s.ci_high:.1%}]"


def _ratio(r: Ratio) -> str:
    if r.value is None or r.ci_low is None or r.ci_high is None:
        return "-"
    return f"{r.value:.2f} [{r.ci_low:.2f}, {r.ci_high:.2f}]"


def audit_parts(summary: RunSummary) -> list[Table | str]:
    """The audited shares, the judges' precision and recall and the calibration; or the
    warning that the intervals leave out the judges' error."""
    audit, unit = summary.audit, summary.unit
    out: list[Table | str] = []
    if audit is None or audit.reasoning is None:
        if summary.judge_error:
            out.append(f"[yellow]judges' error not counted:[/] {escape(summary.judge_error)}")
        if audit is not None:
            out.extend(f"  audit {u.audit_id}: {escape(u.note)}" for u in audit.audits if u.note)
        return out
    r = audit.reasoning
    out.append(
        f"[bold]Audited: reasoning {r.share:.1%} of alive {unit}s[/bold] (95% CI "
        f"{r.ci_low:.1%} to {r.ci_high:.1%}, the judges' error included): the judges' "
        f"{r.judges_share:.1%} corrected by people's decisions on {audit.n_used:,} audited "
        f"{unit}s ({audit.n_decided:,} of {audit.n_drawn:,} drawn are decided)"
    )
    out.extend(f"  audit {u.audit_id}: {escape(u.note)}" for u in audit.audits if u.note)
    shares = Table(
        title=f"share of alive {unit}s by category, judges' labels and audited [95% CI]",
        title_justify="left",
    )
    for column in ("", "judges", "audited (judges' error included)"):
        shares.add_column(column, justify="right" if column else "left")
    for category, s in audit.by_category.items():
        shares.add_row(category, f"{s.judges_share:6.1%}", _share(s))
    out.append(shares)
    if audit.accuracy:
        table = Table(
            title="the judges against people's audit labels: reasoning [95% CI]",
            title_justify="left",
        )
        for column in ("", "precision", "n", "recall", "n "):
            table.add_column(column, justify="right" if column else "left")
        for a in audit.accuracy:
            table.add_row(escape(a.rater), _ratio(a.precision), f"{a.precision.n:,}",
                          _ratio(a.recall), f"{a.recall.n:,}")  # fmt: skip
        out.append(table)
    for c in audit.calibration:
        ece = "-" if c.ece is None else f"{c.ece:.3f}"
        out.append(
            f"calibration of {escape(c.judge)}'s resampled confidence: expected calibration "
            f"error {ece} over {c.n:,} audited {unit}s (reliability plot beside the summary's)"
        )
    return out
