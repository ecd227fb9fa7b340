"""The reply cache believes only what answers the request asking: a shared cache folder's
files swapped, cut short, flipped or edited are asked again (and rewritten once their
reply is in), a reply of one model never answers another model's request, and a key a
model repeats in a successful reply is stored nowhere: not in the run's store, not in
the cache folder, not in the batch transport's results. Driven through the real OpenAI
SDK against the loopback fake."""

from __future__ import annotations

import json
import logging
import shutil
import sqlite3
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from labeler.judges import make_judge
from labeler.judges.base import JudgeOptions
from labeler.judges.requests import ApiRequest, FolderCache, KeptReply, pack
from labeler.labeling import label_run
from labeler.labeling.store import LabelStore
from labeler.labeling.transports.batch import BatchSettings, label_in_batches
from labeler.run.data import RunData
from labeler.run.schemas import Usage
from tests.fake_llm import FakeAnswer, FakeLLMServer, FakeRequest, oracle

JUDGE = "openai:gpt-5-mini"
OTHER_JUDGE = "openai:gpt-5-nano"
CALLS = 8 * 4  # two features per layer, four stages each
SECRET = "cachekey-7f3a9c2e51"
"""The configured key: not shaped like a provider's key, so only its value finds it."""


@pytest.fixture
def fake(
    fresh_fake: FakeLLMServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> FakeLLMServer:
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    monkeypatch.setenv("LABELER_CACHE_DIR", str(tmp_path / "cache"))
    return fresh_fake


def _judge(fake: FakeLLMServer, name: str = JUDGE) -> Any:
    return make_judge(name, JudgeOptions(base_url=f"{fake.base_url}/v1", openai_api="chat"))


def _fresh_copy(collected: Any, where: Path) -> Path:
    shutil.copytree(collected.run, where)
    (where / "labels.sqlite").unlink(missing_ok=True)
    return where


def _label(run: Path, fake: FakeLLMServer, name: str = JUDGE) -> dict[str, Any]:
    store = LabelStore(run / "labels.sqlite")
    report = label_run(RunData.open(run), store, _judge(fake, name), sample_per_layer=2,
                       concurrency=4)  # fmt: skip
    assert (report.labeled, report.failed) == (8, 0)
    judgments = {fid: s.judgment for fid, s in store.judgments(name).items()}
    store.close()
    return judgments


def _labels(judgments: dict[str, Any]) -> dict[str, Any]:
    return {f: (j.explanation, j.classification) for f, j in judgments.items()}


def _usage(judgments: dict[str, Any]) -> Usage:
    return sum((u for j in judgments.values() for u in j.usage.values()), Usage())


def _kept(run: Path) -> dict[str, str]:
    """The message text of every reply the run's store kept, by request key."""
    with sqlite3.connect(run / "labels.sqlite") as conn:
        rows = conn.execute("SELECT key, reply FROM replies").fetchall()
    return {k: json.loads(zlib.decompress(b))["choices"][0]["message"]["content"] for k, b in rows}


def _entry(cache: Path, key: str) -> Path:
    return cache / key[:2] / f"{key}.json.z"


def _warned_about(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def _two_differing(kept: dict[str, str], field: str) -> list[str]:
    """Keys of two replies of one stage (those with ``field``) that say different things."""
    by_answer: dict[str, str] = {}
    for key, text in sorted(kept.items()):
        answer = json.loads(text)
        if field in answer:
            by_answer.setdefault(json.dumps(answer[field]), key)
    assert len(by_answer) >= 2, f"the run has no two differing {field} replies"
    return sorted(by_answer.values())[:2]


def test_swapped_cache_files_are_asked_again_not_believed(
    fake: FakeLLMServer, collected: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first_run = _fresh_copy(collected, tmp_path / "a")
    first = _label(first_run, fake)
    cache = tmp_path / "cache"
    kept = _kept(first_run)
    swapped: list[Path] = []
    for field in ("explanation", "category"):
        one, other = (_entry(cache, k) for k in _two_differing(kept, field))
        blob = one.read_bytes()
        one.write_bytes(other.read_bytes())
        other.write_bytes(blob)
        swapped += [one, other]
    calls = len(fake.requests)
    with caplog.at_level(logging.WARNING):
        again = _label(_fresh_copy(collected, tmp_path / "b"), fake)
    assert _labels(again) == _labels(first)  # not one label from the wrong reply
    assert len(fake.requests) - calls == len(swapped)  # the four, paid again
    usage = _usage(again)
    assert (usage.calls, usage.cached_replies) == (4, CALLS - 4)
    warned = _warned_about(caplog)
    assert sorted(p for p in swapped for w in warned if str(p) in w) == sorted(swapped)
    assert len(warned) == len(swapped)  # once each


def test_a_damaged_entry_is_paid_once_then_rewritten(
    fake: FakeLLMServer, collected: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first_run = _fresh_copy(collected, tmp_path / "a")
    first = _label(first_run, fake)
    cache = tmp_path / "cache"
    kept = _kept(first_run)
    cut, flipped, edited = (_entry(cache, k) for k in sorted(kept)[:3])
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    blob = bytearray(flipped.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    flipped.write_bytes(bytes(blob))
    # an entry edited by hand, still a well-formed file: its reply's id changed
    text = zlib.decompress(edited.read_bytes())
    assert b"chatcmpl-fake" in text
    edited.write_bytes(zlib.compress(text.replace(b"chatcmpl-fake", b"chatcmpl-edit")))
    calls = len(fake.requests)
    with caplog.at_level(logging.WARNING):
        second = _label(_fresh_copy(collected, tmp_path / "b"), fake)
    assert len(fake.requests) - calls == 3  # each damaged entry paid once
    assert _labels(second) == _labels(first)
    warned = _warned_about(caplog)
    assert all(any(str(p) in w for w in warned) for p in (cut, flipped, edited))
    calls = len(fake.requests)
    third = _label(_fresh_copy(collected, tmp_path / "c"), fake)
    assert len(fake.requests) == calls  # rewritten: nothing paid a third time
    assert _usage(third).cached_replies == CALLS


def test_an_entry_of_the_earlier_layout_is_a_quiet_miss_then_rewritten(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A folder filled before entries carried their request (a bare compressed reply)
    still works: each entry is asked again once, without a warning, and rewritten."""
    body = {"model": "gpt-5-mini", "messages": []}
    request = ApiRequest("openai", "gpt-5-mini", "/v1/chat/completions", body, "http://x/v1")
    reply = {"model": "gpt-5-mini-2025-08-07", "choices": [{"message": {"content": "{}"}}]}
    cache = FolderCache(tmp_path)
    old = _entry(tmp_path, request.key)
    old.parent.mkdir(parents=True)
    old.write_bytes(pack(reply))
    with caplog.at_level(logging.WARNING):
        assert cache.lookup(request) is None
    assert _warned_about(caplog) == []
    cache.put(KeptReply(key=request.key, provider=request.provider, model=request.model,
                        endpoint=request.endpoint, reply=reply))  # fmt: skip
    assert cache.lookup(request) == reply


def _pair_by_answer(run_a: Path, run_b: Path) -> dict[str, str]:
    """For each request of run b, the key of a request of run a answered the same text
    (the same prompt asked of the other model)."""
    by_text = {text: key for key, text in _kept(run_a).items()}
    return {key: by_text[text] for key, text in _kept(run_b).items()}


def test_a_reply_cached_for_one_model_does_not_answer_another(
    fake: FakeLLMServer, collected: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_a = _fresh_copy(collected, tmp_path / "a")
    _label(run_a, fake, JUDGE)
    monkeypatch.setenv("LABELER_CACHE_DIR", str(tmp_path / "cache-b"))
    run_b = _fresh_copy(collected, tmp_path / "b")
    _label(run_b, fake, OTHER_JUDGE)
    # a cache folder whose files at the other model's addresses hold this model's replies
    # (folders merged by hand, a file copied under another name)
    mixed = tmp_path / "mixed"
    for b_key, a_key in _pair_by_answer(run_a, run_b).items():
        _entry(mixed, b_key).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(_entry(tmp_path / "cache", a_key), _entry(mixed, b_key))
    monkeypatch.setenv("LABELER_CACHE_DIR", str(mixed))
    calls = len(fake.requests)
    again = _label(_fresh_copy(collected, tmp_path / "c"), fake, OTHER_JUDGE)
    assert len(fake.requests) - calls == CALLS  # every request asked of its own model
    assert {r.body["model"] for r in fake.requests[calls:]} == {"gpt-5-nano"}
    assert _usage(again).cached_replies == 0


def test_a_reply_naming_another_model_is_not_kept(
    collected: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server that answers as the model it has loaded, whatever model the request
    names: its replies answer no later request for the model asked for."""

    def loaded_model(request: FakeRequest) -> FakeAnswer:
        request.model = "some-other-model"  # what the reply says served it
        return oracle(request)

    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    monkeypatch.setenv("LABELER_CACHE_DIR", str(tmp_path / "cache"))
    run = _fresh_copy(collected, tmp_path / "a")
    with FakeLLMServer(loaded_model) as server:  # one server: the same requests' keys
        _label(run, server)
        server.responder = oracle  # now serving the model asked for
        again = _label(_fresh_copy(collected, tmp_path / "b"), server)
        assert len(server.requests) == 2 * CALLS
    assert _usage(again).cached_replies == 0
    with sqlite3.connect(run / "labels.sqlite") as conn:
        assert conn.execute("SELECT count(*) FROM replies").fetchone()[0] == 0


# -- a key inside a successful reply ------------------------------------------------------


def _repeating_the_key(request: FakeRequest) -> FakeAnswer:
    """The oracle's answers, with the key it was sent repeated in every explanation and
    rationale (a model echoing what its prompt or headers held)."""
    answer = oracle(request)
    content = dict(answer.content)
    for field in ("explanation", "rationale"):
        if field in content:
            content[field] = f"{content[field]} {SECRET}"
    return FakeAnswer(content, answer.true_probs)


@pytest.fixture(scope="module")
def leaky() -> Iterator[FakeLLMServer]:
    with FakeLLMServer(_repeating_the_key) as fake:
        yield fake


def _files_holding_the_key(root: Path) -> list[str]:
    """Every file under ``root`` whose bytes, or whose bytes decompressed, or whose SQLite
    blobs decompressed, hold the key."""
    needle = SECRET.encode()
    found: list[str] = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        data = path.read_bytes()
        try:
            inflated = zlib.decompress(data)
        except zlib.error:
            inflated = b""
        if needle in data or needle in inflated:
            found.append(str(path.relative_to(root)))
    for db in sorted(root.rglob("labels.sqlite")):
        with sqlite3.connect(db) as conn:
            for table in ("replies", "batch_requests"):
                for (blob,) in conn.execute(f"SELECT reply FROM {table} WHERE reply IS NOT NULL"):
                    if needle in zlib.decompress(blob):
                        found.append(f"{db.relative_to(root)}: {table}")
    return found


def test_a_key_repeated_in_a_reply_is_stored_nowhere(
    leaky: FakeLLMServer, collected: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    leaky.reset()
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    monkeypatch.setenv("LABELER_CACHE_DIR", str(tmp_path / "cache"))
    judgments = _label(_fresh_copy(collected, tmp_path / "run"), leaky)
    assert all("[REDACTED]" in j.explanation for j in judgments.values())  # it was there
    assert _files_holding_the_key(tmp_path) == []
    # and the kept replies still answer a copy of the run, at no cost
    again = _label(_fresh_copy(collected, tmp_path / "copy"), leaky)
    assert _usage(again).cached_replies == CALLS


def test_a_key_repeated_in_a_batch_result_is_stored_nowhere(
    leaky: FakeLLMServer, collected: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    leaky.reset()
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    monkeypatch.setenv("LABELER_CACHE_DIR", str(tmp_path / "cache"))
    run = _fresh_copy(collected, tmp_path / "run")
    store = LabelStore(run / "labels.sqlite")
    reports, _ = label_in_batches(RunData.open(run), store, [_judge(leaky)],
                                  BatchSettings(poll_s=0.05), sample_per_layer=2)  # fmt: skip
    store.close()
    assert reports[JUDGE].labeled == 8 and leaky.batches.created != []
    assert _files_holding_the_key(tmp_path) == []
