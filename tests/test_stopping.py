"""A stopped labeling sends nothing more, with real ``labeler label`` processes against the
loopback fake: Ctrl-C cuts a Retry-After wait at once and stores no failure of it, and a
labeler paused past its lock's life while another takes the run sends no call when it
resumes."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.fake_llm import FakeLLMServer, Hang, RateLimited
from tests.fleet import BIN

JUDGE = "openai:gpt-5-mini"
EXIT_USER, EXIT_INTERRUPTED = 2, 130
FIRST_KEY, SECOND_KEY = "sk-stopping-first-labeler-0001", "sk-stopping-second-labeler-0002"


@pytest.fixture
def fake(fresh_fake: FakeLLMServer) -> FakeLLMServer:
    return fresh_fake


def _env(key: str = FIRST_KEY, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "LABELER_"))}
    return env | {"OPENAI_API_KEY": key, "PYTHONUNBUFFERED": "1", **extra}


def _args(run: Path, fake: FakeLLMServer, *extra: str) -> list[str]:
    return [str(BIN / "labeler"), "label", str(run), "--judge", JUDGE, "--base-url",
            f"{fake.base_url}/v1", "--openai-api", "chat", *extra]  # fmt: skip


def _wait_for(what: str, ready: Callable[[], bool], process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 120
    while not ready():
        assert process.poll() is None, f"labeler exited {process.returncode} before {what}"
        assert time.monotonic() < deadline, f"no {what} within 120 s"
        time.sleep(0.05)


def _count(run: Path, sql: str) -> int:
    with sqlite3.connect(run / "labels.sqlite", timeout=30) as conn:
        return int(conn.execute(sql).fetchone()[0])


def _by(fake: FakeLLMServer, key: str) -> int:
    return sum(1 for r in fake.requests if key in r.headers.get("authorization", ""))


def test_ctrl_c_cuts_a_retry_after_wait_and_stores_no_failure(
    run_copy: Path, fake: FakeLLMServer, tmp_path: Path
) -> None:
    fake.script(*[RateLimited(retry_after=20.0)] * 2)
    log = tmp_path / "labeler.log"
    with log.open("ab") as out:
        process = subprocess.Popen(
            _args(run_copy, fake, "--sample-per-layer", "1", "--concurrency", "2",
                  "--max-attempts", "3"),
            env=_env(), stdout=out, stderr=out,
        )  # fmt: skip
    try:
        _wait_for("two 429s", lambda: len(fake.requests) >= 2, process)
        process.send_signal(signal.SIGINT)
        assert process.wait(120) == EXIT_INTERRUPTED, log.read_text()
    finally:
        if process.poll() is None:
            process.kill()
    assert [r.status for r in fake.requests] == [429, 429]  # no retry after the signal
    assert _count(run_copy, "SELECT count(*) FROM judgments") == 0  # nothing stored as failed
    again = subprocess.run(_args(run_copy, fake, "--sample-per-layer", "1"), env=_env(),
                           capture_output=True, text=True, timeout=120)  # fmt: skip
    assert again.returncode == 0, again.stdout + again.stderr
    assert "4 labeled now" in again.stdout


def _pause_outside_a_transaction(process: subprocess.Popen[bytes], run: Path) -> None:
    """SIGSTOP ``process`` at a moment it holds no write lock on the store (a process
    paused inside a write would block every writer, the next labeler too)."""
    while True:
        process.send_signal(signal.SIGSTOP)
        try:
            with sqlite3.connect(run / "labels.sqlite", timeout=0.5) as conn:
                conn.execute("BEGIN IMMEDIATE")
                conn.execute("ROLLBACK")
            return
        except sqlite3.OperationalError:
            process.send_signal(signal.SIGCONT)
            time.sleep(0.05)


def test_a_labeler_resumed_after_losing_its_lock_sends_nothing(
    run_copy: Path, fake: FakeLLMServer, tmp_path: Path
) -> None:
    # eight calls answered, then two that hang: the first labeler waits on them, its
    # results stored, when it is paused
    fake.script(*[Hang(0.0)] * 8, Hang(5.0), Hang(5.0))
    ttl = {"LABELER_LOCK_TTL_S": "3"}
    args = _args(run_copy, fake, "--sample-per-layer", "12", "--concurrency", "2")
    first_log = tmp_path / "first.log"
    with first_log.open("ab") as out:
        first = subprocess.Popen(args, env=_env(FIRST_KEY, **ttl), stdout=out, stderr=out)
    try:
        _wait_for("the first labeler's calls", lambda: _by(fake, FIRST_KEY) >= 10, first)
        _pause_outside_a_transaction(first, run_copy)
        sent_before_pause = _by(fake, FIRST_KEY)
        # the second labeler waits for the paused one's lock to lapse, then labels it all
        second = subprocess.run([*args, "--wait"], env=_env(SECOND_KEY, **ttl),
                                capture_output=True, text=True, timeout=300)  # fmt: skip
        assert second.returncode == 0, second.stdout + second.stderr
        assert _count(run_copy, "SELECT count(*) FROM judgments WHERE status='ok'") == 48
        first.send_signal(signal.SIGCONT)
        assert first.wait(120) == EXIT_USER, first_log.read_text()
    finally:
        if first.poll() is None:
            first.send_signal(signal.SIGCONT)
            first.kill()
    assert _by(fake, FIRST_KEY) == sent_before_pause  # not one call after it resumed
    assert "took this run's lock" in first_log.read_text()


def test_calls_in_flight_at_a_kill_are_counted_in_the_cost(
    run_copy: Path, fake: FakeLLMServer, tmp_path: Path
) -> None:
    # six calls answered, then two that hang while the labeler is killed: the provider
    # bills them, the labeler never reads their replies
    fake.script(*[Hang(0.0)] * 6, Hang(3.0), Hang(3.0))
    args = _args(run_copy, fake, "--sample-per-layer", "2", "--concurrency", "2")
    log = tmp_path / "labeler.log"
    with log.open("ab") as out:
        first = subprocess.Popen(args, env=_env(), stdout=out, stderr=out)
    try:
        # killed once the two hang and everything answered is stored (a call answered
        # but not yet stored stays open in the journal too, and would be a third)
        _wait_for("the hanging calls", lambda: len(fake.requests) >= 8
                  and _open_calls(run_copy) == 2, first)  # fmt: skip
        first.send_signal(signal.SIGKILL)
        first.wait(30)
    finally:
        if first.poll() is None:
            first.kill()
    again = subprocess.run(args, env=_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "2 calls were sent by a labeler" in again.stderr
    status = subprocess.run([str(BIN / "labeler"), "status", str(run_copy), "--json"],
                            env=_env(), capture_output=True, text=True, timeout=120)  # fmt: skip
    assert status.returncode == 0, status.stderr
    (judge,) = json.loads(status.stdout)
    billed = sum(1 for r in fake.requests if r.status == 200)
    assert judge["unanswered_calls"] == 2
    assert judge["usage"]["calls"] == billed  # every billed call is in the reported usage
    assert judge["cost_usd"] > 0
    assert not (run_copy / "calls-in-flight.log").exists() or _journal_balanced(run_copy)


def _open_calls(run: Path) -> int:
    from labeler.labeling.call_journal import unanswered

    return len(unanswered(run))


def _journal_balanced(run: Path) -> bool:
    from labeler.labeling.call_journal import unanswered

    return unanswered(run) == []
