"""The fleet's Redis transport against a private redis-server: where a sent task can be
found (queued, or delivered and not acknowledged), and the settings of the sweep that
returns a dead worker's messages, and a worker's rate limiter across a Redis restart.
(A worker outliving a Redis restart is tested with real workers in test_fleet.py.)"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import redis.asyncio
from celery import Celery

from labeler.errors import Reschedule
from labeler.judges.ratelimit import RateLimits, RedisRateLimiter
from tests.redis_server import RedisServer
from workers import runtime
from workers.app import make_app
from workers.broker import tasks_in_broker
from workers.runtime import PatientLimiter
from workers.settings import FleetSettings
from workers.task_state import TaskState

QUEUE = "explain.openai"


@pytest.fixture
def app(redis_server: RedisServer) -> Celery:
    settings = FleetSettings(
        redis_url=redis_server.url, task_time_limit_s=8, visibility_timeout_s=12
    )
    return make_app(settings)


def _send(app: Celery, task_id: str, priority: int | None = None) -> None:
    app.send_task("labeler.stage", kwargs={"payload": {}}, task_id=task_id, queue=QUEUE,
                  priority=priority)  # fmt: skip


def test_sent_tasks_are_found_queued_at_any_priority_and_unacknowledged(
    app: Celery, redis_server: RedisServer
) -> None:
    for task_id in ("a", "b", "c"):
        _send(app, task_id)
    _send(app, "urgent", priority=9)
    client = redis_server.client()
    assert tasks_in_broker(client, [QUEUE]) == {"a", "b", "c", "urgent"}
    assert tasks_in_broker(client, ["score.openai"]) == set()

    with app.connection_for_read() as connection:
        channel = connection.default_channel
        taken = channel.basic_get(QUEUE, no_ack=False)  # delivered to a "worker", not acked
        assert taken is not None
        taken_id = taken.headers["id"]
        assert tasks_in_broker(client, [QUEUE]) == {"a", "b", "c", "urgent"}  # now unacked
        assert client.hexists("unacked", taken.delivery_tag)
        taken.ack()
    assert tasks_in_broker(client, [QUEUE]) == {"a", "b", "c", "urgent"} - {taken_id}
    client.close()


def test_the_lock_on_the_sweep_for_dead_workers_messages_lives_seconds(
    app: Celery,
) -> None:
    with app.connection_for_read() as connection:
        channel = connection.default_channel
        # a worker killed while holding it stops every sweep until it lapses; kombu's
        # default is five minutes
        assert channel.unacked_mutex_expire == 2
        assert channel.visibility_timeout == 12
        assert channel.unacked_restore_interval == 1


def test_a_workers_rate_limiter_waits_out_a_redis_restart_and_never_fails_a_reply(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(runtime, "SETTLE_RETRY_S", 0.5)

    async def run() -> float:
        client = redis.asyncio.Redis.from_url(redis_server.url)
        limits = RateLimits(rpm=600, tpm=60_000)
        limiter = PatientLimiter(RedisRateLimiter(client, "labeler:limit:test", limits), 60)
        await limiter.acquire(100)
        redis_server.stop()
        threading.Timer(1.0, redis_server.start).start()
        started = time.monotonic()
        await limiter.acquire(100)  # Redis is back after a second
        waited = time.monotonic() - started
        await limiter.settle(100, 400)
        assert await client.hexists("labeler:limit:test", "t")  # the buckets live in Redis
        redis_server.stop()
        await limiter.settle(100, 400)  # Redis gone: logged, not raised
        await client.aclose()
        return waited

    waited = asyncio.run(asyncio.wait_for(run(), 30))
    assert waited >= 0.9
    assert "gave up" in caplog.text and "the estimate stands" in caplog.text


def test_a_claim_belongs_to_one_execution_which_may_ask_again(
    redis_server: RedisServer,
) -> None:
    client = redis_server.client()
    state = TaskState(client)
    running = '{"worker": "w"}'
    assert state.begin("run", "t1", "w1/a", 30, running) == "ok"
    assert state.begin("run", "t1", "w1/a", 30, running) == "ok"  # its first reply lost
    assert state.begin("run", "t1", "w2/b", 30, running) == "claimed"  # a duplicate message
    assert state.publish("run", "t1", '{"ok": true}')
    assert not state.publish("run", "t1", '{"ok": true}')  # published once
    assert state.begin("run", "t1", "w3/c", 30, running) == "done"  # a redelivery
    assert client.xlen("labeler:run:run:results") == 1
    assert not client.exists("labeler:claim:t1")
    client.close()


def test_a_long_wait_for_the_fleet_rate_limit_reschedules_instead_of_holding_the_slot(
    redis_server: RedisServer,
) -> None:
    async def run() -> tuple[float, Reschedule]:
        client = redis.asyncio.Redis.from_url(redis_server.url)
        limits = RateLimits(rpm=30)  # one every 2 s, a burst of one
        key = "labeler:limit:slow"
        patient = PatientLimiter(RedisRateLimiter(client, key, limits), max_wait_s=3.0)
        hasty = PatientLimiter(RedisRateLimiter(client, key, limits), max_wait_s=1.0)
        await patient.acquire(1)
        started = time.monotonic()
        await patient.acquire(1)  # 2 s: within its 3 s, waited
        waited = time.monotonic() - started
        with pytest.raises(Reschedule) as rescheduled:
            await hasty.acquire(1)  # 2 s more: over its 1 s, back to the queue at once
        await client.aclose()
        return waited, rescheduled.value

    waited, rescheduled = asyncio.run(asyncio.wait_for(run(), 30))
    assert 1.8 < waited < 3.0
    assert rescheduled.retry_after is not None and 1.5 < rescheduled.retry_after <= 2.0
    assert "fleet rate limit labeler:limit:slow: next request in" in str(rescheduled)


def test_a_message_taken_on_a_lost_connection_is_left_for_the_sweep_not_acknowledged(
    app: Celery, redis_server: RedisServer
) -> None:
    _send(app, "finished-late")
    connection = app.connection_for_read()
    channel = connection.default_channel
    channel.do_restore = False  # as when Redis was down at the close: nothing put back
    message = channel.basic_get(QUEUE, no_ack=False)
    assert message is not None
    # the connection is lost and dropped while the task runs; the task then finishes
    # and its message is acknowledged on the dead channel (kombu's own transport raises
    # AttributeError here, which stops the worker)
    connection.collect()
    connection.close()
    message.ack()
    client = redis_server.client()
    assert client.hexists("unacked", message.delivery_tag)  # returns after the timeout
    assert tasks_in_broker(client, [QUEUE]) == {"finished-late"}
    client.close()
