"""The reply cache: a request whose reply is kept, in the run's own store or in a shared
cache folder (``LABELER_CACHE_DIR``), is answered from it at no cost and recorded as
cached, on the in-process and the batch transports alike."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from labeler.judges import make_judge
from labeler.judges.base import JudgeOptions
from labeler.labeling import label_run
from labeler.labeling.store import LabelStore
from labeler.labeling.transports.batch import BatchSettings, label_in_batches
from labeler.run.data import RunData
from labeler.run.schemas import Usage
from tests.fake_llm import FakeLLMServer

JUDGE = "openai:gpt-5-mini"


@pytest.fixture
def fake(
    fresh_fake: FakeLLMServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> FakeLLMServer:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-cache")
    monkeypatch.setenv("LABELER_CACHE_DIR", str(tmp_path / "cache"))
    return fresh_fake


def _judge(fake: FakeLLMServer) -> Any:
    return make_judge(JUDGE, JudgeOptions(base_url=f"{fake.base_url}/v1", openai_api="chat"))


def _fresh_copy(collected: Any, where: Path) -> Path:
    shutil.copytree(collected.run, where)
    (where / "labels.sqlite").unlink(missing_ok=True)
    return where


def _label(run: Path, fake: FakeLLMServer) -> dict[str, Any]:
    store = LabelStore(run / "labels.sqlite")
    report = label_run(RunData.open(run), store, _judge(fake), sample_per_layer=2, concurrency=4)
    assert (report.labeled, report.failed) == (8, 0)
    judgments = {fid: s.judgment for fid, s in store.judgments(JUDGE).items()}
    store.close()
    return judgments


def _usage(judgments: dict[str, Any]) -> Usage:
    return sum((u for j in judgments.values() for u in j.usage.values()), Usage())


def test_a_copied_run_labeled_again_pays_nothing(
    fake: FakeLLMServer, collected: Any, tmp_path: Path
) -> None:
    first = _label(_fresh_copy(collected, tmp_path / "a"), fake)
    calls = len(fake.requests)
    assert calls == 8 * 4
    again = _label(_fresh_copy(collected, tmp_path / "b"), fake)
    assert len(fake.requests) == calls  # not one call more
    assert {f: j.explanation for f, j in again.items()} == {
        f: j.explanation for f, j in first.items()
    }
    assert {f: j.classification for f, j in again.items()} == {
        f: j.classification for f, j in first.items()
    }
    usage = _usage(again)
    assert (usage.calls, usage.cached_replies, usage.output_tokens) == (0, 32, 0)
    assert all(j.cost_usd == 0.0 for j in again.values())
    assert _usage(first).cached_replies == 0


def test_the_batch_transport_is_answered_from_the_cache_too(
    fake: FakeLLMServer, collected: Any, tmp_path: Path
) -> None:
    _label(_fresh_copy(collected, tmp_path / "a"), fake)
    run = _fresh_copy(collected, tmp_path / "b")
    store = LabelStore(run / "labels.sqlite")
    reports, left = label_in_batches(RunData.open(run), store, [_judge(fake)],
                                     BatchSettings(poll_s=0.05), sample_per_layer=2)  # fmt: skip
    assert reports[JUDGE].labeled == 8 and left.submitted == 0
    assert fake.batches.created == []
    store.close()


def test_the_runs_own_store_answers_a_relabeling(
    fake: FakeLLMServer, collected: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("LABELER_CACHE_DIR")
    run = _fresh_copy(collected, tmp_path / "a")
    _label(run, fake)
    calls = len(fake.requests)
    # labeled again from scratch (judgments and stage results dropped), same judge, same
    # prompts: the store's kept replies answer every request
    with sqlite3.connect(run / "labels.sqlite") as conn:
        conn.execute("DELETE FROM judgments")
        conn.execute("DELETE FROM stages")
        kept = conn.execute("SELECT count(*) FROM replies").fetchone()[0]
    assert kept == 32
    again = _label(run, fake)
    assert len(fake.requests) == calls
    assert _usage(again).cached_replies == 32
