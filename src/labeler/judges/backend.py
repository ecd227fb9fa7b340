"""The small interface between a judge and the model that answers it.

A judge renders prompts and validates answers; a backend only carries a prompt to a
model and brings back its reply with the tokens it used. Two kinds exist:

- a :class:`ChatBackend` answers with a JSON object that follows a pydantic schema
  (OpenAI and Anthropic structured outputs, OpenAI-compatible servers);
- a :class:`LikelihoodBackend` runs an open model in-process and can score a fixed
  set of answers by their likelihood, besides generating free text.

Backends raise the errors below, so that one retry policy (``labeler.judges.retry``)
serves every provider.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, Protocol, TypeVar, runtime_checkable

from pydantic import BaseModel

from labeler.judges.pricing import Tier
from labeler.judges.requests import ApiRequest
from labeler.run.schemas import Usage

Stage = Literal["explain", "detect", "classify", "fuzz", "intruder", "resample"]
"""What a call's usage is counted under (``fuzz`` and ``intruder``: the scorers beyond
detection, ``judges.scorers``; ``resample``: the classifier's resamples,
``judges.resampling``)."""
STAGES: tuple[Stage, ...] = ("explain", "detect", "classify", "fuzz", "intruder", "resample")

T = TypeVar("T", bound=BaseModel)


@dataclass(frozen=True)
class Prompt:
    """One request: the shared instructions first (identical for every call, so that
    providers' prompt caching applies), then the stage's task and the feature's data."""

    stage: Stage
    system: str
    user: str


@dataclass(frozen=True)
class Reply(Generic[T]):
    """A validated structured reply. ``true_probs`` holds, for each boolean of the reply
    in order, the model's probability of ``true`` (from token log probabilities), when
    the backend yields them."""

    parsed: T
    usage: Usage
    true_probs: list[float] | None = None


@dataclass(frozen=True)
class TextReply:
    text: str
    usage: Usage


@dataclass(frozen=True)
class OptionScores:
    """Mean log-probability per token of each allowed answer, per prompt, and the tokens
    it took."""

    logprobs: list[list[float]]
    usage: Usage = field(default_factory=Usage)


@runtime_checkable
class ChatBackend(Protocol):
    """A provider API: a request is built as data, posted, and its JSON reply read back,
    so the same request can also travel in a provider batch or be answered from the
    reply cache."""

    name: str
    provider: str
    model: str

    @property
    def tier(self) -> Tier:
        """The price tier of its synchronous calls."""
        ...

    def request(self, prompt: Prompt, schema: type[T], *, logprobs: bool = False) -> ApiRequest:
        """The request asking for a JSON object following ``schema``."""
        ...

    async def send(self, request: ApiRequest) -> dict[str, Any]:
        """Post it; the provider's JSON reply (errors raised as the errors below)."""
        ...

    def parse(self, request: ApiRequest, reply: dict[str, Any], schema: type[T]) -> Reply[T]:
        """The validated answer in ``reply``; ``InvalidReply`` when it has none."""
        ...

    def tier_of(self, reply: dict[str, Any]) -> Tier:
        """The tier a synchronous reply was billed at."""
        ...

    async def complete(
        self, prompt: Prompt, schema: type[T], *, logprobs: bool = False
    ) -> Reply[T]:
        """Build, send and parse in one."""
        ...

    async def aclose(self) -> None: ...


@runtime_checkable
class LikelihoodBackend(Protocol):
    name: str
    provider: str
    model: str

    async def generate(self, prompt: Prompt, max_new_tokens: int) -> TextReply:
        """Free text, greedy."""
        ...

    async def score_options(
        self, prompts: Sequence[Prompt], options: Sequence[str]
    ) -> OptionScores:
        """Mean log-probability per token of each option as the continuation of each
        prompt (``logprobs[i][j]``: prompt i, option j)."""
        ...

    async def aclose(self) -> None: ...


Backend = ChatBackend | LikelihoodBackend


class BackendError(Exception):
    """A call that did not produce a usable reply; ``usage`` is what it still cost and
    ``kind`` names the failure in reports ("rate_limited", "invalid_reply", ...)."""

    kind = "error"

    def __init__(self, reason: str, usage: Usage | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.usage = usage or Usage()
        self.stage: str | None = None  # set by the judge: which stage's call failed


class TransientError(BackendError):
    """Worth retrying: rate limited (429), a server error (5xx), a timeout or a broken
    connection. ``retry_after`` is the server's Retry-After in seconds, if it sent one."""

    def __init__(
        self, reason: str, retry_after: float | None = None, kind: str = "transient"
    ) -> None:
        super().__init__(reason)
        self.retry_after = retry_after
        self.kind = kind


class RequestRejected(BackendError):
    """The request itself was refused (a 4xx other than 429: bad key, unknown model,
    malformed request); retrying would not help."""

    kind = "rejected"


class Unauthorized(RequestRejected):
    """401 or 403: the key is missing, wrong or not allowed this model. No request of
    this judge can succeed, so the labeling stops."""

    kind = "auth"


class NotFound(RequestRejected):
    """404: no such model (or no such endpoint at the base URL). The labeling stops."""

    kind = "not_found"


class JudgeUnusable(BackendError):
    """The judge cannot work at all (an in-process model that does not load). The
    labeling stops."""

    kind = "unusable"


class InvalidReply(BackendError):
    """The model answered, but not with what was asked: malformed JSON, a value outside
    the schema, a refusal, an empty or cut-off reply. Re-asked once, then a failure."""

    kind = "invalid_reply"


class Refused(InvalidReply):
    """The model declined to answer."""

    kind = "refused"
