"""The fake LLM server's batch APIs, driven through the real SDKs: OpenAI Files + Batches
(chat completions and responses lines) and Anthropic Message Batches. A batch line is
answered exactly like the synchronous endpoint answers the same body; progress, expiry,
cancellation, scripted line errors, a delayed create reply and the records a transport
test counts on all show through the SDKs' own types."""

from __future__ import annotations

import asyncio
import functools
import json
import math
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any, Literal, TypeVar, cast

import anthropic
import openai
import pytest
from openai.types import Batch
from openai.types.chat import ChatCompletion
from openai.types.responses import Response

from tests.fake_llm import (
    BadRequest,
    BatchSettings,
    FakeAnswer,
    FakeLLMServer,
    FakeRequest,
    Hang,
    RateLimited,
    Raw,
    Refusal,
    ServerError,
)
from tests.fake_llm.server import parse_multipart

T = TypeVar("T")

SYSTEM = "You judge snippets carefully and answer in JSON. " * 20
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "echo": {"type": "string"},
        "activating": {"type": "array", "items": {"type": "boolean"}},
    },
    "required": ["echo", "activating"],
    "additionalProperties": False,
}
Endpoint = Literal["/v1/chat/completions", "/v1/responses", "/v1/embeddings"]
CHAT: Endpoint = "/v1/chat/completions"
RESPONSES: Endpoint = "/v1/responses"
DEADLINE_S = 15.0


def _responder(request: FakeRequest) -> FakeAnswer:
    """An answer that differs per request (so a mix-up of lines shows)."""
    odd = len(request.user) % 2 == 1
    return FakeAnswer({"echo": request.user, "activating": [odd, True]}, [0.7, 0.2])


@pytest.fixture(scope="module")
def module_server() -> Iterator[FakeLLMServer]:
    with FakeLLMServer(_responder) as server:
        yield server


@pytest.fixture
def server(module_server: FakeLLMServer) -> FakeLLMServer:
    module_server.reset()
    module_server.latency = 0.0
    return module_server


class ManualClock:
    """A clock for ``server.batches.clock`` that only moves when told to."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _manual(server: FakeLLMServer, **settings: Any) -> ManualClock:
    clock = ManualClock()
    server.batches.clock = clock
    server.batches.settings = BatchSettings(**settings)
    return clock


def _poll(fetch: Callable[[], T], done: Callable[[T], bool], deadline_s: float = DEADLINE_S) -> T:
    """Fetch until ``done``; a generous deadline, no exact sleeps."""
    give_up = time.monotonic() + deadline_s
    while True:
        value = fetch()
        if done(value):
            return value
        assert time.monotonic() < give_up, f"still not done after {deadline_s} s: {value!r}"
        time.sleep(0.01)


# --- request bodies ---------------------------------------------------------------------------


def _user(i: int) -> str:
    return f"TASK: DETECT\n\nSnippet {i}: " + "wait " * i


def _chat_body(i: int) -> dict[str, Any]:
    return {
        "model": "gpt-test",
        "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": _user(i)}],
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "Detection", "schema": SCHEMA, "strict": True},
        },
        "logprobs": True,
        "top_logprobs": 2,
    }


def _responses_body(i: int) -> dict[str, Any]:
    return {
        "model": "gpt-test",
        "input": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": _user(i)}],
        "text": {"format": {"type": "json_schema", "name": "Detection", "schema": SCHEMA}},
        "store": False,
    }


def _messages_body(i: int) -> dict[str, Any]:
    return {
        "model": "claude-test",
        "max_tokens": 256,
        "system": [{"type": "text", "text": SYSTEM, "cache_control": {"type": "ephemeral"}}],
        "messages": [{"role": "user", "content": _user(i)}],
        "tools": [{"name": "record", "description": "Record it.", "input_schema": SCHEMA}],
        "tool_choice": {"type": "tool", "name": "record"},
    }


def _requests(params: dict[str, dict[str, Any]]) -> list[Any]:
    """Anthropic batch requests (typed loosely: the SDK's TypedDicts want literal keys)."""
    return [{"custom_id": cid, "params": body} for cid, body in params.items()]


def _jsonl(url: str, bodies: dict[str, dict[str, Any]]) -> bytes:
    lines = [
        json.dumps({"custom_id": cid, "method": "POST", "url": url, "body": body})
        for cid, body in bodies.items()
    ]
    return ("\n".join(lines) + "\n").encode("utf-8")


def _openai(server: FakeLLMServer, timeout: float = 10.0) -> openai.OpenAI:
    return openai.OpenAI(
        api_key="test-key", base_url=server.base_url + "/v1", max_retries=0, timeout=timeout
    )


def _anthropic(server: FakeLLMServer) -> anthropic.Anthropic:
    return anthropic.Anthropic(
        api_key="test-key", base_url=server.base_url, max_retries=0, timeout=10.0
    )


def _submit(
    client: openai.OpenAI, url: Endpoint, bodies: dict[str, dict[str, Any]], **extra: Any
) -> Batch:
    file = client.files.create(file=("requests.jsonl", _jsonl(url, bodies)), purpose="batch")
    return client.batches.create(
        input_file_id=file.id,
        endpoint=url,
        completion_window="24h",
        **extra,
    )


def _lines(client: openai.OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    return [json.loads(line) for line in client.files.content(file_id).text.splitlines()]


def _by_id(lines: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {line["custom_id"]: line for line in lines}


# --- OpenAI -----------------------------------------------------------------------------------


def test_openai_chat_batch_answers_like_the_synchronous_endpoint(server: FakeLLMServer) -> None:
    bodies = {f"r{i}": _chat_body(i) for i in range(8)}
    with _openai(server) as client:
        created = _submit(client, CHAT, bodies, metadata={"run": "one"})
        assert (created.status, created.endpoint, created.completion_window) == (
            "in_progress", CHAT, "24h",
        )  # fmt: skip
        assert created.request_counts is not None
        assert (created.request_counts.total, created.request_counts.completed) == (8, 0)
        assert created.output_file_id is None
        batch = client.batches.retrieve(created.id)  # in_progress_s=0: ended by now
        assert batch.status == "completed"
        assert batch.completed_at is not None and batch.error_file_id is None
        assert batch.request_counts is not None
        assert (batch.request_counts.completed, batch.request_counts.failed) == (8, 0)
        assert batch.output_file_id is not None
        info = client.files.retrieve(batch.output_file_id)
        assert (info.purpose, info.filename) == ("batch_output", f"{batch.id}_output.jsonl")
        output = _lines(client, batch.output_file_id)
        n_requests_before = len(server.requests)
        synchronous = {cid: client.chat.completions.create(**body) for cid, body in bodies.items()}
        uploaded = client.files.content(created.input_file_id).content
    assert n_requests_before == 0  # batch lines never show up as synchronous requests
    assert [line["custom_id"] for line in output] != list(bodies)  # results come shuffled
    assert sorted(_by_id(output)) == sorted(bodies)
    for cid, line in _by_id(output).items():
        assert line["id"].startswith("batch_req_") and line["error"] is None
        response = line["response"]
        assert response["status_code"] == 200 and response["request_id"]
        reply = ChatCompletion.model_validate(response["body"])
        assert reply.choices == synchronous[cid].choices  # content and logprobs alike
        assert json.loads(reply.choices[0].message.content or "")["echo"] == _user(int(cid[1:]))
        assert reply.usage is not None and synchronous[cid].usage is not None
        assert reply.usage.prompt_tokens == synchronous[cid].usage.prompt_tokens
    assert uploaded == _jsonl(CHAT, bodies)
    [upload] = server.batches.uploads
    assert (upload.file_id, upload.n_lines, upload.purpose) == (created.input_file_id, 8, "batch")
    assert upload.custom_ids == tuple(bodies)
    [record] = server.batches.created
    assert (record.provider, record.batch_id, record.endpoint) == ("openai", created.id, CHAT)
    assert (record.n_requests, record.custom_ids, record.metadata) == (8, tuple(bodies),
                                                                       {"run": "one"})  # fmt: skip
    assert record.status == "in_progress" and record.input_file_id == created.input_file_id
    lines = server.batches.lines
    assert [line.custom_id for line in lines] == list(bodies)  # answered in input order
    assert {(line.provider, line.wire, line.status) for line in lines} == {("openai", "chat", 200)}
    assert [r.wire for r in server.requests] == ["chat"] * 8
    assert [d.kind for d in server.batches.downloads] == ["output", "input"]
    assert server.batches.result_downloads == 1
    assert server.batches.submitted() == server.batches.answered() == dict.fromkeys(bodies, 1)


def test_openai_responses_batch_scripted_line_errors_async(server: FakeLLMServer) -> None:
    bodies = {f"q{i}": _responses_body(i) for i in range(6)}
    server.script(RateLimited(2.0), ServerError(503), BadRequest(400, "nope"), Raw("plain"),
                  Refusal("no way"))  # fmt: skip

    async def go() -> tuple[Batch, list[dict[str, Any]], list[dict[str, Any]], Response]:
        async with openai.AsyncOpenAI(
            api_key="k", base_url=server.base_url + "/v1", max_retries=0, timeout=10.0
        ) as client:
            data = _jsonl(RESPONSES, bodies)
            file = await client.files.create(file=("r.jsonl", data), purpose="batch")
            batch = await client.batches.create(
                input_file_id=file.id, endpoint=RESPONSES, completion_window="24h"
            )
            for _ in range(1000):
                batch = await client.batches.retrieve(batch.id)
                if batch.status == "completed":
                    break
                await asyncio.sleep(0.01)
            assert batch.output_file_id and batch.error_file_id
            output = (await client.files.content(batch.output_file_id)).text
            errors = (await client.files.content(batch.error_file_id)).text
            synchronous = await client.responses.create(**bodies["q5"])
        parse = [json.loads(line) for line in output.splitlines()]
        return batch, parse, [json.loads(line) for line in errors.splitlines()], synchronous

    batch, output, errors, synchronous = asyncio.run(go())
    assert batch.request_counts is not None
    assert (batch.request_counts.completed, batch.request_counts.failed) == (3, 3)
    failed = _by_id(errors)
    assert sorted(failed) == ["q0", "q1", "q2"]  # the script went to the lines in input order
    statuses = {cid: line["response"]["status_code"] for cid, line in failed.items()}
    assert statuses == {"q0": 429, "q1": 503, "q2": 400}
    assert failed["q0"]["response"]["body"]["error"]["code"] == "rate_limit_exceeded"
    assert failed["q1"]["response"]["body"]["error"]["type"] == "server_error"
    assert failed["q2"]["response"]["body"]["error"]["message"] == "nope"
    assert all(line["error"] is None for line in errors)
    ok = {cid: Response.model_validate(line["response"]["body"]) for cid, line in
          _by_id(output).items()}  # fmt: skip
    assert ok["q3"].output_text == "plain"
    [part] = _by_id(output)["q4"]["response"]["body"]["output"][0]["content"]
    assert (part["type"], part["refusal"]) == ("refusal", "no way")
    assert ok["q5"].output_text == synchronous.output_text
    assert json.loads(ok["q5"].output_text)["echo"] == _user(5)
    assert [(r.custom_id, r.status) for r in server.batches.lines][:3] == [
        ("q0", 429), ("q1", 503), ("q2", 400),
    ]  # fmt: skip
    assert server.pending == 0


def test_openai_partial_progress_and_expiry(server: FakeLLMServer) -> None:
    clock = _manual(server, in_progress_s=10.0, partial=True, expire={"r1"}, expire_count=1)
    bodies = {f"r{i}": _chat_body(i) for i in range(6)}  # r1 and r5 expire: 4 to answer
    with _openai(server) as client:
        batch = _submit(client, CHAT, bodies)
        clock.now += 5.0
        middle = client.batches.retrieve(batch.id)
        assert middle.status == "in_progress"
        assert middle.request_counts is not None
        assert (middle.request_counts.completed, middle.request_counts.failed) == (2, 0)
        assert middle.output_file_id is None  # results only once the batch ended
        assert [line.custom_id for line in server.batches.lines] == ["r0", "r2"]
        clock.now += 5.0
        ended = client.batches.retrieve(batch.id)
        output, errors = _lines(client, ended.output_file_id), _lines(client, ended.error_file_id)
    assert ended.status == "expired" and ended.expired_at is not None
    assert ended.completed_at is None
    assert ended.request_counts is not None
    assert (ended.request_counts.completed, ended.request_counts.failed) == (4, 2)
    assert sorted(_by_id(output)) == ["r0", "r2", "r3", "r4"]
    assert sorted(_by_id(errors)) == ["r1", "r5"]
    for line in errors:
        assert line["response"] is None
        assert line["error"]["code"] == "batch_expired" and line["error"]["message"]
    assert server.batches.answered() == dict.fromkeys(["r0", "r2", "r3", "r4"], 1)


def test_openai_real_time_batch_stays_in_progress_then_ends(server: FakeLLMServer) -> None:
    server.batches.settings = BatchSettings(in_progress_s=0.3, partial=True)
    bodies = {f"r{i}": _chat_body(i) for i in range(10)}
    seen: list[int] = []

    def fetch() -> Batch:
        batch = client.batches.retrieve(created.id)
        assert batch.request_counts is not None
        seen.append(batch.request_counts.completed)
        return batch

    with _openai(server) as client:
        started = time.monotonic()
        created = _submit(client, CHAT, bodies)
        ended = _poll(fetch, lambda b: b.status != "in_progress")
    assert created.status == "in_progress"
    assert ended.status == "completed"
    assert time.monotonic() - started >= 0.3  # never earlier than in_progress_s
    assert seen == sorted(seen) and seen[-1] == 10  # counts only grow


def test_openai_cancel_keeps_the_finished_lines(server: FakeLLMServer) -> None:
    clock = _manual(server, in_progress_s=10.0, partial=True)
    bodies = {f"r{i}": _chat_body(i) for i in range(4)}
    with _openai(server) as client:
        batch = _submit(client, CHAT, bodies)
        clock.now += 5.0
        cancelling = client.batches.cancel(batch.id)
        assert cancelling.status == "cancelling" and cancelling.cancelling_at is not None
        clock.now += 60.0  # a cancelled batch answers no more lines
        cancelled = client.batches.retrieve(batch.id)
        assert cancelled.status == "cancelled" and cancelled.cancelled_at is not None
        output = _lines(client, cancelled.output_file_id)
        errors = _lines(client, cancelled.error_file_id)
        with pytest.raises(openai.ConflictError, match="cancelled"):
            client.batches.cancel(batch.id)
    assert sorted(_by_id(output)) == ["r0", "r1"]
    assert sorted(_by_id(errors)) == ["r2", "r3"]
    assert {line["error"]["code"] for line in errors} == {"batch_cancelled"}
    assert [line.custom_id for line in server.batches.lines] == ["r0", "r1"]


def test_openai_bad_files_fail_the_batch(server: FakeLLMServer) -> None:
    body = _chat_body(0)
    lines = [
        {"custom_id": "a", "method": "POST", "url": CHAT, "body": body},
        {"custom_id": "a", "method": "POST", "url": CHAT, "body": body},
        {"custom_id": "b", "method": "POST", "url": RESPONSES, "body": body},
        {"custom_id": "c", "method": "GET", "url": CHAT, "body": body},
    ]
    data = ("\n".join(json.dumps(line) for line in lines) + "\nnot json\n").encode()
    with _openai(server) as client:
        file = client.files.create(file=("bad.jsonl", data), purpose="batch")
        created = client.batches.create(
            input_file_id=file.id, endpoint=CHAT, completion_window="24h"
        )
        failed = client.batches.retrieve(created.id)
        server.batches.settings = BatchSettings(fail="quota exceeded")
        good = _submit(client, CHAT, {"x": body})
        refused = client.batches.retrieve(good.id)
        with pytest.raises(openai.NotFoundError):
            client.batches.create(input_file_id="file-nope", endpoint=CHAT,
                                  completion_window="24h")  # fmt: skip
        with pytest.raises(openai.BadRequestError, match="endpoint"):
            client.batches.create(input_file_id=file.id, endpoint="/v1/embeddings",
                                  completion_window="24h")  # fmt: skip
        with pytest.raises(openai.NotFoundError):
            client.batches.retrieve("batch_nope")
    assert created.status == "validating"
    assert created.request_counts is not None and created.request_counts.total == 0
    assert failed.status == "failed" and failed.failed_at is not None
    assert failed.output_file_id is None and failed.error_file_id is None
    assert failed.errors is not None and failed.errors.data is not None
    codes = [(e.code, e.line) for e in failed.errors.data]
    assert codes == [("duplicate_custom_id", 2), ("mismatched_endpoint", 3),
                     ("invalid_method", 4), ("invalid_json_line", 5)]  # fmt: skip
    assert refused.status == "failed"
    assert refused.errors is not None and refused.errors.data is not None
    assert [(e.code, e.message) for e in refused.errors.data] == [("batch_failed",
                                                                   "quota exceeded")]  # fmt: skip
    assert server.batches.lines == []
    assert [r.status for r in server.batches.created] == ["validating", "validating"]


def test_openai_list_and_a_create_reply_that_never_arrives(server: FakeLLMServer) -> None:
    with _openai(server) as client:
        ids = [_submit(client, CHAT, {"r": _chat_body(i)}).id for i in range(3)]
        first = client.batches.list(limit=2)
        assert [b.id for b in first.data] == ids[:0:-1] and first.has_more
        assert [b.id for b in client.batches.list(limit=2)] == ids[::-1]  # auto-paging
        server.batches.settings = BatchSettings(create_delay_s=3.0)
        with _openai(server, timeout=0.5) as impatient, pytest.raises(openai.APITimeoutError):
            _submit(impatient, CHAT, {"lost": _chat_body(9)}, metadata={"run": "lost"})
        newest = client.batches.list(limit=1).data[0]
    assert newest.id not in ids and newest.metadata == {"run": "lost"}
    assert newest.status == "completed"  # it went on regardless
    assert server.batches.created[-1].batch_id == newest.id
    assert server.batches.submitted()["lost"] == 1


# --- Anthropic --------------------------------------------------------------------------------


def test_anthropic_batch_answers_like_the_synchronous_endpoint(server: FakeLLMServer) -> None:
    requests = {f"a{i}": _messages_body(i) for i in range(6)}
    with _anthropic(server) as client:
        created = client.messages.batches.create(requests=_requests(requests))
        ended = client.messages.batches.retrieve(created.id)
        results = list(client.messages.batches.results(created.id))
        synchronous = {cid: client.messages.create(**p) for cid, p in requests.items()}
    assert created.processing_status == "in_progress" and created.results_url is None
    assert created.request_counts.processing == 6
    assert ended.processing_status == "ended" and ended.ended_at is not None
    assert ended.results_url == f"{server.base_url}/v1/messages/batches/{created.id}/results"
    assert ended.request_counts.succeeded == 6 and ended.request_counts.processing == 0
    assert [r.custom_id for r in results] != list(requests)
    assert sorted(r.custom_id for r in results) == sorted(requests)
    system_tokens = math.ceil(len(SYSTEM) / 4)
    cache_writes = 0
    for result in results:
        assert result.result.type == "succeeded"
        message, sync = result.result.message, synchronous[result.custom_id]
        assert message.stop_reason == sync.stop_reason == "tool_use"
        [block], [sync_block] = message.content, sync.content
        assert block.type == sync_block.type == "tool_use"
        assert (block.name, block.input) == (sync_block.name, sync_block.input)
        assert cast(dict[str, Any], block.input)["echo"] == _user(int(result.custom_id[1:]))
        assert message.usage.input_tokens == sync.usage.input_tokens
        cache_writes += message.usage.cache_creation_input_tokens or 0
    assert cache_writes == system_tokens  # the batch shares the server's prompt cache
    [record] = server.batches.created
    assert (record.provider, record.endpoint, record.n_requests) == ("anthropic", "/v1/messages", 6)
    assert record.custom_ids == tuple(requests) and record.metadata is None
    assert {(r.wire, r.status) for r in server.batches.lines} == {("anthropic", 200)}
    assert [r.path for r in server.requests] == ["/v1/messages"] * 6
    assert [(d.provider, d.kind, d.batch_id) for d in server.batches.downloads] == [
        ("anthropic", "results", created.id)
    ]


def test_anthropic_async_client_iterates_results(server: FakeLLMServer) -> None:
    server.batches.settings = BatchSettings(in_progress_s=0.2)

    async def go() -> tuple[Any, list[Any]]:
        async with anthropic.AsyncAnthropic(
            api_key="k", base_url=server.base_url, max_retries=0, timeout=10.0
        ) as client:
            batch = await client.messages.batches.create(
                requests=_requests({f"b{i}": _messages_body(i) for i in range(3)})
            )
            give_up = time.monotonic() + DEADLINE_S
            while batch.processing_status != "ended":
                assert time.monotonic() < give_up
                await asyncio.sleep(0.02)
                batch = await client.messages.batches.retrieve(batch.id)
            decoder = await client.messages.batches.results(batch.id)
            return batch, [result async for result in decoder]

    batch, results = asyncio.run(go())
    assert batch.request_counts.succeeded == 3
    assert sorted(r.custom_id for r in results) == ["b0", "b1", "b2"]
    assert {r.result.type for r in results} == {"succeeded"}


def test_anthropic_errored_and_expired_results(server: FakeLLMServer) -> None:
    server.batches.settings = BatchSettings(expire_count=1)
    server.script(ServerError(), ServerError(529), BadRequest(), RateLimited(1.0), Hang(30.0))
    requests = _requests({f"e{i}": _messages_body(i) for i in range(6)})
    with _anthropic(server) as client:
        batch = client.messages.batches.create(requests=requests)
        ended = client.messages.batches.retrieve(batch.id)
        results = {r.custom_id: r.result for r in client.messages.batches.results(batch.id)}
    counts = ended.request_counts
    assert (counts.errored, counts.succeeded, counts.expired) == (4, 1, 1)
    kinds: dict[str, str] = {}
    for cid, result in results.items():
        if result.type == "errored":
            assert result.error.type == "error"
            kinds[cid] = result.error.error.type
        else:
            kinds[cid] = result.type
    assert kinds == {
        "e0": "api_error",
        "e1": "overloaded_error",
        "e2": "invalid_request_error",
        "e3": "rate_limit_error",
        "e4": "succeeded",  # a Hang answers a batch line at once
        "e5": "expired",
    }


def test_anthropic_cancel_and_results_before_the_end(server: FakeLLMServer) -> None:
    clock = _manual(server, in_progress_s=10.0, partial=True)
    requests = _requests({f"c{i}": _messages_body(i) for i in range(4)})
    with _anthropic(server) as client:
        batch = client.messages.batches.create(requests=requests)
        with pytest.raises(anthropic.AnthropicError, match="results_url"):
            client.messages.batches.results(batch.id)  # the SDK checks the batch first
        with pytest.raises(anthropic.BadRequestError):
            client.get(f"/v1/messages/batches/{batch.id}/results", cast_to=object)
        with pytest.raises(anthropic.BadRequestError, match="cancel it first"):
            client.messages.batches.delete(batch.id)
        clock.now += 5.0
        middle = client.messages.batches.retrieve(batch.id)
        canceling = client.messages.batches.cancel(batch.id)
        ended = client.messages.batches.retrieve(batch.id)
        results = {r.custom_id: r.result.type for r in client.messages.batches.results(batch.id)}
        again = client.messages.batches.cancel(batch.id)  # an ended batch stays as it is
        deleted = client.messages.batches.delete(batch.id)
        with pytest.raises(anthropic.NotFoundError):
            client.messages.batches.retrieve(batch.id)
    assert middle.processing_status == "in_progress"
    assert (middle.request_counts.processing, middle.request_counts.succeeded) == (2, 2)
    assert canceling.processing_status == "canceling"
    assert canceling.cancel_initiated_at is not None
    assert ended.processing_status == "ended"
    assert (ended.request_counts.succeeded, ended.request_counts.canceled) == (2, 2)
    assert results == {"c0": "succeeded", "c1": "succeeded", "c2": "canceled", "c3": "canceled"}
    assert again.processing_status == "ended"
    assert (deleted.id, deleted.type) == (batch.id, "message_batch_deleted")


def test_anthropic_validation_and_list(server: FakeLLMServer) -> None:
    params = _messages_body(0)
    bad_ids = ["has space", "x" * 65, ""]
    with _anthropic(server) as client:
        for bad in bad_ids:
            with pytest.raises(anthropic.BadRequestError, match="custom_id"):
                client.messages.batches.create(requests=_requests({bad: params}))
        with pytest.raises(anthropic.BadRequestError, match="duplicate"):
            client.messages.batches.create(requests=_requests({"same": params}) * 2)
        assert server.batches.created == []
        ids = [
            client.messages.batches.create(requests=_requests({f"l{i}": params})).id
            for i in range(3)
        ]
        page = client.messages.batches.list(limit=2)
        after = client.messages.batches.list(limit=2, after_id=ids[1])
        before = client.messages.batches.list(limit=2, before_id=ids[0])
        everything = [b.id for b in client.messages.batches.list(limit=1)]
    newest_first = ids[::-1]
    assert [b.id for b in page.data] == newest_first[:2] and page.has_more
    assert (page.first_id, page.last_id) == (newest_first[0], newest_first[1])
    assert [b.id for b in after.data] == [ids[0]] and not after.has_more
    assert [b.id for b in before.data] == newest_first[:2] and not before.has_more
    assert everything == newest_first
    assert {b.processing_status for b in page.data} == {"ended"}


# --- controls and records ---------------------------------------------------------------------


def test_scripted_batch_calls_resubmissions_and_reset(server: FakeLLMServer) -> None:
    server.batches.script(ServerError(), RateLimited(0.5))
    with pytest.raises(TypeError):
        server.batches.script(Raw("x"))
    bodies = {"r0": _chat_body(0), "r1": _chat_body(1)}
    with _openai(server) as client, _anthropic(server) as an:
        with pytest.raises(openai.InternalServerError):
            _submit(client, CHAT, bodies)
        with pytest.raises(anthropic.RateLimitError) as limited:
            an.messages.batches.create(requests=_requests({"z": _messages_body(0)}))
        assert limited.value.response.headers["retry-after"] == "0.5"
        assert server.batches.uploads == [] and server.batches.created == []
        first, second = _submit(client, CHAT, bodies), _submit(client, CHAT, bodies)
        for batch in (first, second):
            client.batches.retrieve(batch.id)
        calls = server.batches.calls
        server.reset()
        assert server.batches.created == [] and server.batches.lines == []
        assert server.batches.calls == [] and server.batches.uploads == []
        with pytest.raises(openai.NotFoundError):
            client.batches.retrieve(first.id)
    assert [(c.provider, c.method, c.status) for c in calls[:2]] == [
        ("openai", "POST", 500), ("anthropic", "POST", 429),
    ]  # fmt: skip
    assert calls[-1].path == f"/v1/batches/{second.id}" and calls[-1].method == "GET"
    assert server.batches.settings == BatchSettings()


def test_resubmitted_requests_are_counted(server: FakeLLMServer) -> None:
    bodies = {"r0": _chat_body(0), "r1": _chat_body(1)}
    with _openai(server) as client:
        first = _submit(client, CHAT, bodies)
        second = _submit(client, CHAT, {"r0": bodies["r0"]})  # r0 again, as after a crash
        for batch_id in (first.id, second.id):
            fetch = functools.partial(client.batches.retrieve, batch_id)
            _poll(fetch, lambda b: b.status == "completed")
    assert server.batches.submitted() == {"r0": 2, "r1": 1}
    assert server.batches.answered() == {"r0": 2, "r1": 1}
    assert [(r.batch_id, r.custom_id) for r in server.batches.lines] == [
        (first.id, "r0"), (first.id, "r1"), (second.id, "r0"),
    ]  # fmt: skip
    assert [u.custom_ids for u in server.batches.uploads] == [("r0", "r1"), ("r0",)]


def test_wrong_method_and_multipart_parsing(server: FakeLLMServer) -> None:
    request = urllib.request.Request(server.base_url + "/v1/batches", method="PUT")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=10)
    assert refused.value.code == 405
    body = (
        b'--XyZ\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
        b'--XyZ\r\nContent-Disposition: form-data; name="file"; filename="a.jsonl"\r\n'
        b"Content-Type: application/octet-stream\r\n\r\nline 1\r\nline 2\r\n--XyZ--\r\n"
    )
    fields = parse_multipart("multipart/form-data; boundary=XyZ", body)
    assert fields["purpose"].data == b"batch"
    assert (fields["file"].filename, fields["file"].data) == ("a.jsonl", b"line 1\r\nline 2")
    assert fields["file"].content_type == "application/octet-stream"
    with pytest.raises(ValueError):
        parse_multipart("application/json", body)
