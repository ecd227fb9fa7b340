"""Labeling through the providers' batch APIs, driven through the real SDKs against the
loopback fake's OpenAI Batch and Anthropic Message Batches: planted features recovered
at batch prices, rounds (explanations, then the stages that need them, then re-asks and
new tries), errored, expired and invalid lines, a labeler killed with a batch in flight
or in the middle of creating one, and nothing ever submitted twice."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from labeler.cli import cli
from labeler.judges import make_judge
from labeler.judges.base import JudgeOptions
from labeler.judges.pricing import load_prices
from labeler.labeling.store import LabelStore
from labeler.labeling.transports.batch import BatchSettings as Polling
from labeler.labeling.transports.batch import label_in_batches
from labeler.run.data import RunData
from labeler.run.schemas import Usage
from tests.fake_llm import (
    BadRequest,
    BatchSettings,
    FakeLLMServer,
    Hang,
    RateLimited,
    Raw,
    ServerError,
    oracle,
)

BIN = Path(sys.executable).parent
KEY = "sk-test-batch-key-5151"
NAMES = {"chat": "openai:gpt-5-mini", "responses": "openai:gpt-5-mini",
         "anthropic": "anthropic:claude-haiku-4-5"}  # fmt: skip


@pytest.fixture(scope="module")
def server() -> Iterator[FakeLLMServer]:
    with FakeLLMServer(oracle) as fake:
        yield fake


@pytest.fixture
def fake(server: FakeLLMServer, monkeypatch: pytest.MonkeyPatch) -> FakeLLMServer:
    server.reset()
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    monkeypatch.setenv("ANTHROPIC_BASE_URL", server.base_url)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.delenv("LABELER_CACHE_DIR", raising=False)
    return server


def _options(fake: FakeLLMServer, wire: str) -> JudgeOptions:
    base = None if wire == "anthropic" else f"{fake.base_url}/v1"
    return JudgeOptions(base_url=base, openai_api="chat" if wire == "chat" else "responses")


def _label(run: Path, fake: FakeLLMServer, wire: str, sample: int = 8) -> tuple[Any, LabelStore]:
    judge = make_judge(NAMES[wire], _options(fake, wire))
    store = LabelStore(run / "labels.sqlite")
    reports, _ = label_in_batches(RunData.open(run), store, [judge], Polling(poll_s=0.05),
                                  sample_per_layer=sample)  # fmt: skip
    return reports[NAMES[wire]], store


def _submitted_once(fake: FakeLLMServer) -> Counter[str]:
    """Every request submitted at most once; the counts by custom_id."""
    counts = Counter(cid for batch in fake.batches.created for cid in batch.custom_ids)
    twice = [cid for cid, n in counts.items() if n > 1]
    assert not twice, f"submitted twice: {twice[:5]}"
    return counts


def _total_usage(store: LabelStore, judge: str) -> Usage:
    return sum((u for _, _, usage, _ in store.accounting(judge) for u in usage.values()), Usage())


@pytest.mark.parametrize("wire", ["chat", "responses", "anthropic"])
def test_batches_label_planted_features_at_half_price(
    wire: str, run_copy: Path, fake: FakeLLMServer, collected: Any
) -> None:
    report, store = _label(run_copy, fake, wire)
    name = NAMES[wire]
    assert (report.labeled, report.failed, report.pending) == (32, 0, 0)
    rows = store.judgments(name)
    truth = {f["feature_id"]: f for f in json.loads(collected.paths.ground_truth.read_text())}
    right = sum(truth[fid]["category"] == s.judgment.classification.category
                for fid, s in rows.items() if s.judgment is not None)  # fmt: skip
    assert right / len(rows) >= 0.9
    # two rounds: every explanation, then the three stages that need one
    assert [b.n_requests for b in fake.batches.created] == [32, 96]
    assert fake.requests == []  # no synchronous call at all
    counts = _submitted_once(fake)
    assert all(len(cid) <= 64 and cid.replace("-", "").replace("_", "").isalnum()
               for cid in counts)  # fmt: skip
    endpoint = {"chat": "/v1/chat/completions", "responses": "/v1/responses",
                "anthropic": "/v1/messages"}[wire]  # fmt: skip
    assert {b.endpoint for b in fake.batches.created} == {endpoint}
    # priced at the batch tier: half the synchronous price of the same tokens
    usage = _total_usage(store, name)
    prices = load_prices()
    batch_cost = prices.cost(name, usage, "batch")
    standard_cost = prices.cost(name, usage, "standard")
    assert batch_cost is not None and standard_cost is not None
    spent = sum(c for *_, c in store.accounting(name) if c is not None)
    assert spent == pytest.approx(batch_cost, rel=1e-6)
    assert batch_cost == pytest.approx(standard_cost / 2, rel=0.05)
    store.close()


def _in_thread(work: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    out: list[Any] = []

    def target() -> None:
        try:
            out.append(work())
        except BaseException as exc:  # handed to the test
            out.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, out


def _wait_for(what: str, condition: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


@pytest.mark.parametrize("wire", ["chat", "anthropic"])
def test_errored_expired_and_invalid_lines_follow_the_failure_rules(
    wire: str, run_copy: Path, fake: FakeLLMServer
) -> None:
    # the first batch's first four lines: a 429 and a 5xx (tried again in the next round),
    # a 400 (the feature fails with it), a reply that is not JSON (asked again); its last
    # two lines expire (sent again); later batches behave
    fake.batches.settings = BatchSettings(in_progress_s=1.0, expire_count=2)
    fake.script(RateLimited(1.0), ServerError(500), BadRequest(400, "bad field"), Raw("no"))
    thread, out = _in_thread(lambda: _label(run_copy, fake, wire))
    _wait_for("the first batch", lambda: len(fake.batches.created) >= 1)
    fake.batches.settings = BatchSettings()
    thread.join(120)
    assert not thread.is_alive()
    assert not isinstance(out[0], BaseException), out[0]
    report, store = out[0]
    assert (report.labeled, report.failed, report.pending) == (31, 1, 0)
    failed = [s for s in store.judgments(NAMES[wire]).values() if s.status == "failed"]
    assert failed[0].reason.startswith("rejected: explain: HTTP 400")
    assert "bad field" in failed[0].reason
    counts = _submitted_once(fake)
    first, second = fake.batches.created[0], fake.batches.created[1]
    # the 429, the 5xx and the two expired requests go out again under their next try,
    # the invalid reply is asked again (its ask 1), all in the next round
    again = [c for c in second.custom_ids if not c.endswith("-0-0")]
    assert sorted(c.rsplit("-", 2)[1:] == ["0", "1"] for c in again).count(True) == 4
    assert sum(c.endswith("-1-0") for c in again) == 1
    assert {c.rsplit("-", 2)[0] for c in again} <= {c.rsplit("-", 2)[0] for c in first.custom_ids}
    assert sum(counts.values()) == 32 + 31 * 3 + 5
    store.close()


def test_failed_features_are_asked_afresh_by_the_next_labeling(
    run_copy: Path, fake: FakeLLMServer
) -> None:
    fake.script(BadRequest(400, "bad field"))
    report, store = _label(run_copy, fake, "chat", sample=1)
    assert (report.labeled, report.failed) == (3, 1)
    store.close()
    before = len(fake.batches.created)
    report, store = _label(run_copy, fake, "chat", sample=1)
    assert (report.labeled, report.failed, report.skipped) == (1, 0, 3)
    assert [b.n_requests for b in fake.batches.created[before:]] == [1, 3]
    _submitted_once(fake)
    store.close()


def _env(fake: FakeLLMServer, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "LABELER_"))}
    return env | {"OPENAI_API_KEY": KEY, "ANTHROPIC_API_KEY": KEY,
                  "ANTHROPIC_BASE_URL": fake.base_url, **extra}  # fmt: skip


def _command(run: Path, fake: FakeLLMServer, wire: str) -> list[str]:
    args = [str(BIN / "labeler"), "label", str(run), "--judge", NAMES[wire], "--executor",
            "batch", "--poll-s", "0.1", "--sample-per-layer", "8"]  # fmt: skip
    if wire != "anthropic":
        args += ["--base-url", f"{fake.base_url}/v1", "--openai-api", "responses"]
    return args


def _run_to_end(args: list[str], env: dict[str, str], log: Path) -> str:
    with log.open("ab") as out:
        done = subprocess.run(args, env=env, stdout=out, stderr=out, timeout=300)
    text = log.read_text(errors="replace")
    assert done.returncode == 0, text[-3000:]
    return text


def _kill_when(args: list[str], env: dict[str, str], log: Path, ready: Callable[[], bool]) -> None:
    with log.open("ab") as out:
        process = subprocess.Popen(args, env=env, stdout=out, stderr=out)
    try:
        _wait_for("the moment to kill the labeler", ready, timeout=120)
        process.send_signal(signal.SIGKILL)
        process.wait(30)
    finally:
        if process.poll() is None:
            process.kill()


def _recorded(run: Path) -> int:
    """Batches whose id the labeler has recorded in the run's store."""
    import sqlite3

    try:
        with sqlite3.connect(run / "labels.sqlite", timeout=5) as conn:
            row = conn.execute("SELECT count(*) FROM batches WHERE batch_id IS NOT NULL")
            return int(row.fetchone()[0])
    except sqlite3.Error:  # not made yet
        return 0


@pytest.mark.parametrize("wire", ["responses", "anthropic"])
def test_a_labeler_killed_with_a_batch_in_flight_resumes_it(
    wire: str, run_copy: Path, fake: FakeLLMServer, tmp_path: Path
) -> None:
    fake.batches.settings = BatchSettings(in_progress_s=2.0, partial=True)
    args, env, log = _command(run_copy, fake, wire), _env(fake), tmp_path / "labeler.log"
    _kill_when(args, env, log, lambda: _recorded(run_copy) >= 2)  # the second round in flight
    status = CliRunner().invoke(cli, ["status", str(run_copy)])
    assert status.exit_code == 0, status.output
    assert "batches in flight" in status.output
    assert fake.batches.created[1].batch_id in status.output
    text = _run_to_end(args, env, log)
    assert "32 labeled now" in text
    store = LabelStore(run_copy / "labels.sqlite")
    assert len(store.done(NAMES[wire])) == 32
    store.close()
    counts = _submitted_once(fake)
    assert len(fake.batches.created) == 2 and sum(counts.values()) == 32 * 4
    # every request was answered once at the provider: nothing paid twice
    answered = Counter(line.custom_id for line in fake.batches.lines)
    assert set(answered.values()) == {1} and len(answered) == 32 * 4


@pytest.mark.parametrize("wire", ["responses", "anthropic"])
def test_a_submission_cut_off_before_its_id_was_recorded_is_found_not_sent_again(
    wire: str, run_copy: Path, fake: FakeLLMServer, tmp_path: Path
) -> None:
    # the provider makes the batch, then the labeler dies before it hears the batch's id
    fake.batches.settings = BatchSettings(create_delay_s=30.0)
    args, env, log = _command(run_copy, fake, wire), _env(fake), tmp_path / "labeler.log"
    _kill_when(args, env, log, lambda: len(fake.batches.created) >= 1)
    fake.batches.settings = BatchSettings()
    _run_to_end(args, env, log)
    store = LabelStore(run_copy / "labels.sqlite")
    assert len(store.done(NAMES[wire])) == 32
    store.close()
    counts = _submitted_once(fake)
    assert [b.n_requests for b in fake.batches.created] == [32, 96]
    assert sum(counts.values()) == 32 * 4


def test_flex_tier_retries_unavailable_capacity_and_prices_at_flex(
    run_copy: Path, fake: FakeLLMServer
) -> None:
    fake.script(*[RateLimited(0.05, code="resource_unavailable")] * 3)
    result = CliRunner().invoke(cli, [
        "label", str(run_copy), "--judge", "openai:gpt-5-mini", "--base-url",
        f"{fake.base_url}/v1", "--openai-api", "chat", "--service-tier", "flex",
        "--sample-per-layer", "2",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "8 labeled now" in result.output
    assert [r.status for r in fake.requests[:3]] == [429, 429, 429]
    ok = [r for r in fake.requests if r.status == 200]
    assert len(ok) == 8 * 4 and all(r.body["service_tier"] == "flex" for r in ok)
    store = LabelStore(run_copy / "labels.sqlite")
    usage = _total_usage(store, "openai:gpt-5-mini")
    spent = sum(c for *_, c in store.accounting("openai:gpt-5-mini") if c is not None)
    flex = load_prices().cost("openai:gpt-5-mini", usage, "flex")
    assert flex is not None and spent == pytest.approx(flex, rel=1e-6)
    store.close()
    # the reports name the price table the costs were counted with, and its date
    source = load_prices().source
    assert source.startswith("genai-prices ") and load_prices().as_of is not None
    for command in ("status", "summarize"):
        shown = CliRunner().invoke(cli, [command, str(run_copy)], terminal_width=200)
        assert shown.exit_code == 0, shown.output
        assert f"prices: {source}" in shown.output


def test_dry_run_sets_synchronous_and_batch_cost_side_by_side(run_copy: Path) -> None:
    result = CliRunner().invoke(
        cli,
        [
            "label",
            str(run_copy),
            "--judge",
            "openai:gpt-5-mini",
            "--judge",
            "anthropic:claude-haiku-4-5",
            "--dry-run",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "batch" in result.output and "dollars" in result.output
    assert all(len(line) <= 80 for line in result.output.splitlines())
    refused = subprocess.run([str(BIN / "labeler"), "label", str(run_copy), "--executor", "batch"],
                             capture_output=True, text=True, timeout=120)  # fmt: skip
    assert refused.returncode == 2
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "judge 'heuristic' has no batch API" in lines[0], lines


def test_ctrl_c_leaves_the_batches_running_and_the_next_run_collects_them(
    run_copy: Path, fake: FakeLLMServer, tmp_path: Path
) -> None:
    fake.batches.settings = BatchSettings(in_progress_s=3.0)
    args, env, log = _command(run_copy, fake, "responses"), _env(fake), tmp_path / "labeler.log"
    with log.open("ab") as out:
        process = subprocess.Popen(args, env=env, stdout=out, stderr=out)
    try:
        _wait_for("the first batch recorded", lambda: _recorded(run_copy) >= 1)
        process.send_signal(signal.SIGINT)
        assert process.wait(60) == 130
    finally:
        if process.poll() is None:
            process.kill()
    text = log.read_text(errors="replace")
    assert "1 batch still in flight at the provider" in text, text
    assert "interrupted" in text
    text = _run_to_end(args, env, log)
    store = LabelStore(run_copy / "labels.sqlite")
    assert len(store.done(NAMES["responses"])) == 32
    store.close()
    counts = _submitted_once(fake)
    assert sum(counts.values()) == 32 * 4


def test_batch_options_that_do_not_apply_are_refused(run_copy: Path) -> None:
    for extra, needle in [
        (["--budget-usd", "5"], "--budget-usd: not with --executor batch"),
        (["--service-tier", "flex"], "--service-tier flex, --rpm and --tpm are for"),
        (["--poll-s", "0"], "--poll-s: a positive number"),
    ]:
        refused = subprocess.run(
            [str(BIN / "labeler"), "label", str(run_copy), "--judge", "openai:gpt-5-mini",
             "--executor", "batch", *extra],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert refused.returncode == 2, refused.stderr
        assert needle in refused.stderr and len(refused.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("wire", ["chat", "anthropic"])
def test_a_batch_cancelled_at_the_provider_is_sent_again(
    wire: str, run_copy: Path, fake: FakeLLMServer
) -> None:
    import anthropic
    import openai

    fake.batches.settings = BatchSettings(in_progress_s=2.0, partial=True)
    thread, out = _in_thread(lambda: _label(run_copy, fake, wire))
    _wait_for("the first batch", lambda: len(fake.batches.created) >= 1)
    first = fake.batches.created[0].batch_id
    fake.batches.settings = BatchSettings()
    if wire == "anthropic":  # someone cancels it in the provider's console
        anthropic.Anthropic(base_url=fake.base_url, api_key=KEY).messages.batches.cancel(first)
    else:
        openai.OpenAI(base_url=f"{fake.base_url}/v1", api_key=KEY).batches.cancel(first)
    thread.join(120)
    assert not thread.is_alive() and not isinstance(out[0], BaseException), out
    report, store = out[0]
    assert (report.labeled, report.failed) == (32, 0)
    counts = _submitted_once(fake)
    retried = [c for c in fake.batches.created[1].custom_ids if c.endswith("-0-1")]
    assert retried, "the cancelled requests went out again under their next try"
    assert sum(counts.values()) == 32 * 4 + len(retried)
    store.close()


def test_a_round_is_split_to_the_providers_limits(
    run_copy: Path, fake: FakeLLMServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from labeler.judges.batch_api import OpenAIBatches

    monkeypatch.setattr(OpenAIBatches, "max_requests", 10)
    report, store = _label(run_copy, fake, "chat")
    assert report.labeled == 32
    sizes = [b.n_requests for b in fake.batches.created]
    assert sizes[:4] == [10, 10, 10, 2] and max(sizes) == 10 and sum(sizes) == 32 * 4
    store.close()
    _submitted_once(fake)


def test_a_submission_stays_under_the_byte_limit(fake: FakeLLMServer) -> None:
    from labeler.judges.batch_api import OpenAIBatches
    from labeler.judges.requests import ApiRequest
    from labeler.labeling.batch_records import Waiting
    from labeler.labeling.transports.batch import _chunk

    api = OpenAIBatches(make_judge(NAMES["chat"], _options(fake, "chat")).backend)
    queued = [
        Waiting(ApiRequest("openai", "m", "/v1/chat/completions", {"n": i, "pad": "x" * 900}),
                f"r{i:048d}-0-0", 0, 0)
        for i in range(10)
    ]  # fmt: skip
    size = api.line_size(queued[0].custom_id, queued[0].request.endpoint, queued[0].request.body)
    api.max_bytes = 3 * size + size // 2
    assert [w.custom_id for w in _chunk(api, queued)] == [w.custom_id for w in queued[:3]]


def test_a_stage_that_ends_after_its_feature_failed_still_counts_its_cost(
    run_copy: Path, fake: FakeLLMServer
) -> None:
    fake.batches.settings = BatchSettings(in_progress_s=1.5)
    thread, out = _in_thread(lambda: _label(run_copy, fake, "chat", sample=1))
    _wait_for("the second round", lambda: len(fake.batches.created) >= 2)
    # the second round's first three lines are one feature's: its top detection is
    # refused, its random one answered, its classification not JSON (to be asked again)
    fake.script(BadRequest(400, "bad field"), Hang(0.0), Raw("no"))
    thread.join(120)
    assert not thread.is_alive() and not isinstance(out[0], BaseException), out
    report, store = out[0]
    assert (report.labeled, report.failed) == (3, 1)
    failed = next(s for s in store.judgments(NAMES["chat"]).values() if s.status == "failed")
    assert failed.reason is not None and failed.reason.startswith("rejected: detect")
    usage = next(u for status, _, u, _ in store.accounting(NAMES["chat"]) if status == "failed")
    # the explanation, the other detection set answered in the same round as the failed
    # one, and the classification's invalid reply (not asked again once the feature
    # failed) are all counted on the failed feature
    assert usage["explain"].calls == 1 and usage["classify"].calls == 1
    assert usage["detect"].calls == 1
    assert len(fake.batches.created) == 2  # no re-ask for a feature already failed
    store.close()


def test_a_batch_failed_as_a_whole_is_sent_again(run_copy: Path, fake: FakeLLMServer) -> None:
    # OpenAI refuses a batch before it runs (its token queue full, say): sent again
    fake.batches.settings = BatchSettings(in_progress_s=1.0, fail="enqueued token limit reached")
    thread, out = _in_thread(lambda: _label(run_copy, fake, "chat"))
    _wait_for("the first batch", lambda: len(fake.batches.created) >= 1)
    fake.batches.settings = BatchSettings()
    thread.join(120)
    assert not thread.is_alive() and not isinstance(out[0], BaseException), out
    report, store = out[0]
    assert (report.labeled, report.failed) == (32, 0)
    assert [b.n_requests for b in fake.batches.created] == [32, 32, 96]
    assert all(c.endswith("-0-1") for c in fake.batches.created[1].custom_ids)
    _submitted_once(fake)
    store.close()


def test_another_judges_batches_in_flight_do_not_hold_up_this_labeling(
    run_copy: Path, fake: FakeLLMServer
) -> None:
    from labeler.judges.requests import ApiRequest
    from labeler.labeling.batch_records import BatchRecords, Waiting

    store = LabelStore(run_copy / "labels.sqlite")
    other = Waiting(ApiRequest("anthropic", "m", "/v1/messages", {}), "r0-0-0", 0, 0)
    BatchRecords(store).begin("elsewhere", "anthropic:claude-haiku-4-5", "anthropic",
                              "/v1/messages", [other])  # fmt: skip
    BatchRecords(store).submitted("elsewhere", "msgbatch_of_another_labeling")
    store.close()
    report, store = _label(run_copy, fake, "chat", sample=1)
    assert (report.labeled, report.pending) == (4, 0)
    assert [s.batch_id for s in BatchRecords(store).open()] == ["msgbatch_of_another_labeling"]
    store.close()


def test_a_batch_in_flight_is_collected_not_paid_again_by_another_transport(
    run_copy: Path, fake: FakeLLMServer, tmp_path: Path
) -> None:
    fake.batches.settings = BatchSettings(in_progress_s=600.0)
    args, env, log = _command(run_copy, fake, "responses"), _env(fake), tmp_path / "labeler.log"
    _kill_when(args, env, log, lambda: _recorded(run_copy) >= 1)  # the explanations at the provider
    synchronous = [
        str(BIN / "labeler"), "label", str(run_copy), "--judge", NAMES["responses"],
        "--base-url", f"{fake.base_url}/v1", "--openai-api", "responses",
        "--sample-per-layer", "8",
    ]  # fmt: skip
    refused = subprocess.run(synchronous, env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "1 provider batch of openai:gpt-5-mini (32 requests" in refused.stderr
    assert "--executor batch" in refused.stderr
    assert fake.requests == []  # not one synchronous call
    fake.batches.settings = BatchSettings()
    fake.batches.clock = lambda: time.monotonic() + 3600.0  # the batch at the provider ends
    text = _run_to_end(args, env, log)
    assert "32 labeled now" in text
    counts = _submitted_once(fake)
    assert sum(counts.values()) == 32 * 4
    status = CliRunner().invoke(cli, ["status", str(run_copy), "--json"])
    assert status.exit_code == 0, status.output
    spent = json.loads(status.output)[0]
    assert spent["labeled"] == 32 and spent["cost_usd"] > 0
    answered = Counter(line.custom_id for line in fake.batches.lines)
    assert set(answered.values()) == {1} and len(answered) == 32 * 4
