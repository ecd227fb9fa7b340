"""The ``labeler`` command line: ``cli`` is the click group, ``main`` the entry point.
Importing this package registers every command (and imports no torch)."""

from labeler.cli import (  # noqa: F401  (registers them)
    audit,
    baseline,
    collect,
    demo,
    gold,
    intervene,
    label,
    make_adapter,
    neuronpedia,
    report,
    review,
    score_outputs,
)
from labeler.cli.app import cli, main

__all__ = ["cli", "main"]
