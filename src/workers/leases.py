"""A worker's leases on the stages it runs.

A claim on a stage lives ``LEASE_S`` seconds and is renewed every ``RENEW_S`` by a
thread of the worker process, whatever its tasks are doing. A worker that dies (SIGKILL,
a lost machine) stops renewing, so within ``LEASE_S`` its stages are held by nobody and
the driver sends them again; the Redis visibility timeout (an hour by default) is only
the last resort for messages no driver asks about.
"""

from __future__ import annotations

import logging
import threading
import time

import redis

log = logging.getLogger(__name__)

LEASE_S = 15
RENEW_S = 3.0

# a claim still ours is extended; one that lapsed (Redis was unreachable for longer than
# the lease) is taken again; one another execution holds is left to it
_RENEW = """
local renewed = 0
for i, key in ipairs(KEYS) do
  local held = redis.call('GET', key)
  if held == ARGV[i + 1] then
    redis.call('EXPIRE', key, ARGV[1])
    renewed = renewed + 1
  elseif not held then
    redis.call('SET', key, ARGV[i + 1], 'EX', ARGV[1])
    renewed = renewed + 1
  end
end
return renewed
"""


class Leases:
    """The claims this process holds (claim key -> its token), renewed on a thread."""

    def __init__(self, client: redis.Redis, lease_s: int = LEASE_S, renew_s: float = RENEW_S):
        self.lease_s = lease_s
        self.renew_s = renew_s
        self._renew = client.register_script(_RENEW)
        self._held: dict[str, str] = {}
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="leases", daemon=True)
        self._thread.start()

    def hold(self, key: str, token: str) -> None:
        with self._lock:
            self._held[key] = token

    def drop(self, key: str) -> None:
        with self._lock:
            self._held.pop(key, None)

    def _run(self) -> None:
        while True:
            time.sleep(self.renew_s)
            with self._lock:
                held = dict(self._held)
            if not held:
                continue
            try:
                self._renew(keys=list(held), args=[self.lease_s, *held.values()])
            except redis.RedisError as exc:  # Redis restarting: the next beat tries again
                log.warning("renewing %d stage leases: %s", len(held), exc)
