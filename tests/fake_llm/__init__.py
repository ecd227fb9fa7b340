"""A fake LLM endpoint for tests and benchmarks: a loopback HTTP server that speaks
OpenAI Chat Completions, OpenAI Responses and Anthropic Messages well enough for the
official SDKs, scripted failures included, and a rule-based oracle that answers the
labeler's prompts. ``server.batches`` adds the providers' batch APIs (OpenAI Files and
Batches, Anthropic Message Batches), see ``tests.fake_llm.batches``."""

from tests.fake_llm.batches import (
    BatchCall,
    BatchRecord,
    BatchSettings,
    DownloadRecord,
    FakeBatches,
    LineRecord,
    UploadRecord,
)
from tests.fake_llm.oracle import biased_feature, biased_oracle, oracle
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
    "BatchCall",
    "BatchRecord",
    "BatchSettings",
    "Behaviour",
    "DownloadRecord",
    "FakeAnswer",
    "FakeBatches",
    "FakeLLMServer",
    "FakeRequest",
    "Hang",
    "LineRecord",
    "RateLimited",
    "Raw",
    "RecordedRequest",
    "Refusal",
    "Responder",
    "ServerError",
    "UploadRecord",
    "Wire",
    "biased_feature",
    "biased_oracle",
    "oracle",
]
