"""Rich tables and progress bars for the CLI (the only place that writes to the terminal)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

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
from labeler.labeling.batch_records import Submission
from labeler.reporting.agreement import SMALL_N
from labeler.reporting.ground_truth import GroundTruthReport
from labeler.reporting.score_distributions import Spread
from labeler.reporting.summarize import Comparison, LabelSummary, RunSummary, Share
from labeler.reporting.summarize import Estimate as PopulationShare
from labeler.review.queue import QueueItem
from prompts import CATEGORIES

if TYPE_CHECKING:
    from labeler.causal.output_score import OutputScore


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


def plural(n: int, word: str, many: str | None = None) -> str:
    """``n`` and the word, plural unless n is 1: "1 skip", "2 skips", "0 skips"."""
    return f"{n:,} {word if n == 1 else many or word + 's'}"


SOURCE_WORDS = {
    "human": "decided by a person",
    "consensus": "the judges' consensus",
    "single_judge": "from a single judge",
    "none": "without a label",
}


def summary_tables(summary: RunSummary, comparison: Comparison | None = None) -> list[Table | str]:
    final = summary.final
    r = final.reasoning
    unit = summary.unit
    sources = ", ".join(f"{n:,} {SOURCE_WORDS.get(s, s)}" for s, n in final.by_source.items() if n)
    if final.n_labeled == 0:
        head = (
            f"[bold]No feature has a label yet[/bold]: of {summary.n_planned:,} planned, "
            f"{final.n_failed:,} failed and {final.n_unlabeled:,} are not labeled"
        )
    else:
        head = (
            f"[bold]Reasoning features: {r.share:.1%} of {final.n_alive_covered:,} alive "
            f"{unit}s[/bold] (95% CI {r.ci_low:.1%} to {r.ci_high:.1%}), estimated from "
            f"{r.count:,} reasoning of {plural(r.n, 'labeled ' + unit)} "
            f"({r.sample_share:.1%} of the labeled), each layer weighted by its alive "
            f"{unit}s\n"
            f"final labels of the {plural(summary.n_planned, 'planned ' + unit)}: {sources}"
        )
    if final.layers_without_labels and final.n_labeled:
        head += (
            f"\n[bold]no labels yet in layer(s) {', '.join(final.layers_without_labels)}[/bold]"
            f": the shares are of the other layers' {final.n_alive_covered:,} alive "
            f"{unit}s, not all {summary.n_alive:,}"
        )
    if final.n_failed or final.n_unlabeled:
        lo, hi = final.reasoning_if_missing_counted
        head += (
            f"\n{final.n_failed:,} failed and {final.n_unlabeled:,} unlabeled of the "
            f"{summary.n_planned:,} planned; were all of them non-reasoning, reasoning would be "
            f"{lo:.1%} of the planned {unit}s; were all reasoning, {hi:.1%}"
        )
        for reason, n in final.failures_by_reason.items():
            head += f"\n  failed ({n:,}): {reason}"
    out: list[Table | str] = [head]
    if final.n_labeled:
        from labeler.cli.render_audit import audit_parts

        out.extend(audit_parts(summary))
    raters = [final, *summary.judges]
    out.append(
        _raters_table(
            f"share of alive {unit}s by category [95% CI]", raters, lambda s: s.by_category
        )
    )
    for title, pick in (
        ("reasoning subcategory", lambda s: s.by_subcategory),
        ("reasoning mechanism", lambda s: s.by_mechanism),
        ("domain type", lambda s: s.by_domain_type),
    ):
        out.append(_raters_table(f"share of alive {unit}s by {title} [95% CI]", raters, pick))
    counts = Table(title=f"{unit}s labeled and cost by judge", title_justify="left")
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
        total += f" ({_dollars(summary.cost_per_labeled_usd)} per labeled {unit})"
    if summary.prices:
        total += f"; prices: {escape(summary.prices)}"
    out.append(total)
    undefined = [(j.rater, j.n_detection_undefined) for j in summary.judges
                 if j.n_detection_undefined]  # fmt: skip
    if undefined:
        n = sum(count for _, count in undefined)
        by_judge = ", ".join(f"{escape(rater)}: {count:,}" for rater, count in undefined)
        out.append(
            f"detection undefined for {plural(n, unit)} ({by_judge}): no non-activating "
            "(or no activating) examples to test the explanation on; shown as missing"
        )
    spreads = detection_spread_table(summary)
    if spreads is not None:
        out.append(spreads)
    out.extend(_agreement_parts(summary))
    if summary.steering is not None:
        steering = Table(
            title=f"output scores: {unit}s whose steering promotes the tokens they point at "
            "beyond random directions of their size",
            title_justify="left",
        )
        for column in ("final mechanism", "scored", "significant", "share"):
            steering.add_column(column, justify="right" if column != "final mechanism" else "left")
        for mechanism, share in summary.steering.by_mechanism.items():
            steering.add_row(
                mechanism, f"{share.n_scored:,}", f"{share.n_significant:,}",
                "-" if share.share is None else f"{share.share:.0%}",
            )  # fmt: skip
        out.append(steering)
    out.append(_disputes_and_reviews(summary))
    layers = Table(
        title=f"final labels by layer: alive and labeled {unit}s, labeled ones by category",
        title_justify="left",
    )
    for column in ("layer", "alive", "labeled", *CATEGORIES):
        layers.add_column(column, justify="right")
    for layer, by_category in final.by_layer.items():
        alive = summary.n_alive_by_layer.get(layer, 0)
        layers.add_row(
            layer,
            f"{alive:,}",
            f"{sum(by_category.values()):,}",
            *(f"{by_category[c]:,}" for c in CATEGORIES),
        )
    out.append(layers)
    if comparison is not None:
        out.append(comparison_table(comparison))
    return out


def _spread(s: Spread) -> str:
    if s.median is None or s.q1 is None or s.q3 is None:
        return "-"
    return f"{s.median:.2f} [{s.q1:.2f}, {s.q3:.2f}]"


def detection_spread_table(summary: RunSummary) -> Table | None:
    """Each judge's detection F1 and balanced accuracy: median [quartiles] by final
    category and by layer (within 80 columns); below it, where judges were scored by the
    fuzzing or intruder scorers, a second table of the fuzzing F1 and the intruder
    accuracy (against its chance), the two in one grid so the summary shows both."""
    from labeler.judges.scorers import INTRUDER_SIZE  # this function's alone

    judges = [j for j in summary.judges if j.detection_distribution is not None]
    if not judges:
        return None
    table = Table(
        title=f"detection F1 and balanced accuracy by judge: median [IQR] over {summary.unit}s",
        title_justify="left",
    )
    for column in ("judge", "final label", "n", "F1", "balanced acc."):
        table.add_column(column, justify="left" if column in ("judge", "final label") else "right")
    others = {"fuzz.f1": "fuzzing F1", "intruder.accuracy": "intruder acc."}
    scored = [j for j in judges if j.detection_distribution
              and set(others) & set(j.detection_distribution.by_metric)]  # fmt: skip
    extra = Table(
        title=f"fuzzing F1 and intruder accuracy by judge: median [IQR] over {summary.unit}s "
        f"(intruder chance: 1 in {INTRUDER_SIZE})",
        title_justify="left",
    )
    for column in ("judge", "final label", "n", *others.values()):
        extra.add_column(column, justify="left" if column in ("judge", "final label") else "right")
    for judge in judges:
        dist = judge.detection_distribution
        assert dist is not None
        groups = [
            *dist.by_category.items(),
            *((f"layer {la}", s) for la, s in dist.by_layer.items()),
        ]
        for i, (group, s) in enumerate(groups):
            table.add_row(
                escape(judge.rater) if i == 0 else "", group, f"{s.f1.n:,}",
                _spread(s.f1), _spread(s.balanced_accuracy),
                end_section=i == len(groups) - 1,
            )  # fmt: skip
        if judge not in scored:
            continue
        metrics = [dist.by_metric.get(name) for name in others]
        keys = [*(("by_category", c) for c in dist.by_category),
                *(("by_layer", la) for la in dist.by_layer)]  # fmt: skip
        for i, (by, key) in enumerate(keys):
            cells = [None if m is None else getattr(m, by)[key] for m in metrics]
            n = max((c.n for c in cells if c is not None), default=0)
            extra.add_row(
                escape(judge.rater) if i == 0 else "",
                key if by == "by_category" else f"layer {key}", f"{n:,}",
                *(_spread(c) if c is not None else "-" for c in cells),
                end_section=i == len(keys) - 1,
            )  # fmt: skip
    if not scored:
        return table
    both = Table.grid()
    both.add_row(table)
    both.add_row("")
    both.add_row(extra)
    return both


def _disputes_and_reviews(summary: RunSummary) -> str:
    d, rv = summary.disputes, summary.reviews
    reasons = ", ".join(f"{n:,} {k.replace('_', ' ')}" for k, n in d.by_reason.items())
    line = (
        f"disputed: {plural(d.n_disputed, summary.unit)} ({reasons or 'none'}); "
        f"{d.n_reviewed:,} decided by a person. "
    )
    if not rv.n_decisions and not rv.n_skips:
        return line + "Reviews: none yet"
    line += (
        f"Reviews by {plural(len(rv.reviewers), 'reviewer')}: "
        f"{plural(rv.n_decisions, 'decision')} on {plural(rv.n_features, summary.unit)}, "
        f"{plural(rv.n_skips, 'skip')}"
    )
    if rv.n_reviewers_disagree:
        line += f"; reviewers disagree on {plural(rv.n_reviewers_disagree, summary.unit)}"
    return line


def _agreement_parts(summary: RunSummary) -> list[Table | str]:
    report = summary.agreement
    unit = summary.unit
    if report is None:
        return ["agreement: a single rater, nothing to compare"]
    table = Table(title="agreement on the category", title_justify="left")
    for column in ("rater", "rater", f"{unit}s compared", "Cohen's kappa", "agreement"):
        table.add_column(column, justify="left" if column == "rater" else "right")
    pairs = [*report.pairs, *summary.judges_vs_humans]
    for pair in pairs:
        few = " *" if pair.small_sample else ""
        table.add_row(
            escape(pair.rater_a),
            escape(pair.rater_b),
            f"{pair.n:,}",
            _number(pair.kappa) + few,
            ("-" if pair.percent is None else f"{pair.percent:.1%}") + few,
        )
    alpha = _number(report.alpha)
    percent = "-" if report.percent is None else f"{report.percent:.1%}"
    n = report.n_compared
    overall = (
        f"all raters: Krippendorff's alpha (nominal) {alpha}, percent agreement {percent}, "
        f"over the {plural(n, unit)} labeled by two raters or more"
    )
    if report.small_sample:
        overall += f" (under {SMALL_N}: too few to rely on)"
    parts: list[Table | str] = [table, overall]
    if any(p.small_sample for p in pairs):
        parts.append(f"* fewer than {SMALL_N} {unit}s compared: too few to rely on")
    return parts


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


INPUT_COLUMNS = ("tokens\nin", "of them\ncached")
"""The input columns of the status and the dry run's tables, counted the same way: every
input token (read from the provider's cache, written to it, or neither), then how many of
them were read from the cache ("of them": they are part of the first)."""


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
    for column in ("judge", "calls", *INPUT_COLUMNS, "tokens\nout", "cost", "per\nlabeled"):
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
            f"{u.total_input:,}",
            f"{u.cached_tokens:,}",
            f"{u.output_tokens:,}",
            _dollars(s.cost_usd),
            _dollars(s.cost_per_labeled_usd),
        )
    unanswered = sum(s.unanswered_calls for s in statuses)
    if unanswered:
        spending.caption = (
            f"includes {unanswered:,} calls a stopped labeler sent and never heard back "
            "from (billed; their tokens and cost estimated)"
        )
        spending.caption_justify = "left"
    return [progress, spending]


def batches_table(batches: list[Submission], now: float) -> Table:
    """Provider batches not ended: what each holds, how far it is, how old."""
    table = Table(title="batches in flight at the providers", title_justify="left")
    for column in ("judge", "batch", "state", "requests", "done", "age"):
        table.add_column(column, justify="right" if column in ("requests", "done", "age")
                         else "left", overflow="fold", no_wrap=column == "batch")  # fmt: skip
    for b in batches:
        counts = b.counts
        done = counts.get("completed", 0) + counts.get("failed", 0) or (
            counts.get("succeeded", 0) + counts.get("errored", 0) + counts.get("expired", 0)
            + counts.get("canceled", 0)
        )  # fmt: skip
        state = b.provider_status or ("being submitted" if b.state == "submitting" else b.state)
        table.add_row(escape(b.judge), escape(b.batch_id or "-"), escape(state),
                      f"{b.n_requests:,}", f"{done:,}", _duration(now - b.made_at))  # fmt: skip
    return table


def compact_count(n: int) -> str:
    """A count in at most 6 characters: exact below 10,000, else three significant
    digits with k, M or B (thousand, million, billion)."""
    if n < 10_000:
        return f"{n:,}"
    value = float(n)
    for suffix in ("k", "M", "B"):
        value = float(f"{value / 1000:.3g}")
        if value < 1000 or suffix == "B":
            digits = 2 if value < 10 else 1 if value < 100 else 0
            return f"{value:.{digits}f}{suffix}"
    raise AssertionError("unreachable")


def estimate_table(estimates: list[Estimate]) -> Table:
    """What a dry run would send, per judge. Fits an 80-column terminal: token counts are
    compact, the numbers and dollars never wrap or shorten, a long judge name folds."""
    typical = any(not e.output_measured and e.output_tokens for e in estimates)
    unpriced = any(e.cost_usd is None for e in estimates)
    notes = [
        *(["* output tokens: a typical count per call, none measured on this run yet"]
          if typical else []),
        *(["unpriced: the model is not in the price table; give its prices with --prices"]
          if unpriced else []),
        *(["batch dollars: with --executor batch (replies within 24 h); -: no batch API"]
          if any(e.batch_cost_usd is not None for e in estimates) else []),
    ]  # fmt: skip
    table = Table(
        title="estimate (nothing sent)",
        title_justify="left",
        caption="\n".join(notes) or None,
        caption_justify="left",
    )
    table.add_column("judge", overflow="fold", min_width=9)
    for column in ("features", "calls", *INPUT_COLUMNS, "tokens\nout", "dollars",
                   "batch\ndollars"):  # fmt: skip
        table.add_column(column, justify="right", no_wrap=True)
    for e in estimates:
        guessed = not e.output_measured and e.output_tokens
        table.add_row(
            escape(e.judge),
            f"{e.features:,}",
            f"{e.calls:,}",
            compact_count(e.input_tokens + e.cached_tokens),
            compact_count(e.cached_tokens),
            compact_count(e.output_tokens) + ("*" if guessed else ""),
            "unpriced" if e.cost_usd is None else _dollars(e.cost_usd),
            "-" if e.batch_cost_usd is None else _dollars(e.batch_cost_usd),
        )
    return table


def output_score_table(scores: list[OutputScore], top: int) -> Table:
    """The ``top`` features by lens change (the statistic judged against random
    directions), most first: its p-value, whether significant, the tokens it promotes."""
    ranked = sorted(scores, key=lambda s: (-s.lens_change, s.feature_id))[:top]
    table = Table(
        title=f"top {len(ranked)} of {len(scores):,} features by lens change",
        title_justify="left",
        caption="lens change: mean change in log-probability of the feature's logit-lens "
        "tokens when it is steered; KL: of the next-token distribution",
        caption_justify="left",
    )
    table.add_column("feature", no_wrap=True)
    for column in ("lens\nchange", "KL", "p", "significant"):
        table.add_column(column, justify="right", no_wrap=True)
    table.add_column("promotes", overflow="fold")
    for s in ranked:
        promoted = ", ".join(escape(t.strip() or repr(t)) for t in s.promoted[:3])
        table.add_row(s.feature_id, f"{s.lens_change:.3f}", f"{s.kl:.3f}", f"{s.p_value:.3g}",
                      "yes" if s.significant else "no", promoted)  # fmt: skip
    return table


def queue_table(queue: list[QueueItem]) -> Table:
    """The review queue: audited features first (why: their place in the audit; the
    judges' votes of one nobody has decided are not shown), then disputed ones."""
    audited = any(q.audit is not None for q in queue)
    title = ("audited features in audit order, then disputed ones, most informative first"
             if audited else "disputed features, most informative first")  # fmt: skip
    table = Table(title=title, title_justify="left")
    for column in ("feature", "score", "why", "judges", "lowest detection", "decided by"):
        table.add_column(
            column, justify="right" if column in ("score", "lowest detection") else "left"
        )
    for q in queue:
        blind = q.audit is not None and not q.decided_by
        detection = "-" if q.min_detection is None or blind else f"{q.min_detection:.2f}"
        reasons = [r for r in q.reasons if r != "audit"]
        why = [escape(q.audit)] if q.audit is not None else []
        table.add_row(
            q.feature_id,
            f"{q.score:.2f}",
            ", ".join(why if blind else [*why, *reasons]),
            "(hidden until decided)" if blind else escape("; ".join(q.categories)),
            detection,
            escape(", ".join(q.decided_by)),
        )
    return table
