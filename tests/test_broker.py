"""The fleet's Redis transport against a private redis-server: where a sent task can be
found (queued, or delivered and not acknowledged), and the settings of the sweep that
returns a dead worker's messages. (A worker outliving a Redis restart is tested with
real workers in test_fleet.py.)"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from celery import Celery

from tests.redis_server import RedisServer
from workers.app import make_app
from workers.broker import tasks_in_broker
from workers.settings import FleetSettings

QUEUE = "explain.openai"


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer(tmp_path / "redis") as server:
        yield server


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
