"""The intervention study's tables in the terminal."""

from __future__ import annotations

from rich import box
from rich.console import Console
from rich.table import Table

from labeler.causal.measures import p_value_text
from labeler.causal.results import StudyReport


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def render_study(console: Console, report: StudyReport) -> None:
    per_layer = ", ".join(f"L{k}: {v}" for k, v in report.selected_per_layer.items())
    unit = "generated" if report.measure == "sampled" else "predicted (teacher-forced)"
    console.print(
        f"[bold]{report.n_selected} selected feature{'' if report.n_selected == 1 else 's'}"
        f"[/bold] ({per_layer}); "
        f"{report.n_controls} distinct matched control selections; "
        f"rate of {', '.join(report.words)} per 1,000 {unit} tokens"
    )
    if not report.complete:
        console.print("[yellow]the study is not complete: run the command again to finish it")
    table = Table(title="conditions", box=box.SIMPLE_HEAD, pad_edge=False)
    for name in ("condition", "feats", "n", "tokens", "rate/1k"):
        table.add_column(name, justify="left" if name == "condition" else "right")
    sampled = report.measure == "sampled"
    if sampled:
        for name in ("length", "closed", "correct"):
            table.add_column(name, justify="right")
    for c in report.conditions:
        if c.control is not None:
            continue
        row = [c.name, f"{c.n_features:,}", f"{c.n:,}", f"{c.tokens:,}", f"{c.rate:.2f}"]
        if sampled:
            accuracy = "-" if c.accuracy is None else f"{c.accuracy:.0%}/{c.n_with_reference}"
            row += [f"{c.mean_length:,.0f}", _share(c.closed_share), accuracy]
        table.add_row(*row)
    console.print(table)
    effects = Table(title="effects, per 1,000 tokens", box=box.SIMPLE_HEAD, pad_edge=False)
    for name in ("selection", "vs", "rate", "change [95% CI]", "ratio", "controls", "p"):
        effects.add_column(name, justify="left" if name in ("selection", "vs") else "right")
    for mode in report.modes:
        s = mode.selection
        spread = (
            f"{min(c.difference for c in mode.controls):+.2f}..."
            f"{max(c.difference for c in mode.controls):+.2f}"
            if mode.controls
            else "-"
        )
        effects.add_row(
            mode.mode, s.reference, f"{s.rate:.2f}",
            f"{s.difference:+.2f} [{s.low:+.2f}, {s.high:+.2f}]",
            "-" if s.ratio is None else f"{s.ratio:.2f}",
            spread, "-" if mode.p_value is None else f"{mode.p_value:.2g}",
        )  # fmt: skip
    console.print(effects)
    console.print(
        "change: the selection's rate minus its reference's, with a 95% percentile bootstrap "
        "interval; controls: the range of the matched random selections' changes; p: "
        "(1 + k) / (1 + K), k of the K controls changing the rate as much",
        markup=False, highlight=False,
    )  # fmt: skip
    for mode in report.modes:
        if mode.p_value is not None:
            text = p_value_text(mode.p_value, len(mode.controls), report.controls_asked)
            console.print(f"{mode.mode}: {text}", markup=False, highlight=False)
