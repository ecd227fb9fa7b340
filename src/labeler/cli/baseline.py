"""``labeler baseline``: a control run of a run, to read its scores against
(docs/baseline.md)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import click

from labeler.cli.app import cli, err_console
from labeler.errors import UserError

if TYPE_CHECKING:
    from rich.console import RenderableType

    from collectors.run_format import RunInfo
    from labeler.reporting.baseline_compare import BaselineComparison
    from labeler.reporting.score_distributions import Spread


@cli.command()
@click.argument("run_path", metavar="RUN", type=click.Path(path_type=Path))
@click.option("--out", "base", required=True, type=click.Path(path_type=Path),
              help="The baseline run folder to write (or to resume).")  # fmt: skip
@click.option("--judge", "judges", multiple=True, default=(),
              help="Judges of the baseline's sample (default: the judges that labeled RUN); "
                   "repeat for several.")  # fmt: skip
@click.option(
    "--scorers",
    default="detection,fuzz,intruder",
    show_default=True,
    metavar="LIST",
    help="Scorers of the baseline's judgments (as `labeler label --scorers`).",
)
@click.option("--sample-per-layer", type=click.IntRange(min=1), default=50, show_default=True,
              help="Control features labeled per layer.")  # fmt: skip
@click.option("--seed", default=0, show_default=True,
              help="Seed of the control's directions and pairing, its calibration slice and "
                   "the labeled sample.")  # fmt: skip
@click.option("--calibration-tokens", type=click.IntRange(min=1), default=32768,
              show_default=True,
              help="Corpus tokens the control's firing rates are set on.")  # fmt: skip
@click.option("--checkpoint-every", type=int, default=None, metavar="N",
              help="Checkpoint the collection every N sequences; rerun to resume.")  # fmt: skip
@click.option("--base-url", default=None,
              help="OpenAI-compatible server of an openai:MODEL judge.")  # fmt: skip
@click.option("--device", default="auto", type=click.Choice(["auto", "cpu", "cuda"]),
              show_default=True)  # fmt: skip
@click.option("--dtype", default="auto", type=click.Choice(["auto", "float32", "bfloat16"]),
              show_default=True, help="auto: bfloat16 on GPU, float32 on CPU.")  # fmt: skip
def baseline(
    run_path: Path,
    base: Path,
    judges: tuple[str, ...],
    scorers: str,
    sample_per_layer: int,
    seed: int,
    calibration_tokens: int,
    checkpoint_every: int | None,
    base_url: str | None,
    device: str,
    dtype: str,
) -> None:
    """Make a control run of RUN: the same model with a random adapter whose features
    fire as often as RUN's (per layer, quantile for quantile), collected over RUN's
    corpus with RUN's options, and a sample labeled as RUN was. Then
    `labeler summarize RUN --baseline BASE` reads RUN's scores against it.

    \b
    Why: features of random networks score close to trained ones (Heap et al. 2025,
    arXiv 2501.17727); a score means something only above its control's.
    Rerun the same command to resume; a finished collection is kept.
    """
    from collectors.run_format import read_run_info
    from labeler.baseline import run as steps
    from labeler.judges.base import JudgeOptions
    from labeler.judges.scorers import parse_scorers
    from labeler.labeling.request import LabelingRequest

    started = time.monotonic()
    info = read_run_info(run_path)
    if (run_path / steps.BASELINE_JSON).exists():
        raise UserError(f"{run_path}: is itself a baseline run; name the run it controls")
    judges = judges or tuple(steps.run_judges(run_path))
    if not judges:
        raise UserError(f"{run_path}: no labels to take the judges from; label RUN first or "
                        "pass --judge")  # fmt: skip
    options = JudgeOptions(
        base_url=base_url, openai_api="chat" if base_url else "responses", seed=seed,
        scorers=parse_scorers(scorers), device=device, dtype=dtype,
    )  # fmt: skip
    request = LabelingRequest(judges=judges, options=options,
                              sample_per_layer=sample_per_layer, seed=seed)  # fmt: skip
    request.check("local")
    if (base / steps.BASELINE_JSON).is_file():
        made = steps.read_baseline(base)
        if Path(made.control_of) != run_path.resolve():
            raise UserError(f"{base / steps.BASELINE_JSON}: field 'control_of' is "
                            f"{made.control_of}, not {run_path.resolve()}; choose another "
                            "--out")  # fmt: skip
        err_console.print(f"{base}: collected already; labeling its sample")
    else:
        _collect_control(run_path, info, base, seed, calibration_tokens, checkpoint_every,
                         device, dtype)  # fmt: skip
    built = time.monotonic() - started
    from labeler.cli.label import _label

    _label(base, "local", request, dry_run=False)
    err_console.print(
        f"baseline {base}: control of {run_path}, built in {built:.0f} s, labeled in "
        f"{time.monotonic() - started - built:.0f} s. Next:\n"
        f"  labeler summarize {run_path} --baseline {base}",
        highlight=False,
    )


def _collect_control(
    run_path: Path,
    info: RunInfo,
    base: Path,
    seed: int,
    calibration_tokens: int,
    checkpoint_every: int | None,
    device: str,
    dtype: str,
) -> None:
    """Build (or reuse) the control checkpoint, collect it into BASE, finish BASE."""
    from collectors.run_format import RUN_JSON
    from labeler.baseline import run as steps
    from labeler.cli.collect import _collect

    control = steps.control_folder(base)
    if base.exists() and not (base / RUN_JSON).is_file():
        raise UserError(f"{base}: exists and is not a baseline run (no {steps.BASELINE_JSON}); "
                        "choose another --out")  # fmt: skip
    steps.check_sources(run_path, info)
    if not base.exists():
        record = steps.read_control(control, seed, calibration_tokens)
        if record is None:
            with err_console.status("building the control adapter"):
                step = time.monotonic()
                steps.build_control_checkpoint(run_path, info, control, seed,
                                               calibration_tokens, device, dtype)  # fmt: skip
            err_console.print(f"control adapter: built in {time.monotonic() - step:.0f} s "
                              f"({control})", highlight=False)  # fmt: skip
        else:
            err_console.print(f"control adapter: reusing {control}", highlight=False)
        _collect(str(control), Path(info.corpus_path), base, info.params, device, dtype,
                 False, checkpoint_every=checkpoint_every)  # fmt: skip
    elif not control.is_dir():
        raise UserError(f"{base}: collected but not finished, and its control adapter "
                        f"{control} is gone; delete {base} and run again")  # fmt: skip
    record = steps.read_control(control, seed, calibration_tokens)
    if record is None:
        raise UserError(f"{control}: incomplete control adapter; delete it and {base}, and "
                        "run again")  # fmt: skip
    steps.finish(base, run_path, info, record)


def against_baseline(run_path: Path, base: Path) -> BaselineComparison:
    """RUN's scores against BASE's (``summarize --baseline``): a
    :class:`~labeler.reporting.baseline_compare.BaselineComparison`."""
    from collectors.run_format import read_run_info
    from labeler.baseline.run import read_baseline
    from labeler.cli.app import _open_labels
    from labeler.reporting.baseline_compare import compare_with_baseline

    made = read_baseline(base)
    read_run_info(base)
    if Path(made.control_of) != run_path.resolve():
        err_console.print(f"note: {base} is a control of {made.control_of}, not of {run_path}",
                          highlight=False)  # fmt: skip
    run_store, base_store = _open_labels(run_path), _open_labels(base)
    try:
        return compare_with_baseline(run_store, base_store, base, made.control_of, run_path)
    finally:
        run_store.close()
        base_store.close()


def baseline_table(comparison: BaselineComparison) -> RenderableType:
    """The comparison as a table, one row per judge and scorer (its headline score:
    ``score_values.HEADLINE``; summary.json holds every score), and its verdict."""
    from rich import box
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    from labeler.judges.score_values import HEADLINE

    judges = {row.judge for row in comparison.metrics}
    table = Table(
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        collapse_padding=True,
        title=f"scores against the baseline {comparison.baseline}",
    )
    if len(judges) > 1:
        table.add_column("judge")
    table.add_column("score", no_wrap=True)
    table.add_column("run [IQR]", justify="right", no_wrap=True)
    table.add_column("baseline", justify="right", no_wrap=True)
    table.add_column("reach p95", justify="right", no_wrap=True)
    table.add_column("reasoning", justify="right", no_wrap=True)

    def cell(s: Spread) -> str:
        if s.median is None or s.q1 is None or s.q3 is None:
            return "-"
        return f"{s.median:.2f} [{s.q1:.2f}, {s.q3:.2f}]"

    shown = [row for row in comparison.metrics if row.metric in HEADLINE]
    for row in shown or comparison.metrics:
        share = f"{row.share_reach:.0%} vs {row.baseline_share_reach:.0%}"
        share += "" if row.separates else " ~"
        reasoning = "-" if row.reasoning_among_reach is None else f"{row.reasoning_among_reach:.1%}"
        cells = [row.metric, cell(row.run), cell(row.baseline), share, reasoning]
        table.add_row(*([row.judge] if len(judges) > 1 else []), *cells)
    lines = [r.sentence for r in comparison.metrics if r.metric in HEADLINE]
    notes = "\n".join(
        [
            "medians [IQR]; reach p95: the run's share at or above the baseline's 95th "
            "percentile, vs the baseline's own; reasoning: among those; ~: no more of the "
            "run reaches it than of the baseline; every score: summary.json",
            *lines,
            comparison.verdict,
        ]
    )
    return Group(table, Text(notes))
