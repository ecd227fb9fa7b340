"""The Redis broker transport of the fleet: kombu's, made to survive a lost connection.

When the worker's connection to Redis breaks, Celery (5.7) detaches kombu's transport
from its connection and only then closes the task channel; closing the channel tries to
put the unacknowledged messages back on their queues, which needs the detached
connection's address, and the ``AttributeError`` that follows is not a connection error:
the worker stops with "Unrecoverable error" instead of reconnecting.

Here a channel whose transport is detached gives up that restore, and so do the
acknowledgements of tasks that finish on such a channel after the worker has
reconnected (each would stop the worker the same way). Nothing is lost by it:
with late acknowledgement every delivered message stays in Redis's ``unacked`` index
until acknowledged, and any worker's periodic sweep puts it back on its queue once the
visibility timeout has passed. A task that finished meanwhile then finds its done mark
and does nothing.

Selected with ``broker_transport = "workers.broker:Transport"``; the broker URL stays
``redis://...``.

The transport has one window in which a message exists only in a process's memory: a
worker's ``BRPOP`` takes it off its queue and only then writes it to the ``unacked``
index. A connection that breaks in between (Redis restarting, a network fault) loses it.
``tasks_in_broker`` lets the driver find such stages and send them again, and
``revoke_queued`` lets a driver that stops take its messages back off the queues.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from typing import Any

import redis as redis_py
from kombu.transport import redis

logger = logging.getLogger(__name__)


class QoS(redis.QoS):  # type: ignore[misc]
    def _detached(self) -> bool:
        transport = self.channel.connection
        return transport is None or transport.client is None

    def restore_unacked(self, client: Any = None) -> Any:
        if client is None and self._detached():
            logger.warning(
                "broker connection lost with %d unacknowledged message(s): they stay in "
                "Redis and return to their queues after the visibility timeout",
                len(self._delivered),
            )
            self._delivered.clear()
            return None
        return super().restore_unacked(client)

    def ack(self, delivery_tag: str) -> None:
        # a task that finished after its connection was lost: its message returns after
        # the visibility timeout and then finds the task done
        if self._detached():
            logger.info("message %s taken on a lost connection: not acknowledged", delivery_tag)
            return
        super().ack(delivery_tag)

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        if self._detached():
            logger.info("message %s taken on a lost connection: not rejected", delivery_tag)
            return
        super().reject(delivery_tag, requeue=requeue)


class Channel(redis.Channel):  # type: ignore[misc]
    QoS = QoS


class Transport(redis.Transport):  # type: ignore[misc]
    Channel = Channel


SCAN_CHUNK = 500


def tasks_in_broker(
    client: redis_py.Redis, queues: Iterable[str], unacked: bool = True
) -> set[str]:
    """Ids of the tasks waiting on ``queues`` (at any priority) and, with ``unacked``,
    delivered to a worker and not acknowledged yet (every queue's, including tasks held
    for a countdown, and those of workers that died)."""
    found: set[str] = set()
    for name in _queue_lists(queues):
        for start in range(0, int(client.llen(name)), SCAN_CHUNK):
            for raw in client.lrange(name, start, start + SCAN_CHUNK - 1):
                found.add(_message_id(raw))
    if unacked:
        for _, raw in client.hscan_iter(Channel.unacked_key, count=SCAN_CHUNK):
            found.add(_message_id(json.loads(raw)[0]))
    found.discard("")
    return found


def revoke_queued(client: redis_py.Redis, queues: Iterable[str], sent: str) -> int:
    """Take off ``queues`` the messages of the tasks in the hash ``sent`` (a labeling's
    ``queued``), forgetting each one taken there too; how many were taken. Each removal
    is atomic: a message a worker took meanwhile stays that worker's."""
    found: list[tuple[str, Any, str]] = []
    for name in _queue_lists(queues):
        for start in range(0, int(client.llen(name)), SCAN_CHUNK):
            raws: list[Any] = client.lrange(name, start, start + SCAN_CHUNK - 1)
            ids = [_message_id(raw) for raw in raws]
            mine = client.hmget(sent, ids) if ids else []
            found += [(name, r, i) for r, i, m in zip(raws, ids, mine, strict=True) if m]
    taken = 0
    for name, raw, task_id in found:
        if client.lrem(name, 1, raw):
            client.hdel(sent, task_id)
            taken += 1
    return taken


def _queue_lists(queues: Iterable[str]) -> list[str]:
    """The Redis lists of ``queues``: one per priority step."""
    return [
        f"{queue}{Channel.sep}{p}" if p else queue
        for queue in queues
        for p in Channel.priority_steps
    ]


def _message_id(raw: bytes | str | dict[str, Any]) -> str:
    message = json.loads(raw) if isinstance(raw, bytes | str) else raw
    headers = message.get("headers") or {}
    properties = message.get("properties") or {}
    return str(headers.get("id") or properties.get("correlation_id") or "")
