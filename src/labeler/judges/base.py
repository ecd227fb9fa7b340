"""The judge interface and the registry that builds judges from plain names.

A judge name is ``BACKEND`` or ``BACKEND:MODEL`` (``heuristic``, later ``openai:gpt-5-mini``);
a Celery payload can carry it as a string. Backends register a factory under their
prefix; a second registration of the same prefix is refused.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from labeler.errors import UnknownJudgeError
from labeler.schemas import FeatureRecord, Judgment, Snippet


class Judge(Protocol):
    """Explains, scores and classifies one feature; raises ``JudgeFailure`` with a reason
    when it cannot."""

    name: str
    prompt_hash: str

    def judge(self, feature: FeatureRecord, negatives: dict[str, list[Snippet]]) -> Judgment:
        """``negatives`` maps each detection set ('top', 'random') to checked
        non-activating snippets."""
        ...


JudgeFactory = Callable[[str], Judge]
_BACKENDS: dict[str, JudgeFactory] = {}


def register_backend(prefix: str, factory: JudgeFactory) -> None:
    if prefix in _BACKENDS:
        raise ValueError(f"a judge backend named {prefix!r} is already registered")
    _BACKENDS[prefix] = factory


def _ensure_builtins() -> None:
    if "heuristic" not in _BACKENDS:
        from labeler.judges.heuristic import HeuristicJudge

        register_backend("heuristic", HeuristicJudge.from_name)


def make_judge(name: str) -> Judge:
    _ensure_builtins()
    prefix = name.split(":", 1)[0]
    if prefix not in _BACKENDS:
        known = ", ".join(sorted(_BACKENDS))
        raise UnknownJudgeError(f"unknown judge {name!r}; known judge backends: {known}")
    return _BACKENDS[prefix](name)
