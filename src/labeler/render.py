"""Rich tables and progress bars for the CLI (the only place that writes to the terminal)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from labeler.accounting import Estimate, JudgeStatus
from labeler.ground_truth import GroundTruthReport
from labeler.summarize import Share, Summary


class RateColumn(ProgressColumn):
    def __init__(self, unit: str) -> None:
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.0f} {self.unit}/s" if speed else f"- {self.unit}/s")


@contextmanager
def progress_bar(console: Console, description: str, unit: str) -> Iterator[Progress]:
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        MofNCompleteColumn(),
        RateColumn(unit),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        yield progress


def _pct(share: Share) -> str:
    return f"{share.share:6.1%}  [{share.ci_low:.1%}, {share.ci_high:.1%}]"


def summary_tables(summary: Summary) -> list[Table | str]:
    r = summary.reasoning
    head = (
        f"[bold]Reasoning features: {r.share:.1%}[/bold] (95% CI {r.ci_low:.1%} to "
        f"{r.ci_high:.1%}; {r.count} of {r.n} labeled by {summary.judge})\n"
        f"planned {summary.n_planned}: labeled {summary.n_labeled}, failed {summary.n_failed}, "
        f"unlabeled {summary.n_unlabeled}"
    )
    if summary.n_failed or summary.n_unlabeled:
        lo, hi = summary.reasoning_if_missing_counted
        head += (
            f"\nif every failed/unlabeled feature were non-reasoning: {lo:.1%}; "
            f"if all were: {hi:.1%}"
        )
        for reason, n in summary.failures_by_reason.items():
            head += f"\n  failed ({n}): {reason}"
    if summary.cost_usd:
        head += f"\ncost {_dollars(summary.cost_usd)}"
        if summary.cost_per_labeled_usd is not None:
            head += f" ({_dollars(summary.cost_per_labeled_usd)} per labeled feature)"
    out: list[Table | str] = [head]
    for title, shares in (
        ("category", summary.by_category),
        ("reasoning subcategory", summary.by_subcategory),
        ("reasoning mechanism", summary.by_mechanism),
        ("domain type", summary.by_domain_type),
    ):
        table = Table(title=f"by {title}", title_justify="left")
        table.add_column(title)
        table.add_column("count", justify="right")
        table.add_column("share [95% CI]", justify="right")
        for key, share in shares.items():
            table.add_row(key, str(share.count), _pct(share))
        out.append(table)
    layers = Table(title="by layer", title_justify="left")
    layers.add_column("layer", justify="right")
    categories = list(next(iter(summary.by_layer.values()), {}))
    for category in categories:
        layers.add_column(category, justify="right")
    for layer, counts in summary.by_layer.items():
        layers.add_row(layer, *(str(counts[c]) for c in categories))
    out.append(layers)
    return out


def ground_truth_table(report: GroundTruthReport) -> list[Table | str]:
    head = (
        f"[bold]Against the planted ground truth[/bold]: category right for "
        f"{report.interpretable_accuracy:.1%} of {report.n_interpretable} interpretable planted "
        f"features; planted reasoning share {report.planted_reasoning_share:.1%}\n"
        f"reasoning subcategory right {report.reasoning_subcategory_accuracy:.1%}, mechanism "
        f"{report.reasoning_mechanism_accuracy:.1%}; "
        f"domain type {report.domain_type_accuracy:.1%}; "
        f"dead planted {report.dead_planted}, of which found alive {report.dead_found_alive}"
    )
    table = Table(title="planted (rows) against judged (columns)", title_justify="left")
    judged = sorted({j for row in report.confusion.values() for j in row})
    table.add_column("planted")
    for j in judged:
        table.add_column(j, justify="right")
    table.add_column("accuracy", justify="right")
    for planted, row in sorted(report.confusion.items()):
        acc = report.accuracy_by_category.get(planted, 0.0)
        table.add_row(planted, *(str(row.get(j, 0)) for j in judged), f"{acc:.1%}")
    return [head, table]


def _dollars(value: float | None) -> str:
    return "unknown price" if value is None else f"${value:,.4f}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def _count(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def status_table(statuses: list[JudgeStatus]) -> list[Table]:
    """Progress (done, failed, pending, queued, running, throughput, ETA), then spending."""
    progress = Table(title="progress by judge", title_justify="left")
    for column in ("judge", "labeled", "failed", "pending", "queued", "running", "per s", "ETA"):
        progress.add_column(column, justify="left" if column == "judge" else "right",
                            no_wrap=column == "judge")  # fmt: skip
    spending = Table(title="tokens and cost by judge", title_justify="left")
    for column in ("judge", "calls", "tokens in", "cached", "tokens out", "cost", "per labeled"):
        spending.add_column(column, justify="left" if column == "judge" else "right",
                            no_wrap=column == "judge")  # fmt: skip
    for s in statuses:
        u = s.usage
        rate = "-" if s.throughput_per_s is None else f"{s.throughput_per_s:,.2f}"
        progress.add_row(
            s.judge, f"{s.labeled:,}", f"{s.failed:,}", f"{s.pending:,}", _count(s.queued),
            _count(s.running), rate, _duration(s.eta_s),
        )  # fmt: skip
        for kind, n in s.failed_by_kind.items():
            progress.add_row(f"  failed: {kind}", "", f"{n:,}", *([""] * 5))
        spending.add_row(
            s.judge, f"{u.calls:,}", f"{u.input_tokens + u.cache_write_tokens:,}",
            f"{u.cached_tokens:,}", f"{u.output_tokens:,}", _dollars(s.cost_usd),
            _dollars(s.cost_per_labeled_usd),
        )  # fmt: skip
    return [progress, spending]


def estimate_table(estimates: list[Estimate]) -> Table:
    table = Table(title="estimate (nothing sent)", title_justify="left")
    for column in ("judge", "features", "calls", "tokens in", "of them cached", "tokens out",
                   "dollars"):  # fmt: skip
        table.add_column(column, justify="left" if column == "judge" else "right",
                         no_wrap=column == "judge")  # fmt: skip
    for e in estimates:
        out = f"{e.output_tokens:,}" + ("" if e.output_measured else " (typical)")
        table.add_row(
            e.judge, f"{e.features:,}", f"{e.calls:,}",
            f"{e.input_tokens + e.cached_tokens:,}", f"{e.cached_tokens:,}", out,
            _dollars(e.cost_usd),
        )  # fmt: skip
    return table
