"""The ``labeler`` command group, its shared consoles and helpers, and the entry point.
Commands live in one module per group (collect, label, report, review, demo); each
imports its heavy modules (torch, transformers, polars) only inside the command."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import click
from rich.console import Console

from adapters.errors import UserError

console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)

DEMO_MARKER = ".labeler-demo"


def _layers(value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        return sorted({int(v) for v in value.split(",") if v.strip()})
    except ValueError as exc:
        raise click.BadParameter(f"{value!r}: expected comma-separated layer numbers") from exc


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Log what happens (to stderr).")
def cli(verbose: bool) -> None:
    """Label the features of transcoder adapters.

    \b
    Pipeline:  collect -> label -> summarize -> export
      labeler collect --adapter CKPT --corpus traces.jsonl --out RUN
      labeler label RUN --judge heuristic [--sample-per-layer 250]
      labeler label RUN --judge openai:gpt-5-mini --dry-run    (then without it)
      labeler status RUN
      labeler disputes RUN
      labeler review RUN --reviewer NAME [--web]
      labeler summarize RUN [--json] [--compare OTHER_RUN]
      labeler export RUN [--with-examples] [--out catalog.jsonl.gz]
    Or all of it on a planted tiny model, offline:  labeler demo
    """
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from labeler.redaction import redact_handlers

    redact_handlers()


def _open_labels(run_path: Path) -> Any:
    """The run's label store; an error saying what to do when nothing is labeled yet."""
    from labeler.labeling.store import LabelStore

    store_path = run_path / "labels.sqlite"
    if not store_path.exists():
        raise UserError(f"{run_path}: no labels yet; run `labeler label {run_path}` first")
    return LabelStore(store_path)


_RULES_HELP = ("JSON file of dispute rules: judges_disagree, low_confidence, min_detection, "
               "heuristic_outvoted (docs/review.md).")  # fmt: skip


def main() -> None:
    from labeler.labeling.interrupts import EXIT_INTERRUPTED, Interrupted

    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        err_console.print("aborted")
        sys.exit(130)
    except Interrupted:
        err_console.print("interrupted while waiting for the run's lock; nothing was done")
        sys.exit(EXIT_INTERRUPTED)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except UserError as exc:
        from labeler.redaction import redact

        err_console.print("[bold red]error:[/bold red] ", end="", highlight=False)
        err_console.print(redact(str(exc)), markup=False, highlight=False)
        sys.exit(2)
