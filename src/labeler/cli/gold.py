"""``labeler import-gold``, and the gold file ``labeler export --format gold`` writes
(docs/gold.md)."""

from __future__ import annotations

from pathlib import Path

import click

from labeler.cli.app import _open_labels, check_output, cli, console
from labeler.errors import UserError


def export_gold(run_path: Path, out: Path | None, overwrite: bool) -> Path:
    """Write RUN's review decisions as a gold file (default RUN/gold.jsonl)."""
    from collectors.run_format import read_run_info
    from labeler.formats.gold import gold_lines, write_gold

    info = read_run_info(run_path)
    target = out or run_path / "gold.jsonl"
    if not target.name.endswith(".jsonl"):
        raise UserError(f"--out {target}: a gold file is written as .jsonl")
    check_output(target, overwrite)
    store = _open_labels(run_path)
    try:
        lines = gold_lines(store, info, run_path.resolve().name)
    finally:
        store.close()
    n = write_gold(target, lines)
    audited = sum(bool(line.audits) for line in lines)
    console.print(f"wrote {n:,} decisions to {target} ({audited:,} in an audit's usable "
                  f"features); `labeler import-gold OTHER_RUN {target}` stores them "
                  "in another run of this adapter")  # fmt: skip
    return target


@cli.command("import-gold")
@click.argument("run_path", metavar="RUN", type=click.Path(path_type=Path))
@click.argument("file", metavar="FILE", type=click.Path(path_type=Path))
def import_gold(run_path: Path, file: Path) -> None:
    """Store the decisions of a gold file (`labeler export OTHER_RUN --format gold`) as
    reviews of RUN, with their reviewers and times, so that `summarize` measures RUN's
    judges against the same people (docs/gold.md).

    \b
    FILE must be of RUN's adapter (adapter_hash and unit in run.json); every line is
    checked before anything is stored. Importing a file again stores nothing new.
    Decisions on features RUN did not plan are left out and counted. An audit travels
    with its decisions and is used in RUN only when RUN labels the very features it
    was drawn from.
    """
    from collectors.run_format import read_run_info
    from labeler.formats.gold import check_same_adapter, import_gold, named, read_gold
    from labeler.review.screen import safe

    info = read_run_info(run_path)
    lines = read_gold(file)
    check_same_adapter(file, lines, info, run_path)
    store = _open_labels(run_path)
    try:
        result = import_gold(store, lines, file.name, str(run_path))
    finally:
        store.close()

    def say(text: str) -> None:
        console.print(safe(text), markup=False, highlight=False)

    say(f"{result.imported:,} decisions imported, {result.already:,} already there")
    if result.unplanned:
        say(f"{len(result.unplanned):,} decisions on features {run_path} did not plan, not "
            f"stored: {named(result.unplanned)}")  # fmt: skip
    for audit in result.audits:
        what = f"audit {audit.audit_id} ({audit.source}, {audit.n_features:,} features)"
        if audit.added_as is not None:
            say(f"{what}: added as audit {audit.added_as}, used by `labeler summarize`")
        else:
            say(f"{what}: {audit.note}")
