"""``labeler push-neuronpedia``: send an exported Neuronpedia folder."""

from __future__ import annotations

from pathlib import Path

import click

from labeler.cli.app import cli, console


@cli.command("push-neuronpedia")
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--url", default="https://www.neuronpedia.org", show_default=True,
              help="The Neuronpedia instance (a self-hosted one works too).")  # fmt: skip
@click.option("--create/--no-create", default=True, show_default=True,
              help="Create the model and the source set first (--no-create: they exist and "
                   "you made the source set).")  # fmt: skip
@click.option(
    "--lists/--no-lists",
    default=True,
    show_default=True,
    help="Make one list per final category once the features are up.",
)
def push_neuronpedia(folder: Path, url: str, create: bool, lists: bool) -> None:
    """Send FOLDER (written by `labeler export RUN --format neuronpedia`) to Neuronpedia,
    with the API key in NEURONPEDIA_API_KEY, which goes to --url only: a redirect is a
    failure, never followed. A request counts as finished only on Neuronpedia's JSON reply;
    each finished one is logged in FOLDER/pushed.jsonl, so a rerun sends only what is left
    (docs/neuronpedia.md)."""
    from labeler.cli.render import progress_bar
    from labeler.formats.neuronpedia_push import push

    with progress_bar(console, "sending", "requests") as progress:
        task = progress.add_task("sending", total=None)

        def told(finished: int, total: int) -> None:
            progress.update(task, completed=finished, total=total)

        sent, total = push(folder, url, create, lists, progress=told)
    console.print(f"sent {sent:,} requests to {url} ({total - sent:,} of {total:,} were sent "
                  "before)")  # fmt: skip
