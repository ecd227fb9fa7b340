"""``labeler audit``: draw features for people to decide, so that ``summarize`` can correct
the judges' estimate with their decisions (docs/audit.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from labeler.cli.app import _open_labels, cli, console, err_console


@cli.command()
@click.argument("run_path", metavar="RUN", type=click.Path(path_type=Path))
@click.option("--n", "n", type=click.IntRange(min=1), default=None,
              help="Features to draw for people to decide. Without it: how far the run's "
                   "audits are.")  # fmt: skip
@click.option("--seed", type=int, default=None,
              help="Seed of the draw (default: the number of audits the run has, so each "
                   "new audit draws anew, and a copy of the run draws the same).")  # fmt: skip
@click.option("--weighting", type=click.Choice(["uncertainty", "uniform"]),
              default="uncertainty", show_default=True,
              help="uncertainty: features whose labels look less sure (judges disagree, the "
                   "classifier changes its answer on resampled examples, low confidence or "
                   "scores) are likelier to be drawn; uniform: all alike. Either way each "
                   "feature's probability is known and the estimate unbiased; weighting "
                   "narrows its interval.")  # fmt: skip
def audit(run_path: Path, n: int | None, seed: int | None, weighting: str) -> None:
    """Draw N labeled features for people to decide, with known probabilities.

    \b
    People then decide them in `labeler review RUN` (or `browse`), where the
    audit comes first, in draw order and blind to the judges' labels. `summarize`
    corrects the judges' shares with these decisions (prediction-powered inference),
    so that their 95% intervals include the judges' error, and reports the judges'
    precision and recall. A second audit adds to the first. docs/audit.md.
    """
    store = _open_labels(run_path)
    try:
        if n is None:
            _progress(store, run_path)
            return
        _draw(store, run_path, n, seed, weighting)
    finally:
        store.close()


def _draw(store: Any, run_path: Path, n: int, seed: int | None, weighting: str) -> None:
    from labeler.audit.design import new_audit

    made = new_audit(store, n, seed, weighting)  # type: ignore[arg-type]
    if made.unlabeled:
        err_console.print(
            f"[yellow]warning:[/] {made.unlabeled:,} planned features have no judge's label "
            "yet; an audit covers the features labeled now, and once more are labeled it no "
            "longer counts (summarize names it): finish labeling first, or audit again then"
        )
    drawn = made.drawn
    how = "weighted toward uncertain labels" if weighting == "uncertainty" else "uniformly"
    console.print(
        f"audit {drawn.audit_id}: drew {len(drawn.feature_ids):,} of {drawn.n_frame:,} labeled "
        f"features {how} (seed {made.seed}); {drawn.already_decided} already decided"
    )
    shown = ", ".join(drawn.feature_ids[:8]) + (" ..." if len(drawn.feature_ids) > 8 else "")
    console.print(f"in draw order: {shown}")
    console.print(
        f"decide them in order: `labeler review {run_path}` (or `labeler browse {run_path}`); "
        f"then `labeler summarize {run_path}`"
    )


def _progress(store: Any, run_path: Path) -> None:
    from labeler.audit.estimate import audit_sample, labeled_population
    from labeler.reporting.final_labels import human_labels
    from labeler.reporting.label_table import review_frame

    if not store.audits.all():
        console.print(f"{run_path}: no audit yet; `labeler audit {run_path} --n 100` draws one")
        return
    decided = set(human_labels(review_frame(store))["feature_id"].to_list())
    _, uses = audit_sample(store, labeled_population(store), decided)
    for use in uses:
        line = (
            f"audit {use.audit_id} ({use.source}, {use.weighting}): {use.n_used} of "
            f"{use.n_drawn} decided in draw order"
        )
        console.print(line + (f"; {use.note}" if use.note else ""))
