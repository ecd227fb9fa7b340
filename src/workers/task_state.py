"""A stage task's state changes in Redis, each one atomic and one round trip.

``begin``: nothing if the task's outcome is already published (a redelivery) or another
execution holds its claim (a duplicate message); else claim it and mark it running. The
claim's value is the execution's own token, so the same execution asking again (its
first reply lost) is told to go on.
``publish``: the outcome on the labeling's stream, the done mark, and the claim and
running mark released, all at once; a second publish of the same task writes nothing.
"""

from __future__ import annotations

from typing import Literal

import redis

from workers import keys

_BEGIN = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then return 'done' end
local held = redis.call('GET', KEYS[2])
if held and held ~= ARGV[2] then return 'claimed' end
redis.call('SET', KEYS[2], ARGV[2], 'EX', ARGV[3])
redis.call('HSET', KEYS[3], ARGV[1], ARGV[4])
return 'ok'
"""

_PUBLISH = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], '1')
redis.call('XADD', KEYS[2], '*', 'task_id', ARGV[1], 'outcome', ARGV[2])
redis.call('HDEL', KEYS[3], ARGV[1])
redis.call('DEL', KEYS[4])
return 1
"""

_RELEASE = """
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[2])
return 1
"""

Begin = Literal["ok", "done", "claimed"]


class TaskState:
    def __init__(self, client: redis.Redis) -> None:
        self._begin = client.register_script(_BEGIN)
        self._publish = client.register_script(_PUBLISH)
        self._release = client.register_script(_RELEASE)

    def begin(self, run: str, task_id: str, claim: str, ttl: int, running: str) -> Begin:
        reply = self._begin(
            keys=[keys.done(run), keys.claim(task_id), keys.running(run)],
            args=[task_id, claim, ttl, running],
        )
        text = reply.decode() if isinstance(reply, bytes) else str(reply)
        if text not in ("ok", "done", "claimed"):
            raise RuntimeError(f"unexpected reply from the begin script: {text!r}")
        return text  # type: ignore[return-value]

    def publish(self, run: str, task_id: str, outcome: str) -> bool:
        reply = self._publish(
            keys=[keys.done(run), keys.results(run), keys.running(run), keys.claim(task_id)],
            args=[task_id, outcome],
        )
        return bool(int(reply))

    def release(self, run: str, task_id: str) -> None:
        self._release(keys=[keys.running(run), keys.claim(task_id)], args=[task_id])
