"""``anthropic:MODEL``: the official Anthropic SDK, Messages API, with structured output
through a forced tool whose input schema is the reply's JSON schema.

The shared instructions go in a system block marked ``cache_control: ephemeral``, so
every call after the first reads them from Anthropic's prompt cache (when they are
long enough for the model's minimum cacheable prefix). The key comes from
``ANTHROPIC_API_KEY``; ``ANTHROPIC_BASE_URL`` is honoured by the SDK. Requests are built
as data and replies read back from their JSON, so a Message Batch carries the same
bodies and its results are read by the same :meth:`AnthropicBackend.parse`.
"""

from __future__ import annotations

import os
from typing import Any

from pydantic import ValidationError

from labeler.errors import UserError
from labeler.judges.api_errors import mapped_errors
from labeler.judges.backend import InvalidReply, Prompt, Refused, Reply, T
from labeler.judges.client_pool import ClientPool
from labeler.judges.pricing import Tier
from labeler.judges.replies import strict_json_schema, validation_reason
from labeler.judges.requests import ApiRequest
from labeler.run.schemas import Usage

KEY_ENV = "ANTHROPIC_API_KEY"
BASE_URL_ENV = "ANTHROPIC_BASE_URL"
TOOL_NAME = "record_answer"
DEFAULT_MAX_TOKENS = 1024
ENDPOINT = "/v1/messages"
DEFAULT_ORIGIN = "https://api.anthropic.com"


TASK_OF = {"resample": "classify"}
"""The task a stage's calls perform, where it is not the stage's name."""


class AnthropicBackend:
    provider = "anthropic"

    def __init__(
        self,
        name: str,
        model: str,
        base_url: str | None = None,
        timeout: float = 60.0,
        max_output_tokens: int | None = None,
    ) -> None:
        self.name = name
        self.model = model
        self.base_url = base_url
        self.timeout = timeout
        self.max_tokens = max_output_tokens or DEFAULT_MAX_TOKENS
        self.pool: ClientPool[Any] = ClientPool(self._make_client)

    def preflight(self) -> None:
        if not os.environ.get(KEY_ENV):
            raise UserError(f"{self.name}: set {KEY_ENV}")

    def _make_client(self) -> Any:
        import anthropic

        return anthropic.AsyncAnthropic(
            api_key=os.environ.get(KEY_ENV) or "no-key",
            base_url=self.base_url,
            timeout=self.timeout,
            max_retries=0,
        )

    async def aclose(self) -> None:
        await self.pool.aclose()

    def request(self, prompt: Prompt, schema: type[T], *, logprobs: bool = False) -> ApiRequest:
        """Anthropic gives no token probabilities; ``logprobs`` is ignored."""
        body: dict[str, Any] = {
            "model": self.model,
            "max_tokens": self.max_tokens,
            "system": [
                {"type": "text", "text": prompt.system, "cache_control": {"type": "ephemeral"}}
            ],
            "messages": [{"role": "user", "content": prompt.user}],
            "tools": [
                {
                    "name": TOOL_NAME,
                    # a resample is a classification (of fewer examples)
                    "description": f"Record the {TASK_OF.get(prompt.stage, prompt.stage)} answer.",
                    "input_schema": strict_json_schema(schema),
                }
            ],
            "tool_choice": {"type": "tool", "name": TOOL_NAME},
        }
        origin = self.base_url or os.environ.get(BASE_URL_ENV) or DEFAULT_ORIGIN
        return ApiRequest(self.provider, self.model, ENDPOINT, body, origin)

    async def send(self, request: ApiRequest) -> dict[str, Any]:
        """Post the request; the provider's JSON reply."""
        import anthropic

        with mapped_errors(anthropic, self.timeout):
            async with self.pool.client() as client:
                message = await client.messages.create(**request.body)
        reply: dict[str, Any] = message.to_dict()
        return reply

    def parse(self, request: ApiRequest, reply: dict[str, Any], schema: type[T]) -> Reply[T]:
        """The validated answer in a message (from a call, a batch result or the cache);
        an unusable one raises ``InvalidReply`` with what it cost."""
        usage = _usage(reply.get("usage"))
        if reply.get("stop_reason") == "refusal":
            raise Refused("refused: the model declined to answer", usage)
        if reply.get("stop_reason") == "max_tokens":
            raise InvalidReply("cut off at the output token limit", usage)
        blocks = reply.get("content") or []
        calls = [b for b in blocks if b.get("type") == "tool_use"]
        if not calls:
            text = " ".join(str(b.get("text", "")) for b in blocks).strip()
            raise InvalidReply(f"no {TOOL_NAME} tool call; text: {text[:80]!r}", usage)
        try:
            parsed = schema.model_validate(calls[0].get("input"))
        except ValidationError as exc:
            raise InvalidReply(validation_reason(exc), usage) from exc
        return Reply(parsed, usage)

    @property
    def tier(self) -> Tier:
        return "standard"

    def tier_of(self, reply: dict[str, Any]) -> Tier:
        return "standard"

    async def complete(
        self, prompt: Prompt, schema: type[T], *, logprobs: bool = False
    ) -> Reply[T]:
        request = self.request(prompt, schema, logprobs=logprobs)
        return self.parse(request, await self.send(request), schema)


def _usage(usage: Any) -> Usage:
    if not isinstance(usage, dict):
        return Usage(calls=1)
    return Usage(
        calls=1,
        input_tokens=int(usage.get("input_tokens", 0) or 0),
        cached_tokens=int(usage.get("cache_read_input_tokens", 0) or 0),
        cache_write_tokens=int(usage.get("cache_creation_input_tokens", 0) or 0),
        output_tokens=int(usage.get("output_tokens", 0) or 0),
    )
