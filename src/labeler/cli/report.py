"""``labeler summarize`` and ``labeler export``."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from adapters.outputs import replacing, write_text_atomic
from labeler.cli.app import (
    _RULES_HELP,
    _open_labels,
    check_output,
    cli,
    console,
)
from labeler.errors import UserError


def _summarize(
    run_path: Path,
    as_json: bool,
    plot: Path | None,
    compare_with: Path | None = None,
    rules_path: Path | None = None,
    baseline: Path | None = None,
) -> Any:
    from collectors.run_format import read_run_info
    from labeler.cli.render import summary_tables
    from labeler.reporting.agreement_plot import plot_agreement
    from labeler.reporting.disputes import DisputeRules
    from labeler.reporting.plots import plot_comparison, plot_layers
    from labeler.reporting.summarize import compare, summarize

    rules = DisputeRules.load(rules_path)

    def load(folder: Path) -> Any:
        info = read_run_info(folder)
        store = _open_labels(folder)
        try:
            return summarize(store, info, str(folder), rules)
        finally:
            store.close()

    summary = load(run_path)
    if baseline is not None:
        from labeler.cli.baseline import against_baseline

        summary.baseline = against_baseline(run_path, baseline)
    other = load(compare_with) if compare_with is not None else None
    comparison = compare(summary, other) if other is not None else None
    write_text_atomic(run_path / "summary.json", summary.model_dump_json(indent=2) + "\n")
    plot_path = plot or run_path / "summary.png"
    if plot is not None:
        check_output(plot_path, overwrite=True)  # its folder made; a plot is redrawn
    plots = [plot_path]
    with replacing(plot_path) as tmp:
        plot_layers(summary, tmp)
    if summary.agreement is not None:
        plots.append(plot_path.with_name(plot_path.stem + "-agreement.png"))
        with replacing(plots[-1]) as tmp:
            plot_agreement(summary.agreement, tmp)
    if summary.audit is not None and summary.audit.reasoning is not None:
        from labeler.reporting.audit_plot import plot_audit

        plots.append(plot_path.with_name(plot_path.stem + "-audit.png"))
        with replacing(plots[-1]) as tmp:
            plot_audit(summary.audit, summary.run, summary.unit, tmp)
    if other is not None:
        plots.append(plot_path.with_name(plot_path.stem + "-compare.png"))
        with replacing(plots[-1]) as tmp:
            plot_comparison(summary, other, tmp)
    if as_json:
        data = summary.model_dump(mode="json")
        if comparison is not None:
            data["comparison"] = comparison.model_dump(mode="json")
        click.echo(json.dumps(data, indent=2))
    else:
        for part in summary_tables(summary, comparison):
            console.print(part)
        if summary.baseline is not None:
            from labeler.cli.baseline import baseline_table

            console.print(baseline_table(summary.baseline))
        console.print(f"plots: {', '.join(map(str, plots))}; JSON: {run_path / 'summary.json'}")
    return summary


@cli.command()
@click.argument("run_path", metavar="RUN", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--plot", type=click.Path(path_type=Path), default=None,
              help="Where to write the PNG of shares by layer (default RUN/summary.png); the "
                   "agreement and comparison plots go beside it.")  # fmt: skip
@click.option("--compare", "compare_with", metavar="OTHER_RUN", default=None,
              type=click.Path(path_type=Path),
              help="Compare the final labels with another run's (say, the neuron "
                   "baseline).")  # fmt: skip
@click.option("--rules", "rules_path", type=click.Path(path_type=Path), default=None,
              help=_RULES_HELP)  # fmt: skip
@click.option("--baseline", "baseline", metavar="BASE", default=None,
              type=click.Path(path_type=Path),
              help="Read the scores against a control run (`labeler baseline`; "
                   "docs/baseline.md).")  # fmt: skip
def summarize(run_path: Path, as_json: bool, plot: Path | None, compare_with: Path | None,
              rules_path: Path | None, baseline: Path | None) -> None:  # fmt: skip
    """The share of reasoning features among all alive features with its 95% CI (each
    layer's sample weighted by its alive features), the breakdown by category, for the
    final labels and each judge side by side; judge and human agreement; disputes; cost.

    \b
    Final labels: a person's decision, else the judges' consensus, else one judge.
    These intervals take the judges' labels as right; after `labeler audit` and
    people's decisions, the audited shares beside them include the judges' error,
    with the judges' precision and recall (docs/audit.md).
    Writes RUN/summary.json and PNG plots (shares by layer; agreement; audit;
    comparison).
    """
    _summarize(run_path, as_json, plot, compare_with, rules_path, baseline)


# polars' bundled allocator (jemalloc) gives freed memory back to the kernel within a
# second; an export frees and reallocates about a gigabyte per layer, which the kernel
# then faults back in page by page, a quarter of the export's CPU time. Keeping freed
# pages for 5 s instead costs about 0.7 GB at the peak and saves about 7% of the time
# (BENCHMARKS.md). Read when polars loads, so set before it is imported; a value the
# user has set wins.
EXPORT_ALLOCATOR = ("_RJEM_MALLOC_CONF", "dirty_decay_ms:5000,muzzy_decay_ms:5000")


def _export(run_path: Path, out: Path | None, with_examples: bool,
            rules_path: Path | None = None, gzip_level: int = 1,
            overwrite: bool = False) -> Path:  # fmt: skip
    os.environ.setdefault(*EXPORT_ALLOCATOR)
    from labeler.cli.render import progress_bar
    from labeler.formats.catalog import export_catalog
    from labeler.reporting.disputes import DisputeRules
    from labeler.reporting.label_table import planned_frame
    from labeler.run.data import RunData

    rules = DisputeRules.load(rules_path)
    run = RunData.open(run_path)
    target = out or run_path / "catalog.jsonl"
    if not target.name.endswith((".jsonl", ".jsonl.gz")):
        raise UserError(f"--out {target}: the catalog is written as .jsonl or .jsonl.gz")
    check_output(target, overwrite)
    store = _open_labels(run_path)
    try:
        with progress_bar(console, "exporting", "features") as progress:
            task = progress.add_task("exporting", total=planned_frame(store).height)
            n = export_catalog(run, store, target, with_examples, rules,
                               progress=lambda k: progress.advance(task, k),
                               gzip_level=gzip_level)  # fmt: skip
    finally:
        store.close()
    contents = ("with their examples" if with_examples
                else "labels only; --with-examples adds each feature's examples")  # fmt: skip
    console.print(f"wrote {n:,} features to {target} ({contents})")
    return target


def _exported(run_path: Path, rules_path: Path | None, target: Path, overwrite: bool,
              work: Callable[..., int], passes: int = 1) -> int:  # fmt: skip
    """Run ``work(run, store, rules, progress)`` (an export to ``target``) with a progress
    bar over the planned features, ``passes`` times each; its count of features."""
    os.environ.setdefault(*EXPORT_ALLOCATOR)
    from labeler.cli.render import progress_bar
    from labeler.reporting.disputes import DisputeRules
    from labeler.reporting.label_table import planned_frame
    from labeler.run.data import RunData

    rules = DisputeRules.load(rules_path)
    run = RunData.open(run_path)
    check_output(target, overwrite)
    store = _open_labels(run_path)
    try:
        with progress_bar(console, "exporting", "features") as progress:
            task = progress.add_task("exporting", total=passes * planned_frame(store).height)
            return work(run, store, rules, lambda k: progress.advance(task, k))
    finally:
        store.close()


def _export_neuronpedia(run_path: Path, out: Path | None, model_id: str | None,
                        source_set: str | None, rules_path: Path | None,
                        overwrite: bool, layout: str) -> None:  # fmt: skip
    from labeler.formats.neuronpedia import check_names, export_neuronpedia

    if not model_id or not source_set:
        missing = "--model-id" if not model_id else "--source-set"
        raise UserError(f"{missing}: --format neuronpedia needs --model-id ID --source-set NAME")
    check_names(model_id, source_set)
    target = out or run_path / "neuronpedia"
    n = _exported(
        run_path, rules_path, target, overwrite,
        lambda run, store, rules, progress: export_neuronpedia(
            run, store, target, model_id, source_set, overwrite, rules, progress, layout
        ),
        passes=2 if layout == "both" else 1,
    )  # fmt: skip
    wrote = []
    if layout in ("both", "api"):
        batches = len(list((target / "upload").glob("batch-*.json")))
        wrote.append(f"{batches:,} upload requests (labeler push-neuronpedia {target})")
    if layout in ("both", "import"):
        wrote.append(f"the bulk-import layout in {target / 'import'}")
    console.print(f"wrote {n:,} features to {target}: {' and '.join(wrote)}")


def _export_delphi(run_path: Path, out: Path | None, rules_path: Path | None,
                   overwrite: bool, seed: int) -> None:  # fmt: skip
    from labeler.formats.delphi import export_delphi

    target = out or run_path / "delphi"
    n = _exported(
        run_path, rules_path, target, overwrite,
        lambda run, store, rules, progress: export_delphi(
            run, store, target, overwrite, rules, progress, seed
        ),
    )  # fmt: skip
    judges = sorted(p.name for p in target.iterdir() if (p / "explanations").is_dir())
    console.print(f"wrote {n:,} features to {target}, one delphi results folder per judge: "
                  f"{', '.join(judges)}")  # fmt: skip


def _size(n: float) -> str:
    """Bytes as KiB, MiB or GiB."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n / 2**10:.0f} KiB"


def _export_html(run_path: Path, out: Path | None, groups: tuple[str, ...],
                 ids_file: Path | None, rules_path: Path | None,
                 overwrite: bool, jobs: int | None) -> None:  # fmt: skip
    """``--format html``: the catalog and a page per selected feature, as files."""
    from collectors.run_format import feature_id
    from labeler.cli.render import progress_bar
    from labeler.cli.selection import read_feature_ids, selected_features
    from labeler.reporting.disputes import DisputeRules
    from labeler.review.static_site import export_html
    from labeler.run.data import RunData

    rules = DisputeRules.load(rules_path)
    target = out or run_path / "html"
    store = _open_labels(run_path)
    try:
        planned = {r[0] for r in store.conn.execute("SELECT feature_id FROM planned")}
        if not planned:
            raise UserError(f"{run_path}: no planned features to export; run `labeler label "
                            f"{run_path}` first")  # fmt: skip
        if ids_file is not None:
            for line, pair in read_feature_ids(ids_file):
                if feature_id(*pair) not in planned:
                    raise UserError(f"{ids_file}:{line}: {feature_id(*pair)} is not planned in "
                                    f"{run_path}")  # fmt: skip
        if groups or ids_file is not None:
            ids = [feature_id(*pair) for pair in selected_features(run_path, groups, ids_file)]
        else:
            ids = sorted(planned)
        check_output(target, overwrite)
        run = RunData.open(run_path)
        with progress_bar(console, "writing pages", "pages") as progress:
            task = progress.add_task("writing pages", total=len(ids))
            done = export_html(run, store, rules, ids, target,
                               progress=lambda k: progress.advance(task, k),
                               overwrite=overwrite, announce=console.print,
                               jobs=jobs or len(os.sched_getaffinity(0)))  # fmt: skip
    finally:
        store.close()
    console.print(
        f"wrote {target}: {done.pages:,} feature pages and the catalog (index.html); "
        f"{_size(done.total_bytes)} total, catalog {_size(done.catalog_bytes)}, feature pages "
        f"{_size(done.mean_page_bytes)} mean, {_size(done.largest_page_bytes)} largest "
        f"({done.largest_page}); open {target / 'index.html'} in a browser"
    )
    if not done.neighbours:
        console.print(f"(no neighbours on the pages: `labeler browse {run_path}` builds them)")


@cli.command()
@click.argument("run_path", metavar="RUN", type=click.Path(path_type=Path))
@click.option("--format", "fmt",
              type=click.Choice(["jsonl", "circuit-tracer", "neuronpedia", "delphi", "gold",
                                 "html"]),
              default="jsonl", show_default=True,
              help="jsonl: the labeled catalog; circuit-tracer: the paper's per-feature JSON "
                   "folder (features/{cantor_id}.json and feature_metadata.json); "
                   "neuronpedia: the bodies of Neuronpedia's upload requests and its "
                   "bulk-import layout (docs/neuronpedia.md); delphi: explanations/ and "
                   "scores/detection/ as EleutherAI's delphi writes them, one folder per "
                   "judge (docs/delphi.md); gold: people's review decisions, one JSON line "
                   "each with the audits they belong to, for `labeler import-gold` into "
                   "another run of the adapter (docs/gold.md); html: a folder of pages opened "
                   "from disk with no server or network, the catalog (index.html) and a page "
                   "per feature (features/ID.html), of every planned feature or those of "
                   "--select/--features (docs/feature-pages.md).")  # fmt: skip
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Output: a .jsonl or .jsonl.gz file (default RUN/catalog.jsonl), or for "
                   "circuit-tracer, neuronpedia and delphi a folder (default "
                   "RUN/circuit-tracer, RUN/neuronpedia, RUN/delphi); for gold a .jsonl "
                   "file (default RUN/gold.jsonl); for html a folder (default "
                   "RUN/html).")  # fmt: skip
@click.option(
    "--model-id",
    default=None,
    help="neuronpedia: the model's id there (2-32 characters of a-z, 0-9, . and -).",
)
@click.option(
    "--source-set",
    default=None,
    help="neuronpedia: the source set's name; layer L's source is L-NAME.",
)
@click.option("--layout", type=click.Choice(["both", "api", "import"]), default="both",
              show_default=True,
              help="neuronpedia: api, the upload requests (upload/, for push-neuronpedia); "
                   "import, the bulk-import layout (import/); or both.")  # fmt: skip
@click.option("--seed", default=0, show_default=True,
              help="delphi: the --seed the run was labeled with; each judge's detection "
                   "snippets are rebuilt from it (scores that do not rebuild are left out, "
                   "with a warning).")  # fmt: skip
@click.option("--select", "groups", multiple=True, metavar="FIELD=VALUE[,...]",
              help="html: the features whose final label meets every condition; repeat for "
                   "more groups. Fields: category, subcategory, mechanism, "
                   "domain_type.")  # fmt: skip
@click.option("--features", "ids_file", type=click.Path(path_type=Path), default=None,
              help="html: a file of feature ids (L{layer}F{index}, one a line, # comments), "
                   "added to the selection.")  # fmt: skip
@click.option("--jobs", type=click.IntRange(min=1), default=None, metavar="N",
              help="html: processes writing the pages (each opens the run; default: one "
                   "per core this process may use).")  # fmt: skip
@click.option("--with-examples", is_flag=True, help="Include each feature's examples.")
@click.option("--rules", "rules_path", type=click.Path(path_type=Path), default=None,
              help=_RULES_HELP)  # fmt: skip
@click.option("--gzip-level", type=click.IntRange(1, 9), default=1, show_default=True,
              help="Compression of a .jsonl.gz catalog: 1 is fastest, 9 smallest.")  # fmt: skip
@click.option("--overwrite", is_flag=True,
              help="Replace an existing output (else an existing one is refused).")  # fmt: skip
def export(run_path: Path, fmt: str, out: Path | None, model_id: str | None,
           source_set: str | None, layout: str, seed: int, groups: tuple[str, ...],
           ids_file: Path | None, jobs: int | None, with_examples: bool, rules_path: Path | None,
           gzip_level: int, overwrite: bool) -> None:  # fmt: skip
    """Write the labeled feature catalog: per feature its final label and where it came
    from, every judgment, every review decision, scores and provenance
    (docs/catalog-schema.md); or the run's features in the circuit-tracer viewer format, for
    Neuronpedia, or as delphi results; or people's decisions as a gold file; or pages
    to read offline (html)."""
    if fmt != "html" and (groups or ids_file is not None or jobs is not None):
        raise UserError("--select, --features and --jobs are for --format html")
    if fmt == "html":
        _export_html(run_path, out, groups, ids_file, rules_path, overwrite, jobs)
        return
    if fmt == "neuronpedia":
        _export_neuronpedia(run_path, out, model_id, source_set, rules_path, overwrite, layout)
        return
    if fmt == "delphi":
        _export_delphi(run_path, out, rules_path, overwrite, seed)
        return
    if fmt == "gold":
        from labeler.cli.gold import export_gold

        export_gold(run_path, out, overwrite)
        return
    if fmt == "circuit-tracer":
        from collectors.run_format import read_run_info
        from labeler.formats.circuit_tracer import export_circuit_tracer

        read_run_info(run_path)
        target = out or run_path / "circuit-tracer"
        check_output(target, overwrite)
        with console.status(f"writing {target}"):
            n = export_circuit_tracer(run_path, target, overwrite)
        console.print(f"wrote {n:,} feature files to {target}")
        return
    _export(run_path, out, with_examples, rules_path, gzip_level, overwrite)
