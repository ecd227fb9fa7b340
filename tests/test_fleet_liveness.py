"""The fleet's liveness and the run's lock with real processes: a killed worker's stages
run elsewhere within a minute on default settings, the run's lock holds through a long
run on a starved machine, local and fleet labelers exclude each other, no stored judgment
is rewritten, and a key echoed by a provider reaches no log, queue or store."""

from __future__ import annotations

import datetime as dt
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.fake_llm import BadRequest, FakeLLMServer, Hang, oracle
from tests.fleet import BIN, Worker, fleet_env, run_driver, start_driver
from tests.redis_server import RedisServer
from tests.test_fleet import _args, wait_until_idle

pytestmark = pytest.mark.slow


@pytest.fixture
def fake() -> Iterator[FakeLLMServer]:
    with FakeLLMServer(oracle) as server:
        yield server


@pytest.fixture
def run(run_copy: Path) -> Path:
    return run_copy


JUDGE = "openai:fake-model"
CALLS = 4
RECEIVED = re.compile(
    r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}): INFO/\w+\] Task labeler\.stage\[([0-9a-f-]+)\] "
    r"received",
    re.M,
)


def _rows(run: Path) -> list[tuple[str, str, str, int, str]]:
    with sqlite3.connect(run / "labels.sqlite") as conn:
        rows = conn.execute("SELECT feature_id, judge, status, attempts, created_at FROM judgments")
        return [(str(f), str(j), str(s), int(a), str(c)) for f, j, s, a, c in rows]


def _rows_so_far(run: Path) -> int:
    """Judgments stored so far; none while the driver is still making the store."""
    if not (run / "labels.sqlite").exists():
        return 0
    try:
        return len(_rows(run))
    except sqlite3.OperationalError:  # the file is there, its tables not yet
        return 0


def _default_env(redis_url: str) -> dict[str, str]:
    """The fleet's default settings: the time limit and the visibility timeout unset."""
    env = fleet_env(redis_url)
    env.pop("LABELER_TASK_TIME_LIMIT")
    env.pop("LABELER_VISIBILITY_TIMEOUT")
    return env


def _received(log: Path) -> dict[str, float]:
    """Task id -> when the worker received it (epoch seconds, the log's local time)."""
    found = {}
    for stamp, task_id in RECEIVED.findall(log.read_text(errors="replace")):
        when = dt.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()
        found.setdefault(task_id, when)
    return found


def _done(server: RedisServer) -> set[str]:
    """Ids of the stages whose outcome a worker published, of every labeling."""
    client = server.client()
    try:
        return {str(t.decode()) for key in client.keys("labeler:run:*:done")
                for t in client.hkeys(key)}  # fmt: skip
    finally:
        client.close()


def _finished(log: Path) -> set[str]:
    return set(re.findall(r"Task labeler\.stage\[([0-9a-f-]+)\] succeeded", log.read_text()))


def test_a_killed_workers_stages_run_elsewhere_within_a_minute_on_default_settings(
    run: Path, fake: FakeLLMServer, redis_server: RedisServer, tmp_path: Path
) -> None:
    fake.latency = 0.3
    env = _default_env(redis_server.url)
    doomed_log, survivor_log = tmp_path / "doomed.log", tmp_path / "survivor.log"
    doomed = Worker("doomed", env, doomed_log, concurrency=8).wait_ready()
    with Worker("survivor", env, survivor_log, concurrency=8):
        driver = start_driver(_args(run, fake, 20), env, tmp_path / "d.log")
        deadline = time.monotonic() + 120
        while len(_finished(doomed_log)) < 20 and time.monotonic() < deadline:
            time.sleep(0.1)
        doomed.kill()
        killed_at = time.time()
        # held: received and not finished (its log may miss the last finished ones)
        held = set(_received(doomed_log)) - _finished(doomed_log) - _done(redis_server)
        assert held, "the killed worker held no stage"
        assert driver.wait(150) == 0, (tmp_path / "d.log").read_text()[-3000:]
    doomed.stop()
    rows = _rows(run)
    assert len(rows) == 80 and {r[2] for r in rows} == {"ok"} and {r[3] for r in rows} == {1}
    elsewhere = _received(survivor_log)
    assert held <= set(elsewhere)  # every stage the dead worker held ran on the survivor
    recovery = max(elsewhere[task_id] - killed_at for task_id in held)
    assert 0 < recovery < 60, recovery
    assert "sending it again" in (tmp_path / "d.log").read_text()


def _wait_for_holder(run: Path, process: subprocess.Popen[bytes]) -> None:
    """Until ``process`` holds the run's lock."""
    deadline = time.monotonic() + 60
    while True:
        assert process.poll() is None and time.monotonic() < deadline
        if (run / "labels.sqlite").exists():
            with sqlite3.connect(run / "labels.sqlite") as conn:
                try:
                    row = conn.execute("SELECT pid FROM run_lock").fetchone()
                except sqlite3.OperationalError:  # the store is being made
                    row = None
            if row is not None and row[0] == process.pid:
                return
        time.sleep(0.1)


def _burn() -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def test_the_run_lock_holds_through_a_long_run_beside_cpu_burners_and_nothing_is_rewritten(
    run: Path, redis_server: RedisServer, tmp_path: Path
) -> None:
    env = fleet_env(redis_server.url)
    args = [str(run), "--judge", "heuristic", "--sample-per-layer", "200"]
    burners = [_burn(), _burn()]
    try:
        with Worker("w1", env, tmp_path / "w1.log", concurrency=4):
            first = start_driver(args, env, tmp_path / "first.log")
            _wait_for_holder(run, first)
            waiting = None
            refused = 0
            while first.poll() is None:
                second = subprocess.run(
                    [str(BIN / "labeler"), "label", *args, "--executor", "celery"], env=env,
                    capture_output=True, text=True, timeout=120,
                )  # fmt: skip
                if first.poll() is not None and second.returncode == 0:
                    break  # started as the first finished: it found nothing to do
                assert second.returncode == 2, second.stdout + second.stderr
                assert "is labeling this run" in second.stderr
                refused += 1
                if waiting is None:  # one that waits its turn, started mid-run
                    waiting = start_driver([*args, "--wait"], env, tmp_path / "waiting.log")
                time.sleep(2.0)
            assert first.wait(10) == 0, (tmp_path / "first.log").read_text()[-3000:]
            assert refused >= 2
            assert waiting is not None and waiting.wait(120) == 0
    finally:
        for burner in burners:
            burner.kill()
            burner.wait()
    assert "800 labeled now" in (tmp_path / "first.log").read_text()
    assert "0 labeled now" in (tmp_path / "waiting.log").read_text()
    rows = _rows(run)
    assert len(rows) == 800 and {r[2] for r in rows} == {"ok"} and {r[3] for r in rows} == {1}
    before = {r[0]: r[4] for r in rows}
    again = run_driver(args, env, tmp_path / "again.log")
    assert "0 labeled now" in again
    assert {r[0]: r[4] for r in _rows(run)} == before  # not one judgment written again


def test_a_local_and_a_fleet_labeler_on_one_run_refuse_each_other(
    run: Path, fake: FakeLLMServer, redis_server: RedisServer, tmp_path: Path
) -> None:
    env = fleet_env(redis_server.url)
    local_args = [str(BIN / "labeler"), "label", *_args(run, fake, 1, "--concurrency", "1")]
    fake.script(Hang(30.0))
    with (tmp_path / "local.log").open("wb") as out:
        local = subprocess.Popen(local_args, env=env, stdout=out, stderr=out)
    while not fake.requests:
        assert local.poll() is None
        time.sleep(0.05)
    fleet = subprocess.run(
        [str(BIN / "labeler"), "label", *_args(run, fake, 1), "--executor", "celery"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert fleet.returncode == 2, fleet.stdout + fleet.stderr
    assert "labeler label (local) (host " in fleet.stderr and f"pid {local.pid}" in fleet.stderr
    local.send_signal(signal.SIGINT)
    time.sleep(0.5)  # two signals sent at once may arrive as one
    local.send_signal(signal.SIGINT)
    assert local.wait(10) == 130

    driver = start_driver(_args(run, fake, 1), env, tmp_path / "d.log")  # no worker: it waits
    _wait_for_holder(run, driver)
    refused = subprocess.run(local_args, env=env, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "labeler label --executor celery (host " in refused.stderr
    assert f"pid {driver.pid}" in refused.stderr
    driver.kill()
    driver.wait(10)


def _watch_commands(server: RedisServer) -> tuple[list[str], threading.Event, threading.Thread]:
    """Every command Redis receives from now until the event is set, on a thread: Redis's
    MONITOR on a connection that waits as long as the fleet is quiet (redis-py gives up a
    read after 5 s by default, and a loaded machine can start a worker slower than that).
    Should the connection break anyway, the list gets a "lost" entry: commands went by
    unseen. Returns once the monitor runs."""
    seen: list[str] = []
    stop = threading.Event()
    client = redis.Redis.from_url(server.url, socket_timeout=None, socket_connect_timeout=60)

    def watch() -> None:
        try:
            with client.monitor() as monitor:
                for command in monitor.listen():
                    seen.append(str(command.get("command", "")))
                    if stop.is_set():
                        return
        except redis.RedisError:
            seen.append("lost")
        finally:
            client.close()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    poke = server.client()
    while not seen:  # the monitor sees this ping once it runs
        assert watcher.is_alive(), "the monitor did not start"
        poke.ping()
        time.sleep(0.05)
    poke.close()
    return seen, stop, watcher


def test_a_key_echoed_by_a_provider_reaches_no_worker_log_queue_or_store(
    run: Path, fake: FakeLLMServer, redis_server: RedisServer, tmp_path: Path
) -> None:
    key = "sk-fleet-echoed-key-5d1e"
    env = fleet_env(redis_server.url, OPENAI_API_KEY=key)
    fake.script(BadRequest(400, f"Incorrect API key provided: {key}"),
                BadRequest(400, f"Incorrect API key provided: {key}"))  # fmt: skip
    seen, stop, watcher = _watch_commands(redis_server)
    with Worker("w1", env, tmp_path / "w1.log", concurrency=1):
        out = run_driver(_args(run, fake, 1), env, tmp_path / "d.log", expect=3)
    stop.set()
    poke = redis_server.client()
    while watcher.is_alive():  # it ends at the first command after the stop
        poke.ping()
        watcher.join(1)
    poke.close()
    assert "lost" not in seen  # the monitor saw every command, none missed in a reconnect
    assert any("XADD" in c and "[REDACTED]" in c for c in seen)  # the outcomes went by
    with sqlite3.connect(run / "labels.sqlite") as conn:
        reasons = [str(r[0]) for r in conn.execute("SELECT reason FROM judgments WHERE reason "
                                                   "IS NOT NULL")]  # fmt: skip
    assert len(reasons) == 2 and all("[REDACTED]" in r for r in reasons)
    places = {
        "driver output": out,
        "worker log": (tmp_path / "w1.log").read_text(),
        "redis": "\n".join(seen),
        "store": (run / "labels.sqlite").read_bytes().decode("latin-1"),
    }
    for where, text in places.items():
        assert key not in text, where


def test_an_interrupted_driver_exits_130_and_the_next_run_repays_nothing(
    run: Path, fake: FakeLLMServer, redis_server: RedisServer, tmp_path: Path
) -> None:
    fake.latency = 0.2
    env = fleet_env(redis_server.url)
    with Worker("w1", env, tmp_path / "w1.log", concurrency=8):
        driver = start_driver(_args(run, fake, 20), env, tmp_path / "d1.log")
        while _rows_so_far(run) < 10:
            assert driver.poll() is None
            time.sleep(0.1)
        driver.send_signal(signal.SIGINT)
        assert driver.wait(30) == 130, (tmp_path / "d1.log").read_text()[-3000:]
        text = (tmp_path / "d1.log").read_text()
        assert "interrupted: everything finished is stored" in text
        with sqlite3.connect(run / "labels.sqlite") as conn:
            failed = conn.execute("SELECT count(*) FROM judgments WHERE status='failed'")
            assert failed.fetchone() == (0,)
        assert len(_rows(run)) < 80
        run_driver(_args(run, fake, 20), env, tmp_path / "d2.log")
    rows = _rows(run)
    assert len(rows) == 80 and {r[2] for r in rows} == {"ok"} and {r[3] for r in rows} == {1}
    # stages that were on the worker at the signal finished there and were used, not repaid
    assert sum(1 for r in fake.requests if r.status == 200) == CALLS * 80


def test_a_run_stopped_by_a_rejected_key_resumes_once_the_key_works(
    run: Path, fake: FakeLLMServer, redis_server: RedisServer, tmp_path: Path
) -> None:
    fake.script(*[BadRequest(401, "Incorrect API key provided")] * 8)
    env = fleet_env(redis_server.url)
    with Worker("w1", env, tmp_path / "w1.log", concurrency=2):
        first = run_driver(_args(run, fake, 2), env, tmp_path / "d1.log", expect=2)
        assert "auth: explain: HTTP 401" in first
        wait_until_idle(redis_server)
        # the stages still queued never met the bad key: only the two slots' calls did
        assert 1 <= len(fake.requests) <= 2
        fake.reset()
        # the key works now: every feature is labeled, the earlier 401s blame none of them
        run_driver(_args(run, fake, 2), env, tmp_path / "d2.log", timeout=120)
    rows = _rows(run)
    assert len(rows) == 8 and {r[2] for r in rows} == {"ok"} and {r[3] for r in rows} == {1}
    assert sum(1 for r in fake.requests if r.status == 200) == CALLS * 8
