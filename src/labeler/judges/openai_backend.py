"""``openai:MODEL``: the official OpenAI SDK, Responses or Chat Completions API, with
structured outputs (a strict JSON schema made from the reply's pydantic model).

``base_url`` (or the SDK's own ``OPENAI_BASE_URL``) reaches OpenAI-compatible servers:
vLLM, SGLang and Ollama serve Chat Completions (``api="chat"``). The key comes from
``OPENAI_API_KEY``; a server that needs none still gets a placeholder, since the SDK
insists on one.
"""

from __future__ import annotations

import math
import os
from typing import Any, Literal

from pydantic import ValidationError

from adapters.errors import UserError
from labeler.judges.api_errors import mapped_errors
from labeler.judges.backend import InvalidReply, Prompt, Refused, Reply, T
from labeler.judges.client_pool import ClientPool
from labeler.judges.replies import strict_json_schema, validation_reason
from labeler.run.schemas import Usage

OpenAIApi = Literal["responses", "chat"]
KEY_ENV = "OPENAI_API_KEY"
BASE_URL_ENV = "OPENAI_BASE_URL"
NO_KEY = "no-key"
TOP_LOGPROBS = 5


class OpenAIBackend:
    provider = "openai"

    def __init__(
        self,
        name: str,
        model: str,
        api: OpenAIApi = "responses",
        base_url: str | None = None,
        timeout: float = 60.0,
        max_output_tokens: int | None = None,
    ) -> None:
        self.name = name
        self.model = model
        self.api = api
        self.base_url = base_url
        self.timeout = timeout
        self.max_output_tokens = max_output_tokens
        self._pool: ClientPool[Any] = ClientPool(self._make_client)

    def preflight(self) -> None:
        """Fail early, with what to do, when no key is set for OpenAI itself."""
        if not os.environ.get(KEY_ENV) and not (self.base_url or os.environ.get(BASE_URL_ENV)):
            raise UserError(
                f"{self.name}: set {KEY_ENV} (or --base-url / {BASE_URL_ENV} for an "
                "OpenAI-compatible server)"
            )

    def _make_client(self) -> Any:
        import openai

        key = os.environ.get(KEY_ENV) or NO_KEY
        return openai.AsyncOpenAI(
            api_key=key, base_url=self.base_url, timeout=self.timeout, max_retries=0
        )

    async def aclose(self) -> None:
        await self._pool.aclose()

    async def complete(
        self, prompt: Prompt, schema: type[T], *, logprobs: bool = False
    ) -> Reply[T]:
        import openai

        with mapped_errors(openai, self.timeout):
            async with self._pool.client() as client:
                if self.api == "chat":
                    return await self._chat(client, prompt, schema, logprobs)
                return await self._responses(client, prompt, schema, logprobs)

    async def _chat(self, client: Any, prompt: Prompt, schema: type[T], logprobs: bool) -> Reply[T]:
        extra: dict[str, Any] = {}
        if logprobs:
            extra |= {"logprobs": True, "top_logprobs": TOP_LOGPROBS}
        if self.max_output_tokens is not None:
            extra["max_completion_tokens"] = self.max_output_tokens
        response = await client.chat.completions.create(
            model=self.model,
            messages=[
                {"role": "system", "content": prompt.system},
                {"role": "user", "content": prompt.user},
            ],
            response_format={
                "type": "json_schema",
                "json_schema": {
                    "name": schema.__name__,
                    "schema": strict_json_schema(schema),
                    "strict": True,
                },
            },
            **extra,
        )
        usage = _usage(
            response.usage, "prompt_tokens", "completion_tokens", "prompt_tokens_details"
        )
        if not response.choices:
            raise InvalidReply("the reply has no choices", usage)
        choice = response.choices[0]
        message = choice.message
        if getattr(message, "refusal", None):
            raise Refused(f"refused: {message.refusal}", usage)
        if choice.finish_reason == "length":
            raise InvalidReply("cut off at the output token limit", usage)
        tokens = None
        if logprobs and choice.logprobs is not None and choice.logprobs.content:
            tokens = choice.logprobs.content
        return _parsed(message.content or "", schema, usage, tokens)

    async def _responses(
        self, client: Any, prompt: Prompt, schema: type[T], logprobs: bool
    ) -> Reply[T]:
        extra: dict[str, Any] = {}
        if logprobs:
            extra |= {"include": ["message.output_text.logprobs"], "top_logprobs": TOP_LOGPROBS}
        if self.max_output_tokens is not None:
            extra["max_output_tokens"] = self.max_output_tokens
        response = await client.responses.create(
            model=self.model,
            input=[
                {"role": "system", "content": prompt.system},
                {"role": "user", "content": prompt.user},
            ],
            text={
                "format": {
                    "type": "json_schema",
                    "name": schema.__name__,
                    "schema": strict_json_schema(schema),
                    "strict": True,
                }
            },
            store=False,
            **extra,
        )
        usage = _usage(response.usage, "input_tokens", "output_tokens", "input_tokens_details")
        texts: list[str] = []
        tokens: list[Any] = []
        for item in response.output or []:
            if getattr(item, "type", None) != "message":
                continue
            for part in item.content:
                if part.type == "refusal":
                    raise Refused(f"refused: {part.refusal}", usage)
                if part.type == "output_text":
                    texts.append(part.text)
                    tokens += list(getattr(part, "logprobs", None) or [])
        if response.status == "incomplete":
            details = getattr(response, "incomplete_details", None)
            reason = getattr(details, "reason", None) or "incomplete"
            raise InvalidReply(f"incomplete reply ({reason})", usage)
        return _parsed("".join(texts), schema, usage, tokens if logprobs and tokens else None)


def _parsed(text: str, schema: type[T], usage: Usage, tokens: list[Any] | None) -> Reply[T]:
    if not text.strip():
        raise InvalidReply("empty reply", usage)
    try:
        parsed = schema.model_validate_json(text)
    except ValidationError as exc:
        raise InvalidReply(validation_reason(exc, text), usage) from exc
    return Reply(parsed, usage, boolean_probs(tokens) if tokens is not None else None)


def boolean_probs(tokens: list[Any]) -> list[float]:
    """For each ``true``/``false`` token of a reply, the probability of ``true``, from
    the token's log probability and its top alternatives."""
    probs: list[float] = []
    for token in tokens:
        word = _alpha(token.token)
        if word not in ("true", "false"):
            continue
        alternatives: dict[str, float] = {}
        for alt in getattr(token, "top_logprobs", None) or []:
            alternatives.setdefault(_alpha(alt.token), alt.logprob)
        alternatives.setdefault(word, token.logprob)
        p_true = math.exp(alternatives["true"]) if "true" in alternatives else None
        p_false = math.exp(alternatives["false"]) if "false" in alternatives else None
        if p_true is not None and p_false is not None:
            probs.append(p_true / (p_true + p_false))
        elif p_true is not None:
            probs.append(p_true)
        else:
            probs.append(1.0 - (p_false or 0.0))
    return probs


def _alpha(text: str) -> str:
    return "".join(c for c in text if c.isalpha()).lower()


def _usage(usage: Any, input_field: str, output_field: str, details_field: str) -> Usage:
    """Chat Completions and Responses name the same counts differently; the input total
    includes the cached part."""
    if usage is None:
        return Usage(calls=1)
    details = getattr(usage, details_field, None)
    cached = int(getattr(details, "cached_tokens", 0) or 0)
    return Usage(
        calls=1,
        input_tokens=int(getattr(usage, input_field, 0) or 0) - cached,
        cached_tokens=cached,
        output_tokens=int(getattr(usage, output_field, 0) or 0),
    )


__all__ = ["OpenAIBackend", "boolean_probs"]
