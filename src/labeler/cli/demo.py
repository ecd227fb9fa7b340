"""``labeler demo``: the whole pipeline on a planted tiny model, offline."""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import click

from labeler.cli.app import (
    DEMO_MARKER,
    cli,
    console,
)
from labeler.cli.collect import _collect
from labeler.cli.label import _label
from labeler.cli.report import _export, _summarize
from labeler.errors import UserError

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _phase(name: str, times: dict[str, float]) -> Iterator[None]:
    """Time one phase of the demo and log it (``labeler -v demo``)."""
    start = time.monotonic()
    yield
    times[name] = time.monotonic() - start
    log.info("demo phase %s: %.1f s", name, times[name])


@cli.command()
@click.option("--out", type=click.Path(path_type=Path), default=Path("demo-run"),
              show_default=True, help="Folder for everything the demo makes.")  # fmt: skip
@click.option("--seed", default=0, show_default=True)
@click.option("--rebuild", is_flag=True,
              help="Build the planted model anew even if the cache holds it.")  # fmt: skip
def demo(out: Path, seed: int, rebuild: bool) -> None:
    """Build a planted tiny model and corpus, then collect, label, summarize and export,
    and compare the labels with the planted ground truth. Offline, CPU.

    The planted model is built once per seed and version (about a minute on 2 cores)
    and reused from the folder planted-demo of the cache: $LABELER_DEMO_CACHE, else
    $XDG_CACHE_HOME/transcoder-labeler, else ~/.cache/transcoder-labeler. An entry that
    does not match its manifest is said and built anew. The demo then takes seconds."""
    from collectors.demo_cache import demo_inputs
    from collectors.run_format import CollectParams
    from labeler.cli.render import ground_truth_table
    from labeler.labeling.store import LabelStore
    from labeler.reporting.ground_truth import compare_with_ground_truth

    started = time.monotonic()
    if out.exists():
        if not (out / DEMO_MARKER).exists():
            raise UserError(f"{out}: exists and is not a demo folder; choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / DEMO_MARKER).write_text("made by `labeler demo`; replaced on the next run\n")
    times: dict[str, float] = {}
    with _phase("planted model", times), console.status("preparing the planted model"):
        inputs = demo_inputs(out / "inputs", seed=seed, rebuild=rebuild)
    if inputs.problem is not None:
        console.print(f"planted model cache: {inputs.problem}; built anew", highlight=False)
    if inputs.entry is None:
        console.print(f"planted model: built in {times['planted model']:.0f} s (not cached)")
    elif inputs.built:
        console.print(f"planted model: built in {times['planted model']:.0f} s, cached in "
                      f"{inputs.entry}", highlight=False)  # fmt: skip
    else:
        console.print(f"planted model: reused from {inputs.entry} (built {inputs.built_at})",
                      highlight=False)  # fmt: skip
    paths = inputs.paths
    run_path = out / "run"
    with _phase("collect", times):
        _collect(str(paths.checkpoint), paths.corpus, run_path, CollectParams(seed=seed),
                 "cpu", "float32", False)  # fmt: skip
    from labeler.labeling.request import LabelingRequest

    with _phase("label", times):
        request = LabelingRequest(judges=("heuristic",), seed=seed)
        _label(run_path, "local", request, dry_run=False)
    with _phase("summarize", times):
        _summarize(run_path, False, None)
    with _phase("export", times):
        _export(run_path, None, True)
    store = LabelStore(run_path / "labels.sqlite")
    try:
        report = compare_with_ground_truth(paths.ground_truth, store, "heuristic")
    finally:
        store.close()
    (out / "ground_truth_report.json").write_text(report.model_dump_json(indent=2) + "\n")
    for part in ground_truth_table(report):
        console.print(part)
    total = time.monotonic() - started
    log.info("demo phases: %s; total %.1f s",
             ", ".join(f"{k} {v:.1f} s" for k, v in times.items()), total)  # fmt: skip
    console.print(f"demo finished in {total:.0f} s; everything is in {out}")
    console.print(next_steps(run_path), highlight=False)


def next_steps(run: Path) -> str:
    """What to try after the demo, on its run folder, one command a line."""
    labeler = _how_to_call()
    steps = (
        (f"{labeler} summarize {run}", "the share of reasoning features, again"),
        (f"open {run}/summary.png", "the shares by layer, as a plot"),
        (f"{labeler} disputes {run}", "the labels worth a second look"),
        (f"{labeler} review {run} --reviewer YOU", "review them here (--web: in a browser)"),
        (
            f"{labeler} browse {run} --model",
            "every feature in the browser: search, filter, open; try a prompt",
        ),
        (f"{labeler} export {run} --out my.jsonl", "a catalog of your own"),
        (
            f"{labeler} intervene {run} --teacher-forced --select mechanism=output",
            "ablate the output features: does the model stop saying 'Wait'?",
        ),
        (f"{labeler} label {run} --judge openai:gpt-5-mini --dry-run", "an LLM judge's cost"),
    )
    return "next:\n" + "\n".join(f"  {command}\n      {what}" for command, what in steps)


def _how_to_call() -> str:
    """``labeler`` when it is on PATH, else the path of this one (a fresh shell after
    ``make`` has no activated virtual environment)."""
    import shutil as sh
    import sys

    here = Path(sys.argv[0])
    found = sh.which("labeler")
    if found is not None and Path(found).resolve() == here.resolve():
        return "labeler"
    if here.name == "labeler" and here.exists():
        return sys.argv[0]  # as it was typed: `.venv/bin/labeler`
    return "labeler"
