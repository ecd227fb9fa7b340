"""Rich tables and progress bars for the CLI (the only place that writes to the terminal)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.markup import escape
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

from labeler.labeling.accounting import Estimate, JudgeStatus
from labeler.reporting.ground_truth import GroundTruthReport
from labeler.reporting.summarize import Comparison, LabelSummary, RunSummary, Share
from labeler.reporting.summarize import Estimate as PopulationShare
from labeler.review.queue import QueueItem
from prompts import CATEGORIES


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


def _pct(share: Share | PopulationShare) -> str:
    return f"{share.share:6.1%}  [{share.ci_low:.1%}, {share.ci_high:.1%}]"


def _raters_table(
    title: str,
    raters: list[LabelSummary],
    shares: Callable[[LabelSummary], dict[str, PopulationShare]],
) -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column("")
    for rater in raters:
        covered = "" if not rater.layers_without_labels else " (some layers)"
        table.add_column(escape(rater.rater) + covered, justify="right")
    for key in shares(raters[0]):
        table.add_row(key, *(_pct(shares(r)[key]) for r in raters))
    return table


def summary_tables(summary: RunSummary, comparison: Comparison | None = None) -> list[Table | str]:
    final = summary.final
    r = final.reasoning
    sources = ", ".join(f"{n:,} {s.replace('_', ' ')}" for s, n in final.by_source.items() if n)
    if final.n_labeled == 0:
        head = (
            f"[bold]No feature has a label yet[/bold]: of {summary.n_planned:,} planned, "
            f"{final.n_failed:,} failed and {final.n_unlabeled:,} are not labeled"
        )
    else:
        head = (
            f"[bold]Reasoning features: {r.share:.1%}[/bold] of {final.n_alive_covered:,} "
            f"alive {summary.unit}s (95% CI {r.ci_low:.1%} to {r.ci_high:.1%}; {r.count:,} "
            f"of {r.n:,} labeled, weighted by each layer's alive {summary.unit}s)\n"
            f"final labels of {summary.n_planned:,} planned: {sources}"
        )
    if final.layers_without_labels and final.n_labeled:
        head += (
            f"\n[bold]no labels yet in layer(s) {', '.join(final.layers_without_labels)}[/bold]"
            f": the shares are of the other layers' {final.n_alive_covered:,} alive "
            f"{summary.unit}s, not all {summary.n_alive:,}"
        )
    if final.n_failed or final.n_unlabeled:
        lo, hi = final.reasoning_if_missing_counted
        head += (
            f"\n{final.n_failed:,} failed and {final.n_unlabeled:,} unlabeled; if every one "
            f"were non-reasoning: {lo:.1%} of the sample; if all were: {hi:.1%}"
        )
        for reason, n in final.failures_by_reason.items():
            head += f"\n  failed ({n:,}): {reason}"
    out: list[Table | str] = [head]
    raters = [final, *summary.judges]
    out.append(
        _raters_table(
            "share of alive features by category [95% CI]", raters, lambda s: s.by_category
        )
    )
    for title, pick in (
        ("reasoning subcategory", lambda s: s.by_subcategory),
        ("reasoning mechanism", lambda s: s.by_mechanism),
        ("domain type", lambda s: s.by_domain_type),
    ):
        out.append(_raters_table(f"share of alive features by {title}", raters, pick))
    counts = Table(title="labels and cost by judge", title_justify="left")
    for column in ("", "labeled", "failed", "unlabeled", "cost"):
        counts.add_column(column, justify="right" if column else "left")
    for s in raters:
        cost = "" if s.rater == "final" else _dollars(s.cost_usd)
        counts.add_row(
            escape(s.rater), f"{s.n_labeled:,}", f"{s.n_failed:,}", f"{s.n_unlabeled:,}", cost
        )
    out.append(counts)
    total = f"total cost {_dollars(summary.cost_usd)}"
    if summary.cost_per_labeled_usd is not None:
        total += f" ({_dollars(summary.cost_per_labeled_usd)} per labeled feature)"
    out.append(total)
    out.extend(_agreement_parts(summary))
    d, rv = summary.disputes, summary.reviews
    reasons = ", ".join(f"{n:,} {k.replace('_', ' ')}" for k, n in d.by_reason.items())
    out.append(
        f"disputed: {d.n_disputed:,} ({reasons or 'none'}); {d.n_reviewed:,} decided by a "
        f"person. Reviews: {rv.n_decisions:,} decisions and {rv.n_skips:,} skips on "
        f"{rv.n_features:,} features by {len(rv.reviewers)} reviewers"
        + (
            f"; reviewers disagree on {rv.n_reviewers_disagree:,}"
            if rv.n_reviewers_disagree
            else ""
        )
    )
    layers = Table(title="final labels by layer (counts)", title_justify="left")
    layers.add_column("layer", justify="right")
    layers.add_column("alive", justify="right")
    for category in CATEGORIES:
        layers.add_column(category, justify="right")
    for layer, by_category in final.by_layer.items():
        alive = summary.n_alive_by_layer.get(layer, 0)
        layers.add_row(layer, f"{alive:,}", *(f"{by_category[c]:,}" for c in CATEGORIES))
    out.append(layers)
    if comparison is not None:
        out.append(comparison_table(comparison))
    return out


def _agreement_parts(summary: RunSummary) -> list[Table | str]:
    report = summary.agreement
    if report is None:
        return ["agreement: a single rater, nothing to compare"]
    table = Table(title="agreement on the category", title_justify="left")
    for column in ("rater", "rater", "features", "Cohen's kappa", "agreement"):
        table.add_column(column, justify="left" if column == "rater" else "right")
    for pair in [*report.pairs, *summary.judges_vs_humans]:
        table.add_row(
            escape(pair.rater_a),
            escape(pair.rater_b),
            f"{pair.n:,}",
            _number(pair.kappa),
            "-" if pair.percent is None else f"{pair.percent:.1%}",
        )
    alpha = _number(report.alpha)
    percent = "-" if report.percent is None else f"{report.percent:.1%}"
    return [
        table,
        f"Krippendorff's alpha (nominal, all raters): {alpha}; percent agreement "
        f"{percent} over {report.n_units:,} features",
    ]


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def comparison_table(comparison: Comparison) -> Table:
    table = Table(
        title=f"final labels: {comparison.run} against {comparison.other_run}", title_justify="left"
    )
    for column in ("share of alive", "this run", "other run", "difference [95% CI]"):
        table.add_column(column, justify="left" if column == "share of alive" else "right")
    for d in comparison.differences:
        table.add_row(
            d.label,
            f"{d.share:.1%}",
            f"{d.other_share:.1%}",
            f"{d.difference:+.1%}  [{d.ci_low:+.1%}, {d.ci_high:+.1%}]",
        )
    return table


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
        progress.add_column(
            column, justify="left" if column == "judge" else "right", no_wrap=column == "judge"
        )
    spending = Table(title="tokens and cost by judge", title_justify="left")
    for column in ("judge", "calls", "tokens in", "cached", "tokens out", "cost", "per labeled"):
        spending.add_column(
            column, justify="left" if column == "judge" else "right", no_wrap=column == "judge"
        )
    for s in statuses:
        u = s.usage
        rate = "-" if s.throughput_per_s is None else f"{s.throughput_per_s:,.2f}"
        progress.add_row(
            s.judge,
            f"{s.labeled:,}",
            f"{s.failed:,}",
            f"{s.pending:,}",
            _count(s.queued),
            _count(s.running),
            rate,
            _duration(s.eta_s),
        )
        for kind, n in s.failed_by_kind.items():
            progress.add_row(f"  failed: {kind}", "", f"{n:,}", *([""] * 5))
        spending.add_row(
            s.judge,
            f"{u.calls:,}",
            f"{u.input_tokens + u.cache_write_tokens:,}",
            f"{u.cached_tokens:,}",
            f"{u.output_tokens:,}",
            _dollars(s.cost_usd),
            _dollars(s.cost_per_labeled_usd),
        )
    return [progress, spending]


def estimate_table(estimates: list[Estimate]) -> Table:
    table = Table(title="estimate (nothing sent)", title_justify="left")
    for column in (
        "judge",
        "features",
        "calls",
        "tokens in",
        "of them cached",
        "tokens out",
        "dollars",
    ):
        table.add_column(
            column, justify="left" if column == "judge" else "right", no_wrap=column == "judge"
        )
    for e in estimates:
        out = f"{e.output_tokens:,}" + ("" if e.output_measured else " (typical)")
        table.add_row(
            e.judge,
            f"{e.features:,}",
            f"{e.calls:,}",
            f"{e.input_tokens + e.cached_tokens:,}",
            f"{e.cached_tokens:,}",
            out,
            _dollars(e.cost_usd),
        )
    return table


def queue_table(queue: list[QueueItem]) -> Table:
    table = Table(title="disputed features, most informative first", title_justify="left")
    for column in ("feature", "score", "why", "judges", "lowest detection", "decided by"):
        table.add_column(
            column, justify="right" if column in ("score", "lowest detection") else "left"
        )
    for q in queue:
        detection = "-" if q.min_detection is None else f"{q.min_detection:.2f}"
        table.add_row(
            q.feature_id,
            f"{q.score:.2f}",
            ", ".join(q.reasons),
            escape(q.categories),
            detection,
            escape(", ".join(q.decided_by)),
        )
    return table
