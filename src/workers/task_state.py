"""A stage task's state changes in Redis, each one atomic and one round trip.

``begin``: nothing if the task's outcome is already published (a redelivery) or another
execution holds its claim (a duplicate message); nothing either, and the task given back
(below), if the labeling stopped; else claim it and mark it running. The claim's value is
the execution's own token, so the same execution asking again (its first reply lost) is
told to go on.
``publish``: the outcome on the labeling's stream, the done mark, and the claim and
running mark released, all at once; a second publish of the same task writes nothing. An
outcome that says the judge cannot work (a rejected key) also sets the labeling's stop,
in the same step, so that no other slot sends a request of it after this one came back.
``give_back``: once the labeling stopped, a task that will not run is taken off the
labeling's ``queued`` hash (and its claim and running mark released), so the next driver
sends it again instead of waiting for it.
"""

from __future__ import annotations

from typing import Literal

import redis

from workers import keys

_BEGIN = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then return 'done' end
local held = redis.call('GET', KEYS[2])
if held and held ~= ARGV[2] then return 'claimed' end
if redis.call('EXISTS', KEYS[4]) == 1 then
  if held then redis.call('DEL', KEYS[2]) end
  redis.call('HDEL', KEYS[3], ARGV[1])
  redis.call('HDEL', KEYS[5], ARGV[1])
  return 'stopped'
end
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
if ARGV[3] ~= '' then redis.call('SET', KEYS[5], ARGV[3], 'NX', 'EX', ARGV[4]) end
return 1
"""

_GIVE_BACK = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
redis.call('DEL', KEYS[4])
return 1
"""

_RELEASE = """
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[2])
return 1
"""

Begin = Literal["ok", "done", "claimed", "stopped"]


class TaskState:
    def __init__(self, client: redis.Redis) -> None:
        self._begin = client.register_script(_BEGIN)
        self._publish = client.register_script(_PUBLISH)
        self._release = client.register_script(_RELEASE)
        self._give_back = client.register_script(_GIVE_BACK)

    def begin(self, run: str, task_id: str, claim: str, ttl: int, running: str) -> Begin:
        reply = self._begin(
            keys=[keys.done(run), keys.claim(task_id), keys.running(run), keys.stop(run),
                  keys.queued(run)],
            args=[task_id, claim, ttl, running],
        )  # fmt: skip
        text = reply.decode() if isinstance(reply, bytes) else str(reply)
        if text not in ("ok", "done", "claimed", "stopped"):
            raise RuntimeError(f"unexpected reply from the begin script: {text!r}")
        return text  # type: ignore[return-value]

    def publish(self, run: str, task_id: str, outcome: str, stop: str | None = None) -> bool:
        """``stop``: the labeling's stop reason to set with it (a judge that cannot work)."""
        reply = self._publish(
            keys=[keys.done(run), keys.results(run), keys.running(run), keys.claim(task_id),
                  keys.stop(run)],
            args=[task_id, outcome, stop or "", keys.STOP_TTL_S],
        )  # fmt: skip
        return bool(int(reply))

    def give_back(self, run: str, task_id: str) -> bool:
        """Whether the labeling has stopped; if so the task is given back (see above)."""
        reply = self._give_back(
            keys=[keys.stop(run), keys.queued(run), keys.running(run), keys.claim(task_id)],
            args=[task_id],
        )
        return bool(int(reply))

    def release(self, run: str, task_id: str) -> None:
        self._release(keys=[keys.running(run), keys.claim(task_id)], args=[task_id])
