"""LLM judges through the real OpenAI and Anthropic SDKs against the loopback fake: planted
features recovered, every scripted failure ending as a label or a recorded failure,
retries and Retry-After, cost, budget, dry run, status, and keys kept out of the store."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from labeler.cli import cli
from labeler.judges import make_judge
from labeler.judges.base import JudgeOptions
from labeler.labeling import LabelReport, label_run
from labeler.labeling.store import LabelStore
from labeler.run.data import RunData
from tests.fake_llm import (
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

SECRET = "sk-test-do-not-store-4242"
PRICES = {"prices": {"openai:fake-model": {"input": 1.0, "cached_input": 0.1, "output": 4.0},
                     "anthropic:fake-claude": {"input": 1.0, "cached_input": 0.1,
                                               "cache_write": 1.25, "output": 5.0}}}  # fmt: skip
WIRES = ["chat", "responses", "anthropic"]


@pytest.fixture(scope="module")
def server() -> Iterator[FakeLLMServer]:
    with FakeLLMServer(oracle) as fake:
        yield fake


@pytest.fixture
def fake(server: FakeLLMServer, monkeypatch: pytest.MonkeyPatch) -> FakeLLMServer:
    server.reset()
    server.responder = oracle  # type: ignore[attr-defined]
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    monkeypatch.setenv("ANTHROPIC_API_KEY", SECRET)
    monkeypatch.setenv("ANTHROPIC_BASE_URL", server.base_url)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    return server


@pytest.fixture
def prices(tmp_path: Path) -> Path:
    path = tmp_path / "prices.json"
    path.write_text(json.dumps(PRICES))
    return path


def _judge_name(wire: str) -> str:
    return "anthropic:fake-claude" if wire == "anthropic" else "openai:fake-model"


def _options(fake: FakeLLMServer, wire: str, prices: Path | None = None, **kw: Any) -> JudgeOptions:
    api = "chat" if wire == "chat" else "responses"
    base = None if wire == "anthropic" else f"{fake.base_url}/v1"
    return JudgeOptions(base_url=base, openai_api=api, prices=prices, **kw)


def _label(
    run: Path, fake: FakeLLMServer, wire: str, sample: int = 1, concurrency: int = 1,
    prices: Path | None = None, budget: float | None = None, **kw: Any,
) -> tuple[LabelReport, LabelStore]:  # fmt: skip
    judge = make_judge(_judge_name(wire), _options(fake, wire, prices, **kw))
    store = LabelStore(run / "labels.sqlite")
    report = label_run(RunData.open(run), store, judge, sample_per_layer=sample,
                       concurrency=concurrency, budget_usd=budget)  # fmt: skip
    return report, store


# -- planted features through each wire format ------------------------------------------


@pytest.mark.parametrize("wire", WIRES)
def test_planted_categories_recovered_through_each_sdk(
    wire: str, run_copy: Path, fake: FakeLLMServer, prices: Path, collected: Any
) -> None:
    report, store = _label(run_copy, fake, wire, sample=8, concurrency=8, prices=prices)
    name = _judge_name(wire)
    rows = store.judgments(name)
    assert report.labeled == 32 and report.failed == 0 and len(rows) == 32
    truth = {f["feature_id"]: f for f in json.loads(collected.paths.ground_truth.read_text())}
    scored = [(truth[fid]["category"], s.judgment.classification.category)
              for fid, s in rows.items() if s.judgment is not None]  # fmt: skip
    right = sum(planted == judged for planted, judged in scored)
    assert {planted for planted, _ in scored} >= {"reasoning", "domain", "language"}
    assert right / len(scored) >= 0.9, scored
    for s in rows.values():
        j = s.judgment
        assert j is not None and j.explanation.startswith("Fires on")
        assert j.detection.n_positive == 10 and j.detection.n_negative == 10
        assert j.detection.accuracy >= 0.5
        assert set(j.usage) == {"explain", "detect", "classify"}
        assert j.usage["detect"].calls == 2 and j.usage["explain"].calls == 1
        assert j.cost_usd is not None and j.cost_usd > 0
    cached = sum(s.judgment.usage["classify"].cached_tokens for s in rows.values() if s.judgment)
    assert cached > 0  # the shared instructions came from the prompt cache
    requests = [r for r in fake.requests if r.status == 200]
    assert len(requests) == 32 * 4
    if wire == "anthropic":
        system = requests[0].body["system"]
        assert system[0]["cache_control"] == {"type": "ephemeral"}
        assert requests[0].body["tool_choice"]["type"] == "tool"
    else:
        assert requests[0].wire == wire
    store.close()
    # the key reached the server in a header, and nowhere in the run folder
    assert any(SECRET in json.dumps(r.headers) for r in fake.requests)
    for path in run_copy.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


def test_logprobs_give_a_detection_auroc(run_copy: Path, fake: FakeLLMServer) -> None:
    _, store = _label(run_copy, fake, "chat", logprobs=True)
    for s in store.judgments("openai:fake-model").values():
        assert s.judgment is not None
        assert all(d.auroc is not None for d in s.judgment.detection_by_set.values())
        assert s.judgment.detection.auroc is not None
    detect = [
        r for r in fake.requests if r.body["messages"][1]["content"].startswith("TASK: DETECT")
    ]
    assert len(detect) == 8 and all(r.body.get("logprobs") is True for r in detect)


# -- failures: each ends as a label or a recorded failure -------------------------------


@pytest.mark.parametrize("wire", WIRES)
def test_429_with_retry_after_is_honoured_then_labeled(
    wire: str, run_copy: Path, fake: FakeLLMServer
) -> None:
    fake.script(RateLimited(retry_after=0.6))
    report, store = _label(run_copy, fake, wire)
    assert report.labeled == 4 and report.failed == 0
    first, second = fake.requests[0], fake.requests[1]
    assert first.status == 429 and second.status == 200
    assert second.time - first.time >= 0.6  # waited what the server asked
    assert store.judgments(_judge_name(wire))  # stored
    store.close()


@pytest.mark.parametrize("wire", WIRES)
def test_server_error_and_hanging_reply_are_retried(
    wire: str, run_copy: Path, fake: FakeLLMServer
) -> None:
    fake.script(ServerError(500), Hang(seconds=5.0), ServerError(503))
    report, store = _label(run_copy, fake, wire, timeout_s=0.5)
    assert report.labeled == 4 and report.failed == 0
    statuses = [r.status for r in fake.requests[:4]]
    assert statuses[0] == 500 and 503 in statuses
    rows = store.judgments(_judge_name(wire))
    assert len(rows) == 4 and all(s.status == "ok" for s in rows.values())
    store.close()


@pytest.mark.parametrize("wire", WIRES)
def test_persistent_server_errors_end_as_failures_with_their_reason(
    wire: str, run_copy: Path, fake: FakeLLMServer
) -> None:
    fake.script(*[ServerError(500)] * 2)
    report, store = _label(run_copy, fake, wire, max_attempts=2)
    assert report.failed == 1 and report.labeled == 3
    failed = [s for s in store.judgments(_judge_name(wire)).values() if s.status == "failed"]
    assert failed[0].reason.startswith("server_error: explain: HTTP 500")
    assert "gave up after 2 attempts" in failed[0].reason
    store.close()


@pytest.mark.parametrize("wire", WIRES)
def test_request_errors_are_not_retried(wire: str, run_copy: Path, fake: FakeLLMServer) -> None:
    fake.script(BadRequest(400))
    report, store = _label(run_copy, fake, wire)
    assert report.failed == 1
    assert [r.status for r in fake.requests].count(400) == 1
    failed = [s for s in store.judgments(_judge_name(wire)).values() if s.status == "failed"]
    assert failed[0].reason.startswith("rejected: explain: HTTP 400")
    # the failed feature made exactly one request: no retry, no further stage
    assert len(fake.requests) == 1 + 3 * 4
    store.close()


@pytest.mark.parametrize("wire", ["chat", "responses"])
def test_malformed_json_is_asked_again_once(wire: str, run_copy: Path, fake: FakeLLMServer) -> None:
    fake.script(Raw('{"explanation": "Fires on'))
    report, store = _label(run_copy, fake, wire)
    assert report.labeled == 4 and report.failed == 0
    assert len(fake.requests) == 4 * 4 + 1  # exactly one call asked again
    asked = [r.body for r in fake.requests[:2]]
    assert asked[0] == asked[1]  # the same explain request, re-asked
    store.close()


@pytest.mark.parametrize("wire", WIRES)
def test_malformed_twice_is_a_failure_with_its_reason(
    wire: str, run_copy: Path, fake: FakeLLMServer
) -> None:
    fake.script(Raw("not json at all"), Raw("{oops"))
    report, store = _label(run_copy, fake, wire)
    assert report.failed == 1 and report.labeled == 3
    failed = [s for s in store.judgments(_judge_name(wire)).values() if s.status == "failed"]
    reason = failed[0].reason
    assert reason.startswith("invalid_reply: explain: invalid reply twice")
    assert ("malformed JSON" in reason) or ("no record_answer tool call" in reason)
    # what the invalid replies cost is still counted
    usage = store.accounting(_judge_name(wire))
    assert any(status == "failed" and u["explain"].calls == 2 for status, _, u, _ in usage)
    store.close()


def _wrong_enum(request: FakeRequest) -> FakeAnswer:
    if request.user.startswith("TASK: CLASSIFY"):
        return FakeAnswer(
            {"category": "reasoning-ish", "subcategory": None, "mechanism": None,
             "domain_type": None, "confidence": "high", "rationale": "x"}
        )  # fmt: skip
    return oracle(request)


def _inconsistent(request: FakeRequest) -> FakeAnswer:
    if request.user.startswith("TASK: CLASSIFY"):
        return FakeAnswer(
            {"category": "reasoning", "subcategory": None, "mechanism": None,
             "domain_type": "math", "confidence": "high", "rationale": "x"}
        )  # fmt: skip
    return oracle(request)


@pytest.mark.parametrize("wire", WIRES)
@pytest.mark.parametrize(
    ("responder", "detail"),
    [(_wrong_enum, "category: Input should be"), (_inconsistent, "needs a subcategory")],
)
def test_wrong_classification_never_becomes_a_default(
    wire: str, responder: Any, detail: str, run_copy: Path, fake: FakeLLMServer
) -> None:
    fake.responder = responder  # type: ignore[attr-defined]
    report, store = _label(run_copy, fake, wire)
    assert report.labeled == 0 and report.failed == 4
    for s in store.judgments(_judge_name(wire)).values():
        assert s.status == "failed" and s.judgment is None
        assert s.reason.startswith("invalid_reply: classify: invalid reply twice"), s.reason
        assert detail in s.reason or "is not one of" in s.reason
    store.close()


@pytest.mark.parametrize("wire", WIRES)
def test_a_refusal_is_recorded_as_refused(wire: str, run_copy: Path, fake: FakeLLMServer) -> None:
    fake.script(Refusal("I can't help with that."), Refusal("Still no."))
    report, store = _label(run_copy, fake, wire)
    assert report.failed == 1 and report.labeled == 3
    failed = [s for s in store.judgments(_judge_name(wire)).values() if s.status == "failed"]
    assert failed[0].reason.startswith("refused: explain")
    store.close()


def test_a_rerun_retries_only_the_failed_features(run_copy: Path, fake: FakeLLMServer) -> None:
    fake.script(BadRequest(400))
    first, store = _label(run_copy, fake, "chat")
    store.close()
    assert first.failed == 1
    fake.reset()
    second, store = _label(run_copy, fake, "chat")
    assert second.skipped == 3 and second.labeled == 1 and second.failed == 0
    assert len(fake.requests) == 4
    rows = store.judgments("openai:fake-model")
    assert all(s.status == "ok" for s in rows.values())
    assert max(s.attempts for s in rows.values()) == 2
    store.close()


# -- cost, budget, dry run, status, ensembles -------------------------------------------


def test_budget_stops_new_work_and_status_shows_pending(
    run_copy: Path, fake: FakeLLMServer, prices: Path
) -> None:
    report, store = _label(run_copy, fake, "chat", sample=10, prices=prices, budget=0.01)
    assert report.budget_reached and report.pending > 0
    assert report.labeled + report.failed + report.pending == 40
    assert report.spent_usd is not None and report.spent_usd >= 0.01
    # each feature costs about the same: the budget is not overshot by more than one
    per_feature = report.spent_usd / report.labeled
    assert report.spent_usd < 0.01 + 2 * per_feature
    store.close()
    result = CliRunner().invoke(cli, ["status", str(run_copy), "--json"])
    assert result.exit_code == 0, result.output
    status = json.loads(result.output)[0]
    assert status["pending"] == report.pending and status["labeled"] == report.labeled
    assert status["cost_usd"] == pytest.approx(report.spent_usd)
    assert status["usage"]["calls"] == 4 * report.labeled


def test_dry_run_sends_nothing_and_writes_nothing(
    run_copy: Path, fake: FakeLLMServer, prices: Path
) -> None:
    result = CliRunner().invoke(cli, [
        "label", str(run_copy), "--judge", "openai:fake-model", "--judge", "heuristic",
        "--base-url", f"{fake.base_url}/v1", "--sample-per-layer", "5", "--dry-run",
        "--prices", str(prices),
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "80" in result.output  # 20 features x 4 calls
    assert "$" in result.output and "nothing was sent" in result.output
    assert fake.requests == []
    assert not (run_copy / "labels.sqlite").exists()


def test_dry_run_estimate_is_close_to_what_labeling_then_costs(
    run_copy: Path, fake: FakeLLMServer, prices: Path
) -> None:
    from labeler.judges.pricing import load_prices
    from labeler.labeling.accounting import estimate

    run = RunData.open(run_copy)
    judge = make_judge("openai:fake-model", _options(fake, "chat", prices))
    from labeler.labeling import plan_features

    planned = [f for f, _, _ in plan_features(run, 5, 0)]
    guess = estimate(run, judge, planned, load_prices(prices))
    report, store = _label(run_copy, fake, "chat", sample=5, prices=prices)
    store.close()
    assert guess.calls == 4 * report.labeled
    assert report.spent_usd is not None and guess.cost_usd is not None
    assert 0.5 < guess.cost_usd / report.spent_usd < 2.0


def test_ensemble_stores_one_judgment_per_feature_and_judge(
    run_copy: Path, fake: FakeLLMServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", f"{fake.base_url}/v1")  # the SDK's own variable
    result = CliRunner().invoke(cli, [
        "label", str(run_copy), "--judge", "openai:fake-model", "--openai-api", "chat",
        "--judge", "anthropic:fake-claude", "--judge", "heuristic", "--sample-per-layer", "2",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    store = LabelStore(run_copy / "labels.sqlite")
    assert store.judges() == ["anthropic:fake-claude", "heuristic", "openai:fake-model"]
    for judge in store.judges():
        assert len(store.judgments(judge)) == 8
    store.close()
    status = CliRunner().invoke(cli, ["status", str(run_copy)])
    assert status.exit_code == 0 and "anthropic:fake-claude" in status.output
    summary = CliRunner().invoke(cli, ["summarize", str(run_copy), "--json"])
    assert summary.exit_code == 0, summary.output
    report = json.loads(summary.output)
    assert [j["rater"] for j in report["judges"]] == [
        "anthropic:fake-claude", "openai:fake-model", "heuristic",
    ]  # fmt: skip
    assert all(j["n_labeled"] == 8 for j in report["judges"])
    assert report["final"]["n_labeled"] == 8 and report["agreement"]["raters"] == [
        "anthropic:fake-claude", "openai:fake-model", "heuristic",
    ]  # fmt: skip
    assert len(report["agreement"]["pairs"]) == 3


def test_missing_key_fails_before_any_work(
    run_copy: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    from labeler.cli import main

    for judge, variable in (("openai:gpt-5-mini", "OPENAI_API_KEY"),
                            ("anthropic:claude-haiku-4-5", "ANTHROPIC_API_KEY")):  # fmt: skip
        with pytest.raises(SystemExit) as exit_info:
            monkeypatch.setattr("sys.argv", ["labeler", "label", str(run_copy), "--judge", judge])
            main()
        assert exit_info.value.code == 2
        assert variable in capsys.readouterr().err
    assert not (run_copy / "labels.sqlite").exists()
