"""``labeler disputes``, ``decide`` and ``review``."""

from __future__ import annotations

import json
from pathlib import Path

import click

from labeler.cli.app import (
    _RULES_HELP,
    _open_labels,
    cli,
    console,
)
from labeler.errors import UserError


@cli.command()
@click.argument("run_path", metavar="RUN", type=click.Path(path_type=Path))
@click.option("--rules", "rules_path", type=click.Path(path_type=Path), default=None,
              help=_RULES_HELP)  # fmt: skip
@click.option(
    "--limit",
    type=click.IntRange(min=0),
    default=50,
    show_default=True,
    help="Rows to show (0: all).",
)
@click.option("--json", "as_json", is_flag=True, help="Print every disputed feature as JSON.")
def disputes(run_path: Path, rules_path: Path | None, limit: int, as_json: bool) -> None:
    """The review queue: the features an audit drew (``labeler audit``), in audit order,
    then the disputed features, most informative first: judges disagree on the
    category, a judge's confidence is low, a detection score is low, or the heuristic
    judge disagrees with every model judge. An audited feature nobody has decided shows
    no judges' votes (an audit measures the judges)."""
    from collectors.run_format import read_run_info
    from labeler.cli.render import queue_table
    from labeler.reporting.disputes import DisputeRules
    from labeler.review.queue import review_queue
    from labeler.review.screen import safe

    rules = DisputeRules.load(rules_path)
    read_run_info(run_path)
    store = _open_labels(run_path)
    try:
        queue = review_queue(store, rules, include_decided=True)
    finally:
        store.close()
    if as_json:
        click.echo(json.dumps([q.model_dump() for q in queue], indent=2))
        return
    audited = [q for q in queue if q.audit is not None]
    disputed = [q for q in queue if q.audit is None]
    if audited:
        waiting = sum(1 for q in audited if not q.decided_by)
        console.print(f"{len(audited):,} audited features first, in audit order, {waiting:,} "
                      "not decided by anyone (decide them in order: the first undecided one "
                      "stops the audit's estimate)")  # fmt: skip
    open_items = sum(1 for q in disputed if not q.decided_by)
    console.print(f"{len(disputed):,} disputed features, {open_items:,} not decided by anyone")
    shown = [
        q.model_copy(
            update={
                "feature_id": safe(q.feature_id),
                "categories": [safe(c) for c in q.categories],
                "decided_by": [safe(r) for r in q.decided_by],
                "audit": None if q.audit is None else safe(q.audit),
            }
        )
        for q in (queue[:limit] if limit else queue)
    ]
    console.print(queue_table(shown))


_DECISION_OPTIONS = (
    click.option(
        "--category", required=True, help="reasoning, domain, language or uninterpretable."
    ),
    click.option(
        "--subcategory",
        default=None,
        help="For reasoning: hesitation, "
        "self_correction, verification, planning, answer_template, other.",
    ),
    click.option(
        "--mechanism", default=None, help="For reasoning: output, input_simple, input_abstract."
    ),
    click.option("--domain-type", default=None, help="For domain: math, science, code."),
    click.option("--note", default="", help="Free text kept with the decision."),
)


@cli.command()
@click.argument("run_path", metavar="RUN", type=click.Path(path_type=Path))
@click.argument("feature_id", metavar="FEATURE")
@click.option("--reviewer", required=True, help="Who decides (kept with the decision).")
@_DECISION_OPTIONS[0]
@_DECISION_OPTIONS[1]
@_DECISION_OPTIONS[2]
@_DECISION_OPTIONS[3]
@_DECISION_OPTIONS[4]
def decide(run_path: Path, feature_id: str, reviewer: str, category: str,
           subcategory: str | None, mechanism: str | None, domain_type: str | None,
           note: str) -> None:  # fmt: skip
    """Record one review decision without the interactive review (for scripts). Decisions
    are appended: earlier ones, another reviewer's or your own, are kept."""
    from collectors.run_format import read_run_info
    from labeler.review.queue import record_decision
    from labeler.review.screen import safe

    read_run_info(run_path)
    store = _open_labels(run_path)
    try:
        decision = record_decision(store, {
            "feature_id": feature_id, "reviewer": reviewer, "category": category,
            "subcategory": subcategory, "mechanism": mechanism, "domain_type": domain_type,
            "note": note,
        })  # fmt: skip
        others = [r for r in store.reviews(feature_id)
                  if r.action == "decide" and r.reviewer != reviewer]  # fmt: skip
    finally:
        store.close()
    console.print(
        safe(f"{feature_id}: {decision.category} by {reviewer} at {decision.decided_at}"),
        markup=False,
        highlight=False,
    )
    for other in others:
        if other.category != decision.category:
            console.print(safe(f"  note: {other.reviewer} decided {other.category} "
                               f"({other.decided_at}); both are kept"), markup=False,
                          highlight=False)  # fmt: skip


@cli.command()
@click.argument("run_path", metavar="RUN", type=click.Path(path_type=Path))
@click.option("--reviewer", default=None,
              help="Who reviews (kept with each decision); required in the terminal.")  # fmt: skip
@click.option("--web", is_flag=True, help="Serve the review page on 127.0.0.1 instead.")
@click.option("--port", default=8765, show_default=True, help="--web: port (0: any free one).")
@click.option("--include-decided", is_flag=True,
              help="Also features someone already decided (a second opinion).")  # fmt: skip
@click.option("--rules", "rules_path", type=click.Path(path_type=Path), default=None,
              help=_RULES_HELP)  # fmt: skip
def review(run_path: Path, reviewer: str | None, web: bool, port: int, include_decided: bool,
           rules_path: Path | None) -> None:  # fmt: skip
    """Walk the review queue and decide the features' labels: first the features an
    audit drew (``labeler audit``), in draw order, then the disputed features, most
    informative first. Examples with the activating token and activation strength
    highlighted, the logit lens, and the judges' answers (hidden until asked for, to
    avoid anchoring; for an audited feature, decide before looking: an audit measures
    the judges). Skipping an audited feature stops the audit's estimate there until
    someone decides it.

    \b
    Terminal keys, single keys without Enter (from a pipe, one a line): r d l u
    (category), j (show or hide the judges), s (skip, confirmed with s or y), b or ←
    (back to the previous feature, to change its decision), n or → (next, nothing
    recorded), q (quit).
    --web: a page on 127.0.0.1 with the same queue and keyboard shortcuts; on a remote
    machine, forward its port first: ssh -L 8765:127.0.0.1:8765 HOST.
    Decisions are appended to RUN/labels.sqlite with the reviewer and time.
    """
    from labeler.reporting.disputes import DisputeRules
    from labeler.run.data import RunData

    rules = DisputeRules.load(rules_path)
    run = RunData.open(run_path)
    store = _open_labels(run_path)
    try:
        if web:
            from labeler.review.web import serve

            def ready(url: str) -> None:
                console.print(f"review page: {url} (Ctrl-C to stop)")
                port = url.rstrip("/").rsplit(":", 1)[1]
                console.print(f"from another machine: ssh -L {port}:127.0.0.1:{port} THIS_HOST, "
                              "then open the same address there", markup=False)  # fmt: skip

            from labeler.review.neighbours import NeighbourIndex
            from labeler.review.web import ReviewApp

            app = ReviewApp(run, store, rules, reviewer or "", include_decided)
            app.neighbours = NeighbourIndex.open(run_path)  # built by labeler browse, if at all
            try:
                serve(run, store, rules, reviewer or "", port, include_decided, on_ready=ready,
                      app=app)  # fmt: skip
            finally:
                if app.neighbours is not None:
                    app.neighbours.close()
            return
        if not reviewer:
            raise UserError("--reviewer NAME is needed to review in the terminal")
        from labeler.review.terminal import review_in_terminal

        review_in_terminal(run, store, rules, reviewer, include_decided, console)
    finally:
        store.close()


@cli.command()
@click.argument("run_path", metavar="RUN", type=click.Path(path_type=Path))
@click.option(
    "--port", default=8765, show_default=True, help="Port on 127.0.0.1 (0: any free one)."
)
@click.option("--reviewer", default=None,
              help="Who reviews, for decisions made from a feature's page (else the page "
                   "asks).")  # fmt: skip
@click.option("--rebuild", is_flag=True,
              help="Rebuild RUN/browse-index.sqlite and RUN/neighbours/ even if they are "
                   "current.")  # fmt: skip
@click.option("--rules", "rules_path", type=click.Path(path_type=Path), default=None,
              help=_RULES_HELP)  # fmt: skip
@click.option("--model", "with_model", is_flag=True,
              help="Load the adapter model on first use, for the prompt box.")  # fmt: skip
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
              show_default=True,
              help="Where the model runs and the feature neighbours are computed (auto: "
                   "cuda if torch sees a GPU).")  # fmt: skip
def browse(run_path: Path, port: int, reviewer: str | None, rebuild: bool,
           rules_path: Path | None, with_model: bool, device: str) -> None:  # fmt: skip
    """Browse every feature of a labeled run in the browser, on 127.0.0.1: full-text
    search over the judges' explanations and rationales; filters by category,
    subcategory, mechanism, domain type, layer, label source, detection accuracy and
    F1, fuzzing F1, intruder accuracy and activation frequency; sortable and paged. A
    feature's page shows the histogram of its activations and its density, the logit
    lens with values, its neighbours (links), the example groups, every judgment and
    review, the output score and the decision form (docs/feature-pages.md). When an
    audit was drawn (labeler audit), an
    "Audit: K to decide" entry at the top lists its undecided features in draw order,
    their judges' labels hidden until decided.

    \b
    The index is built once into RUN/browse-index.sqlite (a progress bar shows it) and
    reused while the run's judgments stay the same (it is checked, and rebuilt if
    damaged); decisions, made here or anywhere else, show in it at once.
    Each feature's nearest features (by decoder and encoder cosine, from the run's
    checkpoint, and by co-activation in the corpus windows of negatives.parquet) are
    computed once into RUN/neighbours/ (on --device) and reused while the run and its
    adapter stay the same; without the checkpoint, co-activation only.
    --model: a "Try a prompt" box on the catalog and on each feature's page reads a
    text (at most 2,000 characters, 256 tokens) with the run's adapter model (run.json's
    adapter_path, loaded on the first prompt, on --device) and shows, per token, the
    features that fire most relative to their largest activation on the corpus, or the
    feature's own activation on each token; one prompt at a time.
    On a remote machine, forward the port first: ssh -L 8765:127.0.0.1:8765 HOST.
    """
    from labeler.cli.render import progress_bar
    from labeler.reporting.disputes import DisputeRules
    from labeler.reporting.summarize import no_labels
    from labeler.review.browse_web import CatalogApp
    from labeler.review.catalog_index import open_index
    from labeler.review.neighbours import ensure_neighbours
    from labeler.review.web import serve
    from labeler.run.data import RunData

    rules = DisputeRules.load(rules_path)
    run = RunData.open(run_path)
    store = _open_labels(run_path)
    try:
        if store.conn.execute("SELECT 1 FROM judgments LIMIT 1").fetchone() is None:
            raise no_labels(store)
        total = int(store.conn.execute("SELECT count(*) FROM planned").fetchone()[0])
        with progress_bar(console, "indexing", "features") as progress:
            task = progress.add_task("indexing", total=total, visible=False)

            def building(why: str) -> None:
                progress.update(task, visible=True, description=f"indexing ({why})")

            index = open_index(run, store, rules, rebuild,
                               progress=lambda k: progress.advance(task, k),
                               on_build=building)  # fmt: skip
        try:
            with progress_bar(console, "neighbours", "steps") as progress:
                steps = progress.add_task("neighbours", total=None, visible=False)

                def finding(why: str, total: int) -> None:
                    progress.update(steps, visible=True, total=total,
                                    description=f"neighbours ({why})")  # fmt: skip

                neighbours = ensure_neighbours(run, device, rebuild,
                                               progress=lambda k: progress.advance(steps, k),
                                               on_build=finding)  # fmt: skip
        except BaseException:
            index.close()
            raise
        try:
            from labeler.review.prompt_box import PromptBox

            prompt = PromptBox.for_run(
                run, with_model, device, on_load=lambda say: console.print(say, markup=False)
            )
            app = CatalogApp(run, store, rules, reviewer or "", index, prompt)
            app.neighbours = neighbours

            def ready(url: str) -> None:
                console.print(f"catalog: {url} (Ctrl-C to stop)")
                port = url.rstrip("/").rsplit(":", 1)[1]
                console.print(f"from another machine: ssh -L {port}:127.0.0.1:{port} THIS_HOST, "
                              "then open the same address there", markup=False)  # fmt: skip

            serve(run, store, rules, reviewer or "", port, False, on_ready=ready, app=app)
        finally:
            neighbours.close()
            index.close()
    finally:
        store.close()
