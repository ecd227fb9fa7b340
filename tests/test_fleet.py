"""The Celery fleet with real processes: a private redis-server, ``celery worker``
subprocesses, ``labeler label --executor celery`` drivers, and the fake LLM server on
loopback. Each test checks the store holds exactly one judgment per (feature, judge)
and that no paid call was repeated beyond what a killed process had in flight."""

from __future__ import annotations

import json
import shutil
import signal
import sqlite3
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from labeler.judges import make_judge
from labeler.judges.base import JudgeOptions
from labeler.labeling import label_run
from labeler.labeling.store import LabelStore
from labeler.run.data import RunData
from tests.conftest import CollectedDemo
from tests.fake_llm import BadRequest, FakeLLMServer, RateLimited, oracle
from tests.fleet import ALL_QUEUES, BIN, Worker, fleet_env, run_driver, start_driver
from tests.redis_server import RedisServer, free_port
from workers.broker import tasks_in_broker

pytestmark = pytest.mark.slow

JUDGE = "openai:fake-model"
CALLS = 4  # explain, detect top, detect random, classify


@pytest.fixture
def fake() -> Iterator[FakeLLMServer]:
    with FakeLLMServer(oracle) as server:
        yield server


@pytest.fixture
def run(collected: CollectedDemo, tmp_path: Path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(collected.run, target)
    return target


def _args(run: Path, fake: FakeLLMServer, sample: int, *extra: str) -> list[str]:
    return [str(run), "--judge", JUDGE, "--base-url", f"{fake.base_url}/v1",
            "--sample-per-layer", str(sample), *extra]  # fmt: skip


def _rows(run: Path) -> list[tuple[str, str, str, int]]:
    with sqlite3.connect(run / "labels.sqlite") as conn:
        rows = conn.execute("SELECT feature_id, judge, status, attempts FROM judgments")
        return [(str(f), str(j), str(s), int(a)) for f, j, s, a in rows]


def _planned(run: Path) -> set[str]:
    with sqlite3.connect(run / "labels.sqlite") as conn:
        return {str(r[0]) for r in conn.execute("SELECT feature_id FROM planned")}


def _assert_complete_once(run: Path, judges: list[str]) -> None:
    rows = _rows(run)
    planned = _planned(run)
    keys = Counter((f, j) for f, j, _, _ in rows)
    assert set(keys) == {(f, j) for f in planned for j in judges}  # nothing missing
    assert max(keys.values()) == 1  # nothing twice
    assert {s for *_, s, _ in rows} == {"ok"}
    assert {a for *_, a in rows} == {1}  # each stored in one write


def _requests_per_feature(fake: FakeLLMServer) -> int:
    return sum(1 for r in fake.requests if r.status == 200)


def _wait_for_labels(run: Path, n: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (run / "labels.sqlite").exists():
            try:
                if len(_rows(run)) >= n:
                    return
            except sqlite3.OperationalError:
                pass
        time.sleep(0.1)
    raise AssertionError(f"fewer than {n} labels after {timeout} s")


def test_two_workers_store_each_judgment_once_and_match_the_local_executor(
    run: Path, fake: FakeLLMServer, redis_server: RedisServer, tmp_path: Path
) -> None:
    local = tmp_path / "local"
    shutil.copytree(run, local)
    options = JudgeOptions(base_url=f"{fake.base_url}/v1", openai_api="chat")
    store = LabelStore(local / "labels.sqlite")
    for name in (JUDGE, "heuristic"):
        label_run(RunData.open(local), store, make_judge(name, options), sample_per_layer=75,
                  concurrency=16)  # fmt: skip
    expected = {j: store.judgments(j) for j in (JUDGE, "heuristic")}
    store.close()
    fake.reset()

    env = fleet_env(redis_server.url, OPENAI_API_KEY="sk-test")
    with (
        Worker("w1", env, tmp_path / "w1.log", concurrency=8),
        Worker("w2", env, tmp_path / "w2.log", concurrency=8),
    ):
        out = run_driver(_args(run, fake, 75, "--judge", "heuristic"), env, tmp_path / "d.log")
    assert "300 planned" in out
    _assert_complete_once(run, [JUDGE, "heuristic"])
    assert _requests_per_feature(fake) == CALLS * 300  # no call made twice
    got = LabelStore(run / "labels.sqlite")
    for judge, local_rows in expected.items():
        fleet_rows = got.judgments(judge)
        assert set(fleet_rows) == set(local_rows)
        for fid, row in local_rows.items():  # the same judgment, stage by stage
            a, b = fleet_rows[fid].judgment, row.judgment
            assert a is not None and b is not None
            # usage differs only in what the server's prompt cache held at the time
            assert a.model_dump(exclude={"usage"}) == b.model_dump(exclude={"usage"}), fid
            calls = sum(u.calls for u in a.usage.values())
            assert calls == (CALLS if judge == JUDGE else 0)
    got.close()
    w1, w2 = (tmp_path / "w1.log").read_text(), (tmp_path / "w2.log").read_text()
    assert w1.count("explain: ok") > 20 and w2.count("explain: ok") > 20  # both worked


def test_a_worker_killed_mid_run_loses_and_duplicates_nothing(
    run: Path, fake: FakeLLMServer, redis_server: RedisServer, tmp_path: Path
) -> None:
    fake.latency = 0.2
    env = fleet_env(redis_server.url)
    doomed = Worker("doomed", env, tmp_path / "doomed.log", concurrency=8).wait_ready()
    with Worker("survivor", env, tmp_path / "survivor.log", concurrency=8):
        driver = start_driver(_args(run, fake, 30), env, tmp_path / "d.log")
        _wait_for_labels(run, 30)
        in_flight = (tmp_path / "doomed.log").read_text().count("Task labeler.stage[")
        doomed.kill()
        assert in_flight > 0
        assert driver.wait(120) == 0, (tmp_path / "d.log").read_text()[-3000:]
    doomed.stop()
    _assert_complete_once(run, [JUDGE])
    # at most the calls the dead worker had in flight (8 threads) were made again
    assert CALLS * 120 <= _requests_per_feature(fake) <= CALLS * 120 + 8


def test_a_driver_stopped_and_started_again_resumes_without_duplicates(
    run: Path, fake: FakeLLMServer, redis_server: RedisServer, tmp_path: Path
) -> None:
    fake.latency = 0.1
    env = fleet_env(redis_server.url)
    with Worker("w1", env, tmp_path / "w1.log", concurrency=8):
        driver = start_driver(_args(run, fake, 30), env, tmp_path / "d1.log")
        _wait_for_labels(run, 25)
        driver.send_signal(signal.SIGKILL)
        driver.wait(10)
        assert len(_rows(run)) < 120
        out = run_driver(_args(run, fake, 30), env, tmp_path / "d2.log")
    assert "120 planned" in out
    _assert_complete_once(run, [JUDGE])
    assert _requests_per_feature(fake) == CALLS * 120  # queued work was not sent twice


def test_a_redis_restart_mid_run_delays_but_loses_nothing(
    run: Path, fake: FakeLLMServer, redis_server: RedisServer, tmp_path: Path
) -> None:
    fake.latency = 0.1
    env = fleet_env(redis_server.url)
    with Worker("w1", env, tmp_path / "w1.log", concurrency=8) as worker:
        driver = start_driver(_args(run, fake, 30), env, tmp_path / "d.log")
        _wait_for_labels(run, 25)
        redis_server.restart(down_for=2.0)
        assert driver.wait(180) == 0, (tmp_path / "d.log").read_text()[-3000:]
        assert worker.process.poll() is None  # reconnected, not stopped
        assert worker.text().count("Connected to") == 2
        assert "Unrecoverable error" not in worker.text()
    _assert_complete_once(run, [JUDGE])
    assert CALLS * 120 <= _requests_per_feature(fake) <= CALLS * 120 + 8


def _take_one_message(server: RedisServer, queue: str, timeout: float = 60) -> str:
    """Take a message off a queue the way a worker's BRPOP does, and drop it: the broker's
    window in which a connection that breaks loses the message. Returns its task id."""
    client = server.client()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        raw = client.rpop(queue)
        if raw is not None:
            client.close()
            return str(json.loads(raw)["headers"]["id"])
        time.sleep(0.05)
    raise AssertionError(f"no message on {queue} after {timeout} s")


def test_a_stage_lost_by_the_broker_is_found_missing_and_sent_again(
    run: Path, fake: FakeLLMServer, redis_server: RedisServer, tmp_path: Path
) -> None:
    env = fleet_env(redis_server.url)
    driver = start_driver(_args(run, fake, 5), env, tmp_path / "d.log")
    lost = _take_one_message(redis_server, "explain.openai")
    with Worker("w1", env, tmp_path / "w1.log", concurrency=4):
        assert driver.wait(120) == 0, (tmp_path / "d.log").read_text()[-3000:]
    _assert_complete_once(run, [JUDGE])
    assert _requests_per_feature(fake) == CALLS * 20  # the lost stage ran once, nothing twice
    log = (tmp_path / "d.log").read_text()
    assert log.count("sending it again") == 1 and "explain: sent, but neither queued" in log
    assert lost in (tmp_path / "w1.log").read_text()  # the same task id, sent again


def held_by_the_broker(server: RedisServer) -> set[str]:
    """Ids of the stage messages waiting on a queue or taken by a worker and not yet
    acknowledged."""
    client = server.client()
    try:
        return tasks_in_broker(client, ALL_QUEUES.split(","))
    finally:
        client.close()


def wait_until_idle(server: RedisServer, timeout: float = 180) -> None:
    """Until no stage message is queued or held by a worker (a deadlock guard: the
    timeout only turns a hang into a failure)."""
    deadline = time.monotonic() + timeout
    while held_by_the_broker(server):
        assert time.monotonic() < deadline, "stage messages still queued or held"
        time.sleep(0.1)


def _sent_ids(server: RedisServer) -> list[str]:
    """Task ids in the labelings' ``queued`` hashes: sent, and not yet given back."""
    client = server.client()
    try:
        found = [client.hkeys(key) for key in client.keys("labeler:run:*:queued")]
        return [task_id.decode() for ids in found for task_id in ids]
    finally:
        client.close()


def _done_ids(server: RedisServer) -> set[str]:
    client = server.client()
    try:
        found = [client.hkeys(key) for key in client.keys("labeler:run:*:done")]
        return {task_id.decode() for ids in found for task_id in ids}
    finally:
        client.close()


def test_a_rejected_key_stops_the_queued_stages_before_they_reach_the_provider(
    run: Path, fake: FakeLLMServer, redis_server: RedisServer, tmp_path: Path
) -> None:
    fake.script(*[BadRequest(401, "Incorrect API key provided")] * 400)
    env = fleet_env(redis_server.url)
    slots = 4
    with Worker("w1", env, tmp_path / "w1.log", concurrency=slots):
        out = run_driver(_args(run, fake, 64), env, tmp_path / "d.log", expect=2)
        assert "256 planned" in out and "auth: explain: HTTP 401" in out
        wait_until_idle(redis_server)
    # 256 explanations were queued; every request met the rejected key, and after the
    # first only those already on their way from the other slots went out
    assert 1 <= len(fake.requests) <= slots, len(fake.requests)
    assert all(r.status == 401 for r in fake.requests)
    # what was queued was taken back, to be sent anew: only the stages that made their
    # call are still recorded as sent (their outcomes wait for the next run)
    assert set(_sent_ids(redis_server)) <= _done_ids(redis_server)
    assert not any(s == "failed" for *_, s, _ in _rows(run))  # no feature is blamed


def test_an_interrupted_driver_takes_back_its_queued_stages_and_the_next_run_sends_them(
    run: Path, fake: FakeLLMServer, redis_server: RedisServer, tmp_path: Path
) -> None:
    env = fleet_env(redis_server.url)
    driver = start_driver(_args(run, fake, 10), env, tmp_path / "d1.log")  # no worker yet
    deadline = time.monotonic() + 120
    while len(held_by_the_broker(redis_server)) < 40:
        assert driver.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)
    driver.send_signal(signal.SIGINT)
    assert driver.wait(60) == 130, (tmp_path / "d1.log").read_text()[-3000:]
    assert not held_by_the_broker(redis_server)  # nothing left for a worker to pay for
    assert not _sent_ids(redis_server)
    with Worker("w1", env, tmp_path / "w1.log", concurrency=4):
        run_driver(_args(run, fake, 10), env, tmp_path / "d2.log")
    _assert_complete_once(run, [JUDGE])
    assert _requests_per_feature(fake) == CALLS * 40  # each stage paid once


def test_a_fleet_wide_request_limit_holds_across_two_workers(
    run: Path, fake: FakeLLMServer, redis_server: RedisServer, tmp_path: Path
) -> None:
    rpm = 600  # 10 requests a second, a burst of 10
    # a stage may wait out the limit for half its time limit before it goes back to the
    # queue: the time limit leaves a machine loaded many times over room for that
    env = fleet_env(redis_server.url, LABELER_TASK_TIME_LIMIT="120",
                    LABELER_VISIBILITY_TIMEOUT="240")  # fmt: skip
    slots = 2 * 8
    with (
        Worker("w1", env, tmp_path / "w1.log", concurrency=8),
        Worker("w2", env, tmp_path / "w2.log", concurrency=8),
    ):
        run_driver(_args(run, fake, 10, "--rpm", str(rpm)), env, tmp_path / "d.log")
    _assert_complete_once(run, [JUDGE])
    times = sorted(r.time for r in fake.requests)
    assert len(times) == CALLS * 40
    rate, burst = rpm / 60, rpm / 60
    # A request reaches the server some time after the limiter let it start, however long
    # a loaded machine makes that; but a slot asks again only after its request arrived,
    # so a window of arrivals holds at most one earlier start per slot. A limit kept per
    # worker instead of across the fleet doubles the rate (about 120 arrivals in 5 s
    # against a bound of 76) and fails.
    for width in (5.0, 10.0):
        worst = max(sum(1 for t in times[i:] if t < start + width) for i, start in enumerate(times))
        assert worst <= burst + rate * width + slots, (width, worst)
    span = times[-1] - times[0]
    assert len(times) <= burst + rate * span + slots  # the whole run, the widest window


def test_a_429_reschedules_the_stage_after_retry_after_and_frees_the_slot(
    run: Path, fake: FakeLLMServer, redis_server: RedisServer, tmp_path: Path
) -> None:
    fake.latency = 0.05
    fake.script(RateLimited(retry_after=3.0))
    env = fleet_env(redis_server.url)
    with Worker("w1", env, tmp_path / "w1.log", concurrency=1):
        run_driver(_args(run, fake, 2), env, tmp_path / "d.log")
    _assert_complete_once(run, [JUDGE])
    requests = fake.requests
    limited = requests[0]
    assert limited.status == 429
    same = [r for r in requests[1:] if r.body == limited.body]
    assert same and same[0].time - limited.time >= 3.0  # waited what the server asked
    # the only worker slot served other stages meanwhile instead of sleeping (the other
    # feature's explanation was queued before the 429 came back)
    between = [r for r in requests if limited.time < r.time < same[0].time]
    assert len(between) >= 1
    assert "rescheduled in" in (tmp_path / "w1.log").read_text()


def test_a_failed_stage_alone_is_redone_on_the_next_run(
    run: Path, fake: FakeLLMServer, redis_server: RedisServer, tmp_path: Path
) -> None:
    fake.script(BadRequest())  # the first call is rejected: its feature fails
    env = fleet_env(redis_server.url)
    with Worker("w1", env, tmp_path / "w1.log", concurrency=1):
        out = run_driver(_args(run, fake, 1, "--max-inflight", "1"), env, tmp_path / "d1.log",
                         expect=3)  # fmt: skip
        assert "1 planned feature judgments are failed" in out and f"{JUDGE}: 1 rejected" in out
        failed = [(f, a) for f, _, s, a in _rows(run) if s == "failed"]
        assert len(failed) == 1 and len(_rows(run)) == 4
        feature = failed[0][0]
        with sqlite3.connect(run / "labels.sqlite") as conn:
            kept = conn.execute("SELECT count(*) FROM stages WHERE feature_id=?", (feature,))
            n_kept = int(kept.fetchone()[0])
            reason = conn.execute("SELECT reason FROM judgments WHERE status='failed'")
            assert str(reason.fetchone()[0]).startswith("rejected: explain: HTTP 400")
        first_run = len(fake.requests)
        run_driver(_args(run, fake, 1, "--max-inflight", "1"), env, tmp_path / "d2.log")
    redone = len(fake.requests) - first_run
    assert redone == CALLS - n_kept  # only the stages that had not succeeded
    rows = {f: (s, a) for f, _, s, a in _rows(run)}
    assert {s for s, _ in rows.values()} == {"ok"} and rows[feature][1] == 2


def test_status_shows_queued_running_throughput_and_eta(
    run: Path, fake: FakeLLMServer, redis_server: RedisServer, tmp_path: Path
) -> None:
    fake.latency = 0.3
    env = fleet_env(redis_server.url)
    status = [str(BIN / "labeler"), "status", str(run), "--json"]
    with Worker("w1", env, tmp_path / "w1.log", concurrency=4):
        driver = start_driver(_args(run, fake, 20), env, tmp_path / "d.log")
        _wait_for_labels(run, 10)
        live = json.loads(subprocess.run(status, env=env, capture_output=True, check=True).stdout)
        assert driver.wait(120) == 0
    after = json.loads(subprocess.run(status, env=env, capture_output=True, check=True).stdout)
    (during,) = live
    assert during["judge"] == JUDGE and 10 <= during["labeled"] < 80
    assert during["queued"] + during["running"] > 0 and during["running"] <= 4
    assert during["throughput_per_s"] > 0 and during["eta_s"] > 0
    (done,) = after
    assert (done["labeled"], done["pending"], done["queued"], done["running"]) == (80, 0, 0, 0)
    assert done["eta_s"] == 0


def _fails(args: list[str], env: dict[str, str], *needles: str) -> None:
    result = subprocess.run([str(BIN / "labeler"), *args], env=env, capture_output=True,
                            text=True, timeout=120)  # fmt: skip
    assert result.returncode == 2, result.stdout + result.stderr
    for needle in needles:
        assert needle in result.stderr, result.stderr


def test_bad_fleet_settings_and_options_are_refused_before_any_work(
    run: Path, redis_server: RedisServer, tmp_path: Path
) -> None:
    env = fleet_env(redis_server.url)
    celery = [str(run), "--judge", JUDGE, "--executor", "celery"]
    bad_timeout = {**env, "LABELER_VISIBILITY_TIMEOUT": "5"}
    _fails(["label", *celery], bad_timeout, "LABELER_VISIBILITY_TIMEOUT", "must exceed")
    _fails(["label", *celery], {**env, "LABELER_TASK_TIME_LIMIT": "soon"},
           "LABELER_TASK_TIME_LIMIT")  # fmt: skip
    _fails(["label", *celery, "--rpm", "openai:other=10"], env, "--rpm", "not one of")
    _fails(["label", *celery, "--rpm", "0"], env, "--rpm")
    _fails(["label", *celery, "--tpm", "lots"], env, "--tpm", "[JUDGE=]NUMBER")
    _fails(["label", str(run), "--requeue"], env, "--executor celery")
    gone = {**env, "LABELER_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    _fails(["label", *celery], gone, "cannot reach Redis", "LABELER_REDIS_URL")
    assert not (run / "labels.sqlite").exists() or not _rows(run)  # nothing labeled


def _hold_run(run: Path, host: str, pid: int, token: str = "elsewhere") -> None:
    """Write the run's lock as a live labeler elsewhere holds it."""
    LabelStore(run / "labels.sqlite").close()
    with sqlite3.connect(run / "labels.sqlite") as conn:
        now = time.time()
        conn.execute(
            "INSERT OR REPLACE INTO run_lock VALUES (1, ?, ?, ?, ?, ?, ?)",
            (token, host, pid, "labeler label --executor celery", now - 60, now),
        )


def test_a_second_driver_on_the_same_labeling_is_refused(
    run: Path, redis_server: RedisServer, tmp_path: Path
) -> None:
    _hold_run(run, "elsewhere", 123)
    env = fleet_env(redis_server.url)
    _fails(["label", str(run), "--judge", "heuristic", "--executor", "celery"], env,
           "labeler label --executor celery (host elsewhere, pid 123, since ")  # fmt: skip
    assert not _rows(run)


def test_a_task_a_worker_cannot_read_comes_back_as_a_version_mismatch(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    from workers.app import make_app
    from workers.settings import FleetSettings

    app = make_app(FleetSettings(redis_url=redis_server.url, task_time_limit_s=8,
                                 visibility_timeout_s=12))  # fmt: skip
    payload = {"run": "r1", "feature_id": "L0F1", "judge": JUDGE, "stage": "explain",
               "prompt_hash": "abc", "a_field_from_a_newer_driver": 1}  # fmt: skip
    env = fleet_env(redis_server.url)
    client = redis_server.client()
    with Worker("w1", env, tmp_path / "w1.log", concurrency=1):
        app.send_task("labeler.stage", kwargs={"payload": payload}, task_id="t-new",
                      queue="explain.openai")  # fmt: skip
        app.send_task("labeler.stage", kwargs={"payload": {"junk": True}}, task_id="t-junk",
                      queue="explain.openai")  # fmt: skip
        deadline = time.monotonic() + 30
        while "t-junk" not in (tmp_path / "w1.log").read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        entries = client.xrange("labeler:run:r1:results")
    assert len(entries) == 1  # the readable identity got its failure; the junk was logged
    ((_, fields),) = entries
    assert fields[b"task_id"] == b"t-new"
    outcome = json.loads(fields[b"outcome"])
    assert (outcome["feature_id"], outcome["stage"], outcome["ok"]) == ("L0F1", "explain", False)
    assert outcome["reason"].startswith("version_mismatch: explain: this worker cannot read")
    assert "a_field_from_a_newer_driver" in outcome["reason"]
    assert "unreadable payload, dropped" in (tmp_path / "w1.log").read_text()
    client.close()


def test_a_driver_whose_lock_was_taken_over_stops(
    run: Path, fake: FakeLLMServer, redis_server: RedisServer, tmp_path: Path
) -> None:
    fake.latency = 0.2
    driver = start_driver(_args(run, fake, 5), fleet_env(redis_server.url), tmp_path / "d.log")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if (run / "labels.sqlite").exists():
            with sqlite3.connect(run / "labels.sqlite") as conn:
                try:
                    if conn.execute("SELECT count(*) FROM run_lock").fetchone()[0]:
                        break
                except sqlite3.OperationalError:  # the store is being made
                    pass
        time.sleep(0.05)
    _hold_run(run, "elsewhere", 7)  # as a second labeler after a long stall of this one
    assert driver.wait(30) == 2
    assert "another labeler took this run's lock" in (tmp_path / "d.log").read_text()


def test_a_fleet_answers_from_the_shared_reply_cache(
    run: Path, fake: FakeLLMServer, redis_server: RedisServer, tmp_path: Path,
    collected: CollectedDemo,
) -> None:  # fmt: skip
    env = fleet_env(redis_server.url) | {"LABELER_CACHE_DIR": str(tmp_path / "cache")}
    copy = tmp_path / "copy"
    shutil.copytree(collected.run, copy)
    with Worker("w1", env, tmp_path / "w1.log"):
        run_driver(_args(run, fake, 1), env, tmp_path / "d1.log")
        paid = len(fake.requests)
        assert paid == 4 * CALLS
        # the same labeling on a copy of the run: the workers read every reply from the
        # shared folder the driver filled
        run_driver(_args(copy, fake, 1), env, tmp_path / "d2.log")
    assert len(fake.requests) == paid
    _assert_complete_once(copy, [JUDGE])
    with sqlite3.connect(copy / "labels.sqlite") as conn:
        usage = [json.loads(u) for (u,) in conn.execute("SELECT usage FROM judgments")]
    assert sum(s["cached_replies"] for u in usage for s in u.values()) == 4 * CALLS
    assert sum(s["calls"] for u in usage for s in u.values()) == 0
