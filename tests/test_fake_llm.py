"""The fake LLM server speaks the three wire formats well enough for the real SDKs, its
scripted failures surface as the SDKs' own exceptions, and the oracle answers the
labeler's prompts like the heuristic judge."""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest

from tests.conftest import CollectedDemo
from tests.fake_llm import (
    Answer,
    BadRequest,
    FakeAnswer,
    FakeLLMServer,
    FakeRequest,
    Hang,
    RateLimited,
    Raw,
    Refusal,
    ServerError,
    oracle,
)

SYSTEM = "You are a careful judge. " * 40
USER = "TASK: DETECT\n\nSnippet 1: Wait, that is wrong."
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"activating": {"type": "array", "items": {"type": "boolean"}}},
    "required": ["activating"],
    "additionalProperties": False,
}
CONTENT = {"activating": [True, False, True]}
TRUE_PROBS = [0.8, 0.3, 0.6]


def _fixed(request: FakeRequest) -> FakeAnswer:
    return FakeAnswer(dict(CONTENT), list(TRUE_PROBS))


@pytest.fixture(scope="module")
def module_server() -> Iterator[FakeLLMServer]:
    with FakeLLMServer(_fixed) as server:
        yield server


@pytest.fixture
def server(module_server: FakeLLMServer) -> FakeLLMServer:
    module_server.reset()
    module_server.latency = 0.0
    return module_server


def _openai(server: FakeLLMServer, timeout: float = 10.0) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        api_key="test-key", base_url=server.base_url + "/v1", max_retries=0, timeout=timeout
    )


def _anthropic(server: FakeLLMServer, timeout: float = 10.0) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(
        api_key="test-key", base_url=server.base_url, max_retries=0, timeout=timeout
    )


async def _chat(client: openai.AsyncOpenAI, **extra: Any) -> Any:
    return await client.chat.completions.create(
        model="gpt-test",
        messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER}],
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "DetectionReply", "schema": SCHEMA, "strict": True},
        },
        **extra,
    )


async def _responses(client: openai.AsyncOpenAI, **extra: Any) -> Any:
    return await client.responses.create(
        model="gpt-test",
        input=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER}],
        text={
            "format": {
                "type": "json_schema",
                "name": "DetectionReply",
                "schema": SCHEMA,
                "strict": True,
            }
        },
        store=False,
        **extra,
    )


async def _messages(client: anthropic.AsyncAnthropic, cache: bool = True) -> Any:
    block: Any = {"type": "text", "text": SYSTEM}
    if cache:
        block["cache_control"] = {"type": "ephemeral"}
    tool: Any = {"name": "record_answer", "description": "Record it.", "input_schema": SCHEMA}
    return await client.messages.create(
        model="claude-test",
        max_tokens=256,
        system=[block],
        messages=[{"role": "user", "content": USER}],
        tools=[tool],
        tool_choice={"type": "tool", "name": "record_answer"},
    )


def _p_true(token: Any) -> float:
    alternatives = {alt.token: alt.logprob for alt in token.top_logprobs}
    p_true, p_false = math.exp(alternatives["true"]), math.exp(alternatives["false"])
    return p_true / (p_true + p_false)


def _check_boolean_tokens(tokens: list[Any], text: str) -> None:
    booleans = [t for t in tokens if t.token in ("true", "false")]
    assert [t.token for t in booleans] == ["true", "false", "true"]
    assert [_p_true(t) for t in booleans] == pytest.approx(TRUE_PROBS)
    assert booleans[0].logprob == pytest.approx(math.log(0.8))
    assert booleans[1].logprob == pytest.approx(math.log(0.7))
    assert all(t.logprob == 0.0 for t in tokens if t not in booleans)
    assert "".join(t.token for t in tokens) == text
    assert all(bytes(t.bytes) == t.token.encode() for t in tokens)


# --- the three wire formats ---------------------------------------------------------------


def test_chat_completions_structured_output_with_logprobs(server: FakeLLMServer) -> None:
    async def go() -> tuple[Any, Any]:
        async with _openai(server) as client:
            first = await _chat(client, logprobs=True, top_logprobs=2)
            second = await _chat(client)
        return first, second

    first, second = asyncio.run(go())
    choice = first.choices[0]
    assert choice.finish_reason == "stop"
    assert json.loads(choice.message.content) == CONTENT
    assert choice.message.refusal is None
    assert choice.logprobs is not None and choice.logprobs.content
    _check_boolean_tokens(choice.logprobs.content, choice.message.content)
    assert second.choices[0].logprobs is None
    usage = first.usage
    assert usage.prompt_tokens == math.ceil(len(SYSTEM) / 4) + math.ceil(len(USER) / 4)
    assert usage.completion_tokens == math.ceil(len(choice.message.content) / 4)
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.prompt_tokens_details.cached_tokens == 0
    assert second.usage.prompt_tokens_details.cached_tokens == math.ceil(len(SYSTEM) / 4)
    [recorded, _] = server.requests
    assert (recorded.wire, recorded.path, recorded.status) == ("chat", "/v1/chat/completions", 200)
    assert recorded.body["response_format"]["json_schema"]["name"] == "DetectionReply"
    assert recorded.headers["authorization"] == "Bearer test-key"


def test_responses_structured_output_with_logprobs(server: FakeLLMServer) -> None:
    async def go() -> tuple[Any, Any]:
        async with _openai(server) as client:
            first = await _responses(
                client, include=["message.output_text.logprobs"], top_logprobs=5
            )
            second = await _responses(client)
        return first, second

    first, second = asyncio.run(go())
    assert first.status == "completed"
    assert json.loads(first.output_text) == CONTENT
    [message] = first.output
    assert message.type == "message"
    [part] = message.content
    assert part.type == "output_text"
    assert part.logprobs
    _check_boolean_tokens(part.logprobs, part.text)
    assert not second.output[0].content[0].logprobs
    assert first.usage.input_tokens_details.cached_tokens == 0
    assert second.usage.input_tokens_details.cached_tokens == math.ceil(len(SYSTEM) / 4)
    assert first.usage.output_tokens_details.reasoning_tokens == 0
    assert first.usage.total_tokens == first.usage.input_tokens + first.usage.output_tokens
    assert [r.wire for r in server.requests] == ["responses", "responses"]


def test_responses_accepts_instructions_as_the_system_text(server: FakeLLMServer) -> None:
    seen: list[FakeRequest] = []

    def responder(request: FakeRequest) -> FakeAnswer:
        seen.append(request)
        return FakeAnswer({"ok": True})

    server.responder = responder
    try:

        async def go() -> Any:
            async with _openai(server) as client:
                return await client.responses.create(
                    model="gpt-test", instructions="Be brief.", input="Hello"
                )

        reply = asyncio.run(go())
    finally:
        server.responder = _fixed
    assert json.loads(reply.output_text) == {"ok": True}
    [request] = seen
    assert (request.system, request.user, request.schema_name) == ("Be brief.", "Hello", None)


def test_anthropic_forced_tool_and_prompt_cache(server: FakeLLMServer) -> None:
    async def go() -> list[Any]:
        async with _anthropic(server) as client:
            return [
                await _messages(client),
                await _messages(client),
                await _messages(client, cache=False),
            ]

    first, second, uncached = asyncio.run(go())
    assert first.stop_reason == "tool_use"
    [block] = first.content
    assert block.type == "tool_use"
    assert block.name == "record_answer"
    assert block.input == CONTENT
    system_tokens, user_tokens = math.ceil(len(SYSTEM) / 4), math.ceil(len(USER) / 4)
    assert first.usage.cache_creation_input_tokens == system_tokens
    assert first.usage.cache_read_input_tokens == 0
    assert first.usage.input_tokens == user_tokens
    assert second.usage.cache_read_input_tokens == system_tokens > 0
    assert second.usage.cache_creation_input_tokens == 0
    assert uncached.usage.cache_read_input_tokens == 0
    assert uncached.usage.input_tokens == system_tokens + user_tokens
    assert [r.path for r in server.requests] == ["/v1/messages"] * 3
    headers = server.requests[0].headers
    # This SDK version sends the key as a bearer token, older ones as x-api-key.
    assert "test-key" in (headers.get("x-api-key"), headers.get("authorization", "")[7:])
    assert "anthropic-version" in headers


# --- scripted behaviours ---------------------------------------------------------------


def test_rate_limited_raises_rate_limit_error_with_retry_after(server: FakeLLMServer) -> None:
    server.script(RateLimited(2.5), RateLimited(1))

    async def go() -> tuple[openai.RateLimitError, anthropic.RateLimitError]:
        async with _openai(server) as oa, _anthropic(server) as an:
            with pytest.raises(openai.RateLimitError) as oa_error:
                await _chat(oa)
            with pytest.raises(anthropic.RateLimitError) as an_error:
                await _messages(an)
        return oa_error.value, an_error.value

    oa_exc, an_exc = asyncio.run(go())
    assert oa_exc.response.headers["retry-after"] == "2.5"
    assert oa_exc.code == "rate_limit_exceeded"
    assert an_exc.response.headers["retry-after"] == "1"
    body: Any = an_exc.body
    assert body["type"] == "error"
    assert body["error"]["type"] == "rate_limit_error"
    assert [r.status for r in server.requests] == [429, 429]
    assert server.pending == 0


def test_server_and_bad_request_errors(server: FakeLLMServer) -> None:
    server.script(ServerError(), BadRequest(), ServerError(503), BadRequest(), ServerError(529))

    async def go() -> None:
        async with _openai(server) as oa, _anthropic(server) as an:
            with pytest.raises(openai.InternalServerError):
                await _chat(oa)
            with pytest.raises(openai.BadRequestError):
                await _responses(oa)
            with pytest.raises(openai.InternalServerError):
                await _responses(oa)
            with pytest.raises(anthropic.BadRequestError):
                await _messages(an)
            with pytest.raises(anthropic.OverloadedError):
                await _messages(an)
            await _chat(oa)  # the script is spent: a normal answer

    asyncio.run(go())
    assert [r.status for r in server.requests] == [500, 400, 503, 400, 529, 200]


def test_hang_times_the_client_out(server: FakeLLMServer) -> None:
    server.script(Hang(3.0))

    async def go() -> Any:
        async with _openai(server, timeout=0.3) as client:
            started = time.monotonic()
            with pytest.raises(openai.APITimeoutError):
                await _chat(client)
            assert time.monotonic() - started < 2.0
            return await _chat(client)  # a fresh request on another connection

    reply = asyncio.run(go())
    assert json.loads(reply.choices[0].message.content) == CONTENT


def test_refusals_parse(server: FakeLLMServer) -> None:
    server.script(Refusal("no chat"), Refusal("no responses"), Refusal())

    async def go() -> tuple[Any, Any, Any]:
        async with _openai(server) as oa, _anthropic(server) as an:
            return await _chat(oa, logprobs=True), await _responses(oa), await _messages(an)

    chat, responses, message = asyncio.run(go())
    assert chat.choices[0].message.refusal == "no chat"
    assert chat.choices[0].message.content is None
    [part] = responses.output[0].content
    assert (part.type, part.refusal) == ("refusal", "no responses")
    assert message.stop_reason == "refusal"
    assert message.content == []


def test_raw_and_answer_replies(server: FakeLLMServer) -> None:
    server.script(Raw('{"activating": [tru'), Raw("not json"), Answer({"category": "bogus"}))

    async def go() -> tuple[Any, Any, Any]:
        async with _openai(server) as oa, _anthropic(server) as an:
            return await _chat(oa, logprobs=True), await _messages(an), await _responses(oa)

    chat, message, responses = asyncio.run(go())
    assert chat.choices[0].message.content == '{"activating": [tru'
    assert message.stop_reason == "end_turn"
    assert [(b.type, b.text) for b in message.content] == [("text", "not json")]
    assert json.loads(responses.output_text) == {"category": "bogus"}


def test_latency_and_records(server: FakeLLMServer) -> None:
    server.latency = 0.2
    server.script(RateLimited(1.0))

    async def go() -> float:
        async with _openai(server) as client:
            started = time.monotonic()
            with pytest.raises(openai.RateLimitError):
                await _chat(client)
            await asyncio.gather(*(_chat(client) for _ in range(8)))
            return time.monotonic() - started

    elapsed = asyncio.run(go())
    assert 0.4 <= elapsed < 2.0  # the error waits too; concurrent requests overlap
    records = server.requests
    assert len(records) == 9
    assert [r.status for r in records] == [429] + [200] * 8
    assert all(a.time <= b.time for a, b in itertools.pairwise(records))
    server.reset()
    assert server.requests == []


def test_unknown_task_and_route_answer_errors(server: FakeLLMServer) -> None:
    server.responder = oracle
    try:

        async def go() -> None:
            async with _openai(server) as client:
                with pytest.raises(openai.InternalServerError, match="TASK: NOTHING"):
                    await client.chat.completions.create(
                        model="gpt-test", messages=[{"role": "user", "content": "TASK: NOTHING"}]
                    )
                with pytest.raises(openai.NotFoundError):
                    await client.embeddings.create(model="e", input="x")

        asyncio.run(go())
    finally:
        server.responder = _fixed
    assert [(r.wire, r.status) for r in server.requests] == [("chat", 500), ("unknown", 404)]


def test_sync_client_and_many_concurrent_connections(server: FakeLLMServer) -> None:
    with openai.OpenAI(api_key="test-key", base_url=server.base_url + "/v1", max_retries=0) as c:
        reply = c.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    assert json.loads(reply.choices[0].message.content or "") == CONTENT
    server.latency = 0.05

    async def go() -> list[Any]:
        async with _openai(server) as client:
            return await asyncio.gather(*(_chat(client) for _ in range(256)))

    replies = asyncio.run(go())
    assert len(replies) == 256
    assert len(server.requests) == 257


def test_main_runs_the_oracle_server_in_the_foreground() -> None:
    root = Path(__file__).resolve().parents[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.fake_llm", "--port", "0", "--latency", "0"],
        cwd=root,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline().strip()
        assert line.startswith("listening on http://127.0.0.1:")
        url = line.removeprefix("listening on ")
        client = anthropic.Anthropic(api_key="test-key", base_url=url, max_retries=0)
        with client:
            message = client.messages.create(
                model="claude-test",
                max_tokens=64,
                messages=[{"role": "user", "content": "TASK: EXPLAIN\n\nNo examples."}],
            )
        [block] = message.content
        assert block.type == "text"
        assert json.loads(block.text) == {"explanation": "No recognizable pattern."}
    finally:
        process.terminate()
        assert process.wait(timeout=10) == 0


# --- the oracle -----------------------------------------------------------------------------


def _ask(user: str) -> dict[str, Any]:
    request = FakeRequest("chat", "m", SYSTEM, user, None, False, {}, {})
    return oracle(request).content


def test_oracle_explains_and_detects_from_prompt_text() -> None:
    explain = (
        "TASK: EXPLAIN\n\nFeature L0F1 (layer 0). Its 3 most strongly activating examples:\n\n"
        "Example 1 (activation 2.00):\nok.\\n\\n<< Wait>>, that is wrong\n"
        'Active tokens: "Wait" 2.00\n\n'
        'Example 2 (activation 1.90):\nx << 2 then<< wait>> again\nActive tokens: "wait" 1.90\n\n'
        'Example 3 (activation 1.50):\nso<< Hmm>>, no\nActive tokens: "Hmm" 1.50\n\n'
        'Reply with a JSON object {"explanation": "..."}.'
    )
    assert _ask(explain) == {"explanation": "Fires on 'wait', 'hmm'."}
    detect = (
        "TASK: DETECT\n\nA feature is described as: \"Fires on 'wait', '='.\"\n\nSnippets:\n\n"
        "Snippet 1: Hmm. Wait, no.\nSnippet 2: awaited result\nSnippet 3: x = 2\n"
        "Snippet 4: WAIT!\n\nReply with a JSON object."
    )
    answer = oracle(FakeRequest("chat", "m", SYSTEM, detect, None, True, {}, {}))
    assert answer.content == {"activating": [True, False, True, True]}
    assert answer.true_probs == [0.9, 0.1, 0.9, 0.9]
    with pytest.raises(ValueError, match="TASK: SUMMARIZE"):
        _ask("TASK: SUMMARIZE\nall of it")


def test_oracle_classifies_the_planted_wait_feature_as_reasoning(
    collected: CollectedDemo,
) -> None:
    from labeler.judges.prompting import classify_prompt
    from labeler.run.data import RunData

    truth = json.loads(collected.paths.ground_truth.read_text())
    wait_id = next(
        t["feature_id"] for t in truth if t["kind"] == "token_set" and t["triggers"] == ["wait"]
    )
    run = RunData.open(collected.run)
    [record] = run.records([wait_id])
    prompt = classify_prompt(record, 10, 15)
    with FakeLLMServer(oracle) as server:

        async def go() -> Any:
            async with _openai(server) as client:
                return await client.chat.completions.create(
                    model="gpt-test",
                    messages=[
                        {"role": "system", "content": prompt.system},
                        {"role": "user", "content": prompt.user},
                    ],
                )

        reply = asyncio.run(go())
    answer = json.loads(reply.choices[0].message.content)
    assert answer["category"] == "reasoning"
    assert answer["subcategory"] == "hesitation"
    assert answer["mechanism"] == "input_simple"
    assert answer["domain_type"] is None
    assert answer["confidence"] == "high"
