"""The ``labeler`` command group, its shared consoles and helpers, and the entry point.
Commands live in one module per group (collect, label, report, review, demo); each
imports its heavy modules (torch, transformers, polars) only inside the command."""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import click
from rich.console import Console

from labeler.errors import UserError

console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)

DEMO_MARKER = ".labeler-demo"

log = logging.getLogger("labeler.cli")


def _layers(value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        return sorted({int(v) for v in value.split(",") if v.strip()})
    except ValueError as exc:
        raise click.BadParameter(f"{value!r}: expected comma-separated layer numbers") from exc


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("transcoder-labeler")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


_verbose = False

LIBRARY_LOGGERS = ("matplotlib", "PIL", "urllib3", "httpx", "httpcore", "filelock", "openai",
                   "anthropic", "asyncio", "fsspec", "huggingface_hub", "transformers",
                   "celery", "kombu", "redis", "multipart", "uvicorn")  # fmt: skip
"""Third-party loggers kept at WARNING under ``-v`` (their debug lines drown ours);
``-vv`` lets them through."""


def _configure_logging(verbosity: int) -> None:
    """Our loggers at INFO under ``-v``, everyone's at DEBUG under ``-vv``; the choice of
    torch threads (``adapters.threads``) said as a plain line."""
    level = logging.WARNING if verbosity == 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    logging.basicConfig(
        level=level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for name in LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING if verbosity < 2 else logging.NOTSET)
    threads = logging.getLogger("adapters.threads")
    for handler in [h for h in threads.handlers if h.get_name() == "plain"]:
        threads.removeHandler(handler)
    threads.propagate = verbosity > 0
    if verbosity == 0:  # a plain line, not a log record
        plain = logging.StreamHandler(sys.stderr)
        plain.set_name("plain")
        plain.setFormatter(logging.Formatter("%(message)s"))
        threads.addHandler(plain)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "-v",
    "--verbose",
    count=True,
    help="Log what happens (to stderr), with each step's time; on an unexpected error, its "
    "traceback. -vv: also the libraries' own debug lines (matplotlib, PIL, httpx, ...).",
)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    metavar="N",
    help="Torch threads of a command that loads a model (same as LABELER_THREADS=N); "
    "default: OMP_NUM_THREADS if set, else the cores not busy with other work.",
)
@click.version_option(_version(), "--version", prog_name="labeler", message="%(prog)s %(version)s")
@click.pass_context
def cli(ctx: click.Context, verbose: int, threads: int | None) -> None:
    """Label the features of transcoder adapters.

    \b
    Pipeline:  collect -> label -> summarize -> export
      labeler collect --adapter CKPT --corpus traces.jsonl --out RUN
      labeler label RUN --judge heuristic [--sample-per-layer 250]
      labeler label RUN --judge openai:gpt-5-mini --dry-run    (then without it)
      labeler status RUN
      labeler disputes RUN
      labeler review RUN --reviewer NAME [--web]
      labeler browse RUN                     (every feature: search, filter, open)
      labeler summarize RUN [--json] [--compare OTHER_RUN]
      labeler export RUN [--with-examples] [--out catalog.jsonl.gz]
      labeler export RUN --format delphi       (delphi's explanations and scores)
    The headline number with the judges' error in its interval:
      labeler audit RUN --n 100                (people decide these first, blind)
      labeler export RUN --format gold         (their decisions, for another run)
      labeler import-gold OTHER_RUN RUN/gold.jsonl
    Publish on Neuronpedia:
      labeler export RUN --format neuronpedia --model-id ID --source-set NAME
      labeler push-neuronpedia RUN/neuronpedia          (key in NEURONPEDIA_API_KEY)
    Test labels causally:
      labeler intervene RUN --prompts P.jsonl --select mechanism=output [--teacher-forced]
      labeler score-outputs RUN
    Or all of it on a planted tiny model, offline:  labeler demo
    A random adapter of your model's shape, to try the pipeline:
      labeler make-adapter --out DIR [--like HUB_ID | --arch llama --layers N --d-model D]
    From Python: labeler.open_run, labeler.label, labeler.study (docs/python.md)
    """
    global _verbose
    _verbose = verbose > 0
    _configure_logging(verbose)
    if threads is not None:
        os.environ["LABELER_THREADS"] = str(threads)  # read where the model loads
    command, started = ctx.invoked_subcommand, time.monotonic()
    log.info("labeler %s %s: started", _version(), command)
    ctx.call_on_close(
        lambda: log.info("%s: finished in %.1f s", command, time.monotonic() - started)
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


def check_output(target: Path, overwrite: bool) -> None:
    """The one policy for every output a command writes: an existing one is refused
    unless ``--overwrite``; missing parent folders are created."""
    if target.exists() and not overwrite:
        raise UserError(f"{target}: already exists; pass --overwrite to replace it, "
                        "or choose another --out")  # fmt: skip
    for parent in reversed(target.parents):
        if parent.exists() and not parent.is_dir():
            raise UserError(f"{target}: cannot be written, {parent} is a file, not a folder")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except PermissionError as exc:
        raise UserError(f"{target}: cannot create its folder ({exc.strerror})") from exc


_RULES_HELP = ("JSON file of dispute rules: judges_disagree, low_confidence, min_detection, "
               "heuristic_outvoted (docs/review.md).")  # fmt: skip


def main() -> None:
    """The entry point: every error ends as one line on stderr and a non-zero exit
    (``labeler.cli.guard``); Ctrl-C exits 130."""
    from labeler.labeling.interrupts import EXIT_INTERRUPTED, Interrupted

    try:
        code = cli.main(standalone_mode=False)
    except (click.exceptions.Abort, KeyboardInterrupt):
        err_console.print("interrupted")
        sys.exit(EXIT_INTERRUPTED)
    except Interrupted:
        err_console.print("interrupted while waiting for the run's lock; nothing was done")
        sys.exit(EXIT_INTERRUPTED)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except SystemExit:
        raise
    except BaseException as exc:
        from labeler.cli.guard import report

        sys.exit(report(exc, _verbose))
    sys.exit(code if isinstance(code, int) else 0)
