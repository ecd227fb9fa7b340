"""``labeler demo``: the whole pipeline on a planted tiny model, offline."""

from __future__ import annotations

import shutil
import time
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


@cli.command()
@click.option("--out", type=click.Path(path_type=Path), default=Path("demo-run"),
              show_default=True, help="Folder for everything the demo makes.")  # fmt: skip
@click.option("--seed", default=0, show_default=True)
def demo(out: Path, seed: int) -> None:
    """Build a planted tiny model and corpus, then collect, label, summarize and export,
    and compare the labels with the planted ground truth. Offline, CPU, about a minute."""
    from collectors.demo_model import build_demo
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
    with console.status("building the planted model, tokenizer and corpus"):
        paths = build_demo(out / "inputs", seed=seed)
    console.print(f"built {paths.checkpoint} and {paths.corpus}")
    run_path = out / "run"
    _collect(str(paths.checkpoint), paths.corpus, run_path, CollectParams(seed=seed), "cpu",
             "float32", False)  # fmt: skip
    from labeler.labeling.request import LabelingRequest

    _label(run_path, "local", LabelingRequest(judges=("heuristic",), seed=seed), dry_run=False)
    _summarize(run_path, False, None)
    _export(run_path, None, True)
    store = LabelStore(run_path / "labels.sqlite")
    try:
        report = compare_with_ground_truth(paths.ground_truth, store, "heuristic")
    finally:
        store.close()
    (out / "ground_truth_report.json").write_text(report.model_dump_json(indent=2) + "\n")
    for part in ground_truth_table(report):
        console.print(part)
    console.print(f"demo finished in {time.monotonic() - started:.0f} s; everything is in {out}")
    console.print(next_steps(run_path), highlight=False)


def next_steps(run: Path) -> str:
    """What to try after the demo, on its run folder, one command a line."""
    labeler = _how_to_call()
    steps = (
        (f"{labeler} summarize {run}", "the share of reasoning features, again"),
        (f"open {run}/summary.png", "the shares by layer, as a plot"),
        (f"{labeler} disputes {run}", "the labels worth a second look"),
        (f"{labeler} review {run} --reviewer YOU", "review them here (--web: in a browser)"),
        (f"{labeler} browse {run}", "every feature in the browser: search, filter, open"),
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
