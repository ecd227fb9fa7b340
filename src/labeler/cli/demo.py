"""``labeler demo``: the whole pipeline on a planted tiny model, offline."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import click

from adapters.errors import UserError
from labeler.cli.app import (
    DEMO_MARKER,
    cli,
    console,
)
from labeler.cli.collect import _collect
from labeler.cli.label import _label
from labeler.cli.report import _export, _summarize


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
    _label(run_path, ("heuristic",), None, 8, seed)
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
