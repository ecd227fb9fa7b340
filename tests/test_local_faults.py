"""The in-process transport under faults, with real ``labeler label`` processes against the
loopback fake: killed and interrupted runs repay no finished stage, one labeler per run,
judges that cannot work stop the run at once, and keys appear nowhere."""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from labeler.labeling.store import LabelStore
from tests.fake_llm import BadRequest, FakeLLMServer, Hang, oracle
from tests.fleet import BIN

JUDGE = "openai:fake-model"
CALLS = 4  # explain, then detect top, detect random and classify
SECRET = "sk-local-fault-secret-91a7c3"
FEATURES = 4  # one per layer of the planted model
EXIT_USER, EXIT_FAILURES, EXIT_INTERRUPTED = 2, 3, 130


@pytest.fixture(scope="module")
def server() -> Iterator[FakeLLMServer]:
    with FakeLLMServer(oracle) as fake:
        yield fake


@pytest.fixture
def fake(server: FakeLLMServer) -> FakeLLMServer:
    server.reset()
    server.latency = 0.0
    return server


def _env(**extra: str) -> dict[str, str]:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "ANTHROPIC_"))}
    env.update(OPENAI_API_KEY=SECRET, PYTHONUNBUFFERED="1", **extra)
    return env


def _args(run: Path, fake: FakeLLMServer, *extra: str, sample: int = 1) -> list[str]:
    return [str(BIN / "labeler"), "label", str(run), "--judge", JUDGE, "--base-url",
            f"{fake.base_url}/v1", "--sample-per-layer", str(sample), "--concurrency", "1",
            *extra]  # fmt: skip


def _start(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(args, env=_env(), stdout=out, stderr=out)


def _finish(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, env=_env(), capture_output=True, text=True, timeout=timeout)


def _wait_for_requests(fake: FakeLLMServer, n: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while len(fake.requests) < n:
        assert process.poll() is None, f"labeler exited {process.returncode} early"
        assert time.monotonic() < deadline, f"{len(fake.requests)} requests, expected {n}"
        time.sleep(0.05)


def _repaid(fake: FakeLLMServer) -> int:
    """Successful calls whose request had already been answered successfully."""
    bodies = Counter(json.dumps(r.body, sort_keys=True) for r in fake.requests if r.status == 200)
    return sum(n - 1 for n in bodies.values())


def _paid(fake: FakeLLMServer) -> int:
    return sum(1 for r in fake.requests if r.status == 200)


def _rows(run: Path, sql: str) -> list[tuple[object, ...]]:
    with sqlite3.connect(run / "labels.sqlite") as conn:
        return list(conn.execute(sql))


def _hang_on_call(n: int, seconds: float) -> list[Hang]:
    """Calls 1..n-1 answered at once, call n after ``seconds``: with one request in flight
    at a time, the third feature has its explanation and two more stages stored when its
    last call hangs."""
    return [Hang(0.0)] * (n - 1) + [Hang(seconds)]


def test_a_killed_local_run_repays_no_stored_stage(
    run_copy: Path, fake: FakeLLMServer, tmp_path: Path
) -> None:
    fake.script(*_hang_on_call(2 * CALLS + 4, 60.0))
    process = _start(_args(run_copy, fake), tmp_path / "first.log")
    _wait_for_requests(fake, 2 * CALLS + 4, process)
    time.sleep(1.0)  # the stage before the hanging one is stored by now
    process.send_signal(signal.SIGKILL)
    process.wait(10)
    stored = _rows(run_copy, "SELECT count(*) FROM stages")[0][0]
    assert stored == 2 * CALLS + 3  # two features' stages and three of the third's
    again = _finish(_args(run_copy, fake))
    assert again.returncode == 0, again.stdout + again.stderr
    assert _rows(run_copy, "SELECT count(*) FROM judgments WHERE status='ok'")[0][0] == FEATURES
    # only the call the killed process had in flight was made twice
    assert _repaid(fake) <= 1
    assert _paid(fake) <= CALLS * FEATURES + 1


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupt_lets_calls_in_flight_finish_and_stores_no_failure(
    sig: signal.Signals, run_copy: Path, fake: FakeLLMServer, tmp_path: Path
) -> None:
    fake.script(*_hang_on_call(2 * CALLS + 4, 2.0))
    log = tmp_path / "first.log"
    process = _start(_args(run_copy, fake), log)
    _wait_for_requests(fake, 2 * CALLS + 4, process)
    process.send_signal(sig)
    assert process.wait(30) == EXIT_INTERRUPTED
    text = log.read_text()
    assert "stopping" in text and "interrupted: everything finished is stored" in text
    assert "3 labeled now" in text  # the call in flight finished its feature
    assert _rows(run_copy, "SELECT count(*) FROM judgments WHERE status='failed'")[0][0] == 0
    assert len(fake.requests) == 3 * CALLS  # nothing started after the signal
    again = _finish(_args(run_copy, fake))
    assert again.returncode == 0, again.stdout + again.stderr
    assert _repaid(fake) == 0 and _paid(fake) == CALLS * FEATURES


def test_a_second_interrupt_exits_at_once_keeping_what_was_stored(
    run_copy: Path, fake: FakeLLMServer, tmp_path: Path
) -> None:
    fake.script(*_hang_on_call(2 * CALLS + 4, 60.0))
    process = _start(_args(run_copy, fake), tmp_path / "first.log")
    _wait_for_requests(fake, 2 * CALLS + 4, process)
    process.send_signal(signal.SIGINT)
    time.sleep(0.5)
    started = time.monotonic()
    process.send_signal(signal.SIGINT)
    assert process.wait(10) == EXIT_INTERRUPTED
    assert time.monotonic() - started < 5
    assert "exiting now" in (tmp_path / "first.log").read_text()
    assert _rows(run_copy, "SELECT count(*) FROM judgments WHERE status='failed'")[0][0] == 0
    assert _rows(run_copy, "SELECT count(*) FROM stages")[0][0] == 2 * CALLS + 3
    again = _finish(_args(run_copy, fake))
    assert again.returncode == 0, again.stdout + again.stderr
    assert _repaid(fake) <= 1  # the call that hung when the process left


def test_a_second_labeler_is_refused_naming_the_holder_or_waits(
    run_copy: Path, fake: FakeLLMServer, tmp_path: Path
) -> None:
    fake.latency = 0.05
    first = _start(_args(run_copy, fake, sample=5), tmp_path / "first.log")
    _wait_for_requests(fake, 2, first)
    started = time.monotonic()
    refused = _finish(_args(run_copy, fake, sample=5))
    assert refused.returncode == EXIT_USER
    assert time.monotonic() - started < 30
    line = refused.stderr.strip()
    assert len(line.splitlines()) == 1, line
    assert f"pid {first.pid}" in line and "host " in line and "since " in line
    assert "labeler label (local)" in line and "--wait" in line
    waiting = _start(_args(run_copy, fake, "--wait", sample=5), tmp_path / "waiting.log")
    assert first.wait(120) == 0, (tmp_path / "first.log").read_text()
    assert waiting.wait(120) == 0, (tmp_path / "waiting.log").read_text()
    assert "0 labeled now" in (tmp_path / "waiting.log").read_text()
    rows = _rows(run_copy, "SELECT status, attempts FROM judgments")
    assert len(rows) == 5 * FEATURES and set(rows) == {("ok", 1)}
    assert _repaid(fake) == 0 and _paid(fake) == CALLS * 5 * FEATURES


def test_concurrent_writers_lose_no_cost_update(run_copy: Path) -> None:
    """Two processes adding failed attempts to the same rows: every attempt's cost
    counts (a read before the write transaction lost some)."""
    script = (
        "import sys\nfrom pathlib import Path\nfrom labeler.labeling.store import LabelStore\n"
        "store = LabelStore(Path(sys.argv[1]))\n"
        "for i in range(150):\n"
        "    store.put_failure(f'L0F{i % 5}', 'openai:x', 'server_error: explain: x', 'h',"
        " cost_usd=1.0)\n"
    )
    path = run_copy / "labels.sqlite"
    LabelStore(path).close()
    writers = [subprocess.Popen([sys.executable, "-c", script, str(path)]) for _ in range(2)]
    assert [w.wait(120) for w in writers] == [0, 0]
    rows = _rows(run_copy, "SELECT sum(cost_usd), sum(attempts) FROM judgments")
    assert rows[0] == (300.0, 300)


def test_a_judge_that_cannot_load_stops_in_seconds_with_one_line(
    run_copy: Path, tmp_path: Path
) -> None:
    missing = _finish([str(BIN / "labeler"), "label", str(run_copy), "--judge",
                       "hf:/nonexistent/model"], timeout=60)  # fmt: skip
    assert missing.returncode == EXIT_USER
    assert missing.stderr.strip().splitlines() == [
        "error: hf:/nonexistent/model: /nonexistent/model: no such model folder"
    ]
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "no-such-architecture"}')
    result = _finish([str(BIN / "labeler"), "label", str(run_copy), "--judge", f"hf:{broken}",
                      "--sample-per-layer", "5"], timeout=120)  # fmt: skip
    assert result.returncode == EXIT_USER
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "does not load" in errors[0], result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert _rows(run_copy, "SELECT count(*) FROM judgments")[0][0] == 0  # nothing blamed


@pytest.mark.parametrize(("status", "kind"), [(401, "auth"), (403, "auth"), (404, "not_found")])
def test_a_rejected_key_or_unknown_model_stops_before_spending_on_the_rest(
    status: int, kind: str, run_copy: Path, fake: FakeLLMServer
) -> None:
    fake.script(*[BadRequest(status, "invalid credentials or no such model")] * 200)
    started = time.monotonic()
    result = _finish(_args(run_copy, fake, "--concurrency", "4", sample=50))
    assert result.returncode == EXIT_USER, result.stdout + result.stderr
    assert time.monotonic() - started < 30
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert f"{kind}: explain: HTTP {status}" in errors[0]
    assert "Traceback" not in result.stderr
    assert len(fake.requests) <= 8  # at most the requests in flight when the first failed
    assert _rows(run_copy, "SELECT count(*) FROM judgments")[0][0] == 0


def test_a_run_that_ends_with_failures_exits_3_listing_them_by_reason(
    run_copy: Path, fake: FakeLLMServer
) -> None:
    fake.script(BadRequest(400), Hang(0.0), BadRequest(400))
    result = _finish(_args(run_copy, fake))
    assert result.returncode == EXIT_FAILURES, result.stdout + result.stderr
    assert "2 planned feature judgments are failed" in result.stderr
    assert f"{JUDGE}: 2 rejected" in result.stderr


def test_a_key_echoed_by_a_provider_is_stored_logged_and_exported_nowhere(
    run_copy: Path, fake: FakeLLMServer, tmp_path: Path
) -> None:
    shaped = "sk-proj-" + "Zq7" * 12  # a key of no configured variable, by its shape
    fake.script(
        BadRequest(400, f"Incorrect API key provided: {SECRET}."),
        Hang(0.0),
        BadRequest(422, f"key {shaped} is not allowed this model"),
    )
    args = _args(run_copy, fake)
    args.insert(1, "-v")
    result = _finish(args)
    assert result.returncode == EXIT_FAILURES, result.stdout + result.stderr
    exported = subprocess.run(
        [str(BIN / "labeler"), "export", str(run_copy), "--out", str(tmp_path / "c.jsonl")],
        env=_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert exported.returncode == 0, exported.stderr
    reasons = [str(r[0]) for r in _rows(run_copy, "SELECT reason FROM judgments WHERE reason "
                                                  "IS NOT NULL")]  # fmt: skip
    assert len(reasons) == 2 and all("[REDACTED]" in r for r in reasons)
    places = {
        "output": result.stdout + result.stderr,
        "store": (run_copy / "labels.sqlite").read_bytes().decode("latin-1"),
        "catalog": (tmp_path / "c.jsonl").read_text(),
    }
    wal = run_copy / "labels.sqlite-wal"
    if wal.exists():
        places["wal"] = wal.read_bytes().decode("latin-1")
    for where, text in places.items():
        assert SECRET not in text and shaped not in text, where
    assert "Incorrect API key provided: [REDACTED]" in places["catalog"]


def test_a_failed_stage_alone_is_paid_again_on_the_next_run(
    run_copy: Path, fake: FakeLLMServer
) -> None:
    fake.script(Hang(0.0), Hang(0.0), Hang(0.0), BadRequest(400))  # the first feature's last
    first = _finish(_args(run_copy, fake))
    assert first.returncode == EXIT_FAILURES, first.stdout + first.stderr
    assert _rows(run_copy, "SELECT count(*) FROM stages")[0][0] == 3 + 3 * CALLS
    again = _finish(_args(run_copy, fake))
    assert again.returncode == 0, again.stdout + again.stderr
    assert _repaid(fake) == 0 and _paid(fake) == CALLS * FEATURES
    assert _rows(run_copy, "SELECT status, attempts FROM judgments WHERE attempts > 1") == [
        ("ok", 2)
    ]


def test_an_unreachable_server_stops_the_run_blaming_no_feature(run_copy: Path) -> None:
    from tests.redis_server import free_port

    closed = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    result = _finish([str(BIN / "labeler"), "label", str(run_copy), "--judge", JUDGE,
                      "--base-url", closed, "--max-attempts", "1", "--concurrency", "1",
                      "--sample-per-layer", "5"])  # fmt: skip
    assert result.returncode == EXIT_USER, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "connection: explain" in errors[0], result.stderr
    assert _rows(run_copy, "SELECT count(*) FROM judgments")[0][0] == 0
