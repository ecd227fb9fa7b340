"""A fake LLM endpoint for tests and benchmarks: a loopback HTTP server that speaks
OpenAI Chat Completions, OpenAI Responses and Anthropic Messages well enough for the
official SDKs, scripted failures included, and a rule-based oracle that answers the
labeler's prompts."""

from tests.fake_llm.oracle import oracle
from tests.fake_llm.server import (
    Answer,
    BadRequest,
    Behaviour,
    FakeAnswer,
    FakeLLMServer,
    FakeRequest,
    Hang,
    RateLimited,
    Raw,
    RecordedRequest,
    Refusal,
    Responder,
    ServerError,
    Wire,
)

__all__ = [
    "Answer",
    "BadRequest",
    "Behaviour",
    "FakeAnswer",
    "FakeLLMServer",
    "FakeRequest",
    "Hang",
    "RateLimited",
    "Raw",
    "RecordedRequest",
    "Refusal",
    "Responder",
    "ServerError",
    "Wire",
    "oracle",
]
