"""The labeling core and the ``labeler`` CLI: judges, the label store, summaries, export.

From Python (docs/python.md): ``labeler.open_run``, ``labeler.label``, ``labeler.study``
and ``labeler.effects``, loaded from ``labeler.api`` when first used, so that ``import
labeler`` stays cheap."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from labeler.api import Feature, Run, effects, label, open_run, study

__all__ = ["Feature", "Run", "effects", "label", "open_run", "study"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from labeler import api

        return getattr(api, name)
    raise AttributeError(f"module 'labeler' has no attribute {name!r}")
