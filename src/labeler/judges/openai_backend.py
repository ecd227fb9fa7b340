"""``openai:MODEL``: the official OpenAI SDK, Responses or Chat Completions API, with
structured outputs (a strict JSON schema made from the reply's pydantic model).

``base_url`` (or the SDK's own ``OPENAI_BASE_URL``) reaches OpenAI-compatible servers:
vLLM, SGLang and Ollama serve Chat Completions (``api="chat"``). The key comes from
``OPENAI_API_KEY``; a server that needs none still gets a placeholder, since the SDK
insists on one.

A request is built as data (:meth:`OpenAIBackend.request`), posted (:meth:`send`), and
its JSON reply read back (:meth:`parse`); the batch transport puts the same bodies in
an OpenAI batch and reads the result lines with the same :meth:`parse`.
``service_tier="flex"`` asks for flex processing: batch prices on ordinary calls, slower
replies, and a 429 "resource unavailable" when OpenAI has no capacity (retried after a
wait; nothing is charged for it).
"""

from __future__ import annotations

import math
import os
from typing import Any, Literal

from pydantic import ValidationError

from labeler.errors import UserError
from labeler.judges.api_errors import mapped_errors
from labeler.judges.backend import InvalidReply, Prompt, Refused, Reply, T
from labeler.judges.client_pool import ClientPool
from labeler.judges.pricing import Tier
from labeler.judges.replies import strict_json_schema, validation_reason
from labeler.judges.requests import ApiRequest
from labeler.run.schemas import Usage

OpenAIApi = Literal["responses", "chat"]
ServiceTier = Literal["default", "flex"]
KEY_ENV = "OPENAI_API_KEY"
BASE_URL_ENV = "OPENAI_BASE_URL"
NO_KEY = "no-key"
TOP_LOGPROBS = 5
ENDPOINTS: dict[OpenAIApi, str] = {"chat": "/v1/chat/completions", "responses": "/v1/responses"}
FLEX_TIMEOUT_S = 900.0  # OpenAI's advice for flex: wait up to 15 minutes for a reply
DEFAULT_ORIGIN = "https://api.openai.com/v1"


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
        service_tier: ServiceTier = "default",
    ) -> None:
        self.name = name
        self.model = model
        self.api = api
        self.base_url = base_url
        self.service_tier = service_tier
        self.timeout = max(timeout, FLEX_TIMEOUT_S) if service_tier == "flex" else timeout
        self.max_output_tokens = max_output_tokens
        self.pool: ClientPool[Any] = ClientPool(self._make_client)

    @property
    def tier(self) -> Tier:
        """The price tier its synchronous calls are billed at."""
        return "flex" if self.service_tier == "flex" else "standard"

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
        await self.pool.aclose()

    # -- a request as data -------------------------------------------------------------

    def request(self, prompt: Prompt, schema: type[T], *, logprobs: bool = False) -> ApiRequest:
        messages = [
            {"role": "system", "content": prompt.system},
            {"role": "user", "content": prompt.user},
        ]
        body: dict[str, Any] = {"model": self.model}
        if self.api == "chat":
            body["messages"] = messages
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {
                    "name": schema.__name__,
                    "schema": strict_json_schema(schema),
                    "strict": True,
                },
            }
            if logprobs:
                body |= {"logprobs": True, "top_logprobs": TOP_LOGPROBS}
            if self.max_output_tokens is not None:
                body["max_completion_tokens"] = self.max_output_tokens
        else:
            body["input"] = messages
            body["text"] = {
                "format": {
                    "type": "json_schema",
                    "name": schema.__name__,
                    "schema": strict_json_schema(schema),
                    "strict": True,
                }
            }
            body["store"] = False
            if logprobs:
                body |= {"include": ["message.output_text.logprobs"], "top_logprobs": TOP_LOGPROBS}
            if self.max_output_tokens is not None:
                body["max_output_tokens"] = self.max_output_tokens
        if self.service_tier == "flex":
            body["service_tier"] = "flex"
        origin = self.base_url or os.environ.get(BASE_URL_ENV) or DEFAULT_ORIGIN
        return ApiRequest(self.provider, self.model, ENDPOINTS[self.api], body, origin)

    async def send(self, request: ApiRequest) -> dict[str, Any]:
        """Post the request; the provider's JSON reply."""
        import openai

        with mapped_errors(openai, self.timeout):
            async with self.pool.client() as client:
                if request.endpoint == ENDPOINTS["chat"]:
                    response = await client.chat.completions.create(**request.body)
                else:
                    response = await client.responses.create(**request.body)
        reply: dict[str, Any] = response.to_dict()
        return reply

    def parse(self, request: ApiRequest, reply: dict[str, Any], schema: type[T]) -> Reply[T]:
        """The validated answer in a reply to ``request`` (from a call, a batch result or
        the cache); an unusable one raises ``InvalidReply`` with what it cost."""
        logprobs = bool(request.body.get("logprobs") or request.body.get("include"))
        if request.endpoint == ENDPOINTS["chat"]:
            return _parse_chat(reply, schema, logprobs)
        return _parse_responses(reply, schema, logprobs)

    def tier_of(self, reply: dict[str, Any]) -> Tier:
        """The tier a synchronous reply was billed at (OpenAI says which served it)."""
        return "flex" if reply.get("service_tier") == "flex" else "standard"

    async def complete(
        self, prompt: Prompt, schema: type[T], *, logprobs: bool = False
    ) -> Reply[T]:
        request = self.request(prompt, schema, logprobs=logprobs)
        return self.parse(request, await self.send(request), schema)


def _parse_chat(reply: dict[str, Any], schema: type[T], logprobs: bool) -> Reply[T]:
    usage = _usage(reply.get("usage"), "prompt_tokens", "completion_tokens",
                   "prompt_tokens_details")  # fmt: skip
    choices = reply.get("choices") or []
    if not choices:
        raise InvalidReply("the reply has no choices", usage)
    choice = choices[0]
    message = choice.get("message") or {}
    if message.get("refusal"):
        raise Refused(f"refused: {message['refusal']}", usage)
    if choice.get("finish_reason") == "length":
        raise InvalidReply("cut off at the output token limit", usage)
    tokens = None
    if logprobs and (choice.get("logprobs") or {}).get("content"):
        tokens = choice["logprobs"]["content"]
    return _parsed(message.get("content") or "", schema, usage, tokens)


def _parse_responses(reply: dict[str, Any], schema: type[T], logprobs: bool) -> Reply[T]:
    usage = _usage(reply.get("usage"), "input_tokens", "output_tokens", "input_tokens_details")
    texts: list[str] = []
    tokens: list[Any] = []
    for item in reply.get("output") or []:
        if item.get("type") != "message":
            continue
        for part in item.get("content") or []:
            if part.get("type") == "refusal":
                raise Refused(f"refused: {part.get('refusal')}", usage)
            if part.get("type") == "output_text":
                texts.append(part.get("text") or "")
                tokens += list(part.get("logprobs") or [])
    if reply.get("status") == "incomplete":
        reason = (reply.get("incomplete_details") or {}).get("reason") or "incomplete"
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
    the token's log probability and its top alternatives (tokens as the JSON reply
    gives them: ``{"token", "logprob", "top_logprobs"}``)."""
    probs: list[float] = []
    for token in tokens:
        word = _alpha(_field(token, "token"))
        if word not in ("true", "false"):
            continue
        alternatives: dict[str, float] = {}
        for alt in _field(token, "top_logprobs") or []:
            alternatives.setdefault(_alpha(_field(alt, "token")), float(_field(alt, "logprob")))
        alternatives.setdefault(word, float(_field(token, "logprob")))
        p_true = math.exp(alternatives["true"]) if "true" in alternatives else None
        p_false = math.exp(alternatives["false"]) if "false" in alternatives else None
        if p_true is not None and p_false is not None:
            probs.append(p_true / (p_true + p_false))
        elif p_true is not None:
            probs.append(p_true)
        else:
            probs.append(1.0 - (p_false or 0.0))
    return probs


def _field(item: Any, name: str) -> Any:
    return item.get(name) if isinstance(item, dict) else getattr(item, name, None)


def _alpha(text: str | None) -> str:
    return "".join(c for c in text or "" if c.isalpha()).lower()


def _usage(usage: Any, input_field: str, output_field: str, details_field: str) -> Usage:
    """Chat Completions and Responses name the same counts differently; the input total
    includes the cached part."""
    if not isinstance(usage, dict):
        return Usage(calls=1)
    details = usage.get(details_field) or {}
    cached = int(details.get("cached_tokens", 0) or 0)
    return Usage(
        calls=1,
        input_tokens=int(usage.get(input_field, 0) or 0) - cached,
        cached_tokens=cached,
        output_tokens=int(usage.get(output_field, 0) or 0),
    )


__all__ = ["OpenAIBackend", "boolean_probs"]
