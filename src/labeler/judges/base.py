"""The judge interface and the registry that builds judges from plain names.

A judge name is ``BACKEND`` or ``BACKEND:MODEL``: ``heuristic``, ``openai:gpt-5-mini``,
``anthropic:claude-haiku-4-5``, ``hf:/models/Qwen2.5-7B-Instruct``. Together with
:class:`JudgeOptions` (plain, serializable settings) it is all a worker needs to build
the same judge. Backends register a factory under their prefix; a second registration
of the same prefix is refused.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, field_validator

from labeler.errors import UnknownJudgeError
from labeler.judges.resampling import MAX_RESAMPLES
from labeler.judges.scorers import DEFAULT_SCORERS, SCORERS, Scorer
from labeler.run.schemas import FeatureRecord, Judgment, Snippet


class Judge(Protocol):
    """Explains, scores and classifies one feature; raises ``JudgeFailure`` with a reason
    when it cannot."""

    name: str
    prompt_hash: str
    calls_per_feature: int

    async def judge(self, feature: FeatureRecord, negatives: dict[str, list[Snippet]]) -> Judgment:
        """``negatives`` maps each detection set ('top', 'random') to checked
        non-activating snippets."""
        ...

    def limit_requests(self, n: int) -> None:
        """At most ``n`` model requests in flight (inside the running event loop)."""
        ...

    def preflight(self) -> None:
        """Raise ``UserError`` if the judge cannot work (no key, no model), before any work."""
        ...

    async def aclose(self) -> None: ...


class JudgeOptions(BaseModel):
    """Settings shared by the judges of one labeling; no secrets (keys come from the
    environment where the judge runs)."""

    model_config = ConfigDict(extra="forbid")

    base_url: str | None = Field(None, description="OpenAI-compatible server for openai: judges")
    openai_api: Literal["responses", "chat"] = Field(
        "responses", description="OpenAI API; OpenAI-compatible servers mostly serve 'chat'"
    )
    timeout_s: float = Field(60.0, gt=0, description="per call")
    max_attempts: int = Field(6, ge=1, description="calls per request, retries included")
    logprobs: bool = Field(False, description="ask for token log probabilities (AUROC)")
    n_examples: int = Field(10, ge=1, le=50, description="top examples shown to the model")
    max_output_tokens: int | None = Field(None, ge=1)
    service_tier: Literal["default", "flex"] = Field(
        "default", description="openai: judges: 'flex' for flex processing (batch prices)"
    )
    device: str = Field("auto", description="hf: judges: auto, cpu or cuda")
    dtype: str = Field("auto", description="hf: judges: auto, float32 or bfloat16")
    prices: Path | None = Field(None, description="price table overriding the packaged one")
    seed: int = 0
    scorers: tuple[Scorer, ...] = Field(
        DEFAULT_SCORERS, description="scorers every judgment carries (judges.scorers)"
    )
    resamples: int = Field(
        0,
        ge=0,
        le=MAX_RESAMPLES,
        description="classifications more per feature, each on a seeded random half of "
        "its examples: how stable the label is (judges.resampling); 0: none",
    )
    explain_from: tuple[Literal["examples", "outputs"], ...] = Field(
        ("examples",),
        description="what the explainer sees: the top examples, and/or what the feature "
        "does to the output (logit lens, steering)",
    )

    @property
    def carried(self) -> tuple[str, ...]:
        """What every judgment is to carry: the scorers, and the resamples if asked for
        (the engine's and the store's ``scorers``, ``judges.stages.carried``)."""
        from labeler.judges.stages import carried

        return carried(self.scorers, self.resamples)

    @field_validator("scorers")
    @classmethod
    def _detection_first(cls, value: tuple[Scorer, ...]) -> tuple[Scorer, ...]:
        """Detection is part of every judgment; the order is fixed."""
        asked = {"detection", *value}
        return tuple(s for s in SCORERS if s in asked)

    @field_validator("explain_from")
    @classmethod
    def _some_evidence(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("name examples, outputs or both")
        return tuple(e for e in ("examples", "outputs") if e in value)


JudgeFactory = Callable[[str, JudgeOptions], Judge]
_BACKENDS: dict[str, JudgeFactory] = {}


def register_backend(prefix: str, factory: JudgeFactory) -> None:
    if prefix in _BACKENDS:
        raise ValueError(f"a judge backend named {prefix!r} is already registered")
    _BACKENDS[prefix] = factory


def _ensure_builtins() -> None:
    if "heuristic" in _BACKENDS:
        return
    from labeler.judges.factories import anthropic_judge, heuristic_judge, hf_judge, openai_judge

    register_backend("heuristic", heuristic_judge)
    register_backend("openai", openai_judge)
    register_backend("anthropic", anthropic_judge)
    register_backend("hf", hf_judge)


def make_judge(name: str, options: JudgeOptions | None = None) -> Judge:
    _ensure_builtins()
    prefix = name.split(":", 1)[0]
    if prefix not in _BACKENDS:
        known = ", ".join(sorted(_BACKENDS))
        raise UnknownJudgeError(f"unknown judge {name!r}; known judge backends: {known}")
    return _BACKENDS[prefix](name, options or JudgeOptions())
