"""What a worker process keeps between tasks: one asyncio loop on its own thread, on
which every judge runs (so SDK clients and their connections are reused across tasks,
whatever the pool), the judges built so far, and Redis clients.

With the threads pool, many tasks submit their stage to the one loop concurrently; with
prefork, each child process makes its own runtime after the fork.

Every provider call of an LLM judge passes a :class:`StopGate` first: a judge is shared by
every labeling the process serves, so the gate learns which labeling a call is for from
``CURRENT_RUN``, set for each stage by :meth:`WorkerRuntime.run`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import threading
from collections.abc import Callable, Coroutine
from concurrent.futures import TimeoutError as FutureTimeout
from contextvars import ContextVar
from typing import Any, TypeVar

import redis
import redis.asyncio

from labeler.errors import Reschedule
from labeler.judges import Judge, make_judge
from labeler.judges.base import JudgeOptions
from labeler.judges.llm_judge import LLMJudge
from labeler.judges.openai_backend import OpenAIBackend
from labeler.judges.ratelimit import RateLimits, RedisRateLimiter, jittered, limiter_key
from labeler.judges.requests import FolderCache, KeptReply, folder_cache_from_env
from workers import keys
from workers.leases import Leases
from workers.redis_retry import UNREACHABLE, retrying_async
from workers.settings import FleetSettings
from workers.task_state import TaskState

T = TypeVar("T")
log = logging.getLogger(__name__)
SETTLE_RETRY_S = 30.0
CURRENT_RUN: ContextVar[str | None] = ContextVar("CURRENT_RUN", default=None)


class StageTimeout(Exception):
    pass


class WorkerRuntime:
    def __init__(self, settings: FleetSettings) -> None:
        self.settings = settings
        self.pid = os.getpid()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="judges", daemon=True)
        self.thread.start()
        self.redis = redis.Redis.from_url(settings.redis_url, socket_timeout=10)
        self.state = TaskState(self.redis)
        self.leases = Leases(redis.Redis.from_url(settings.redis_url, socket_timeout=10))
        self._async_redis: redis.asyncio.Redis | None = None
        self._judges: dict[str, Judge] = {}
        self._lock = threading.Lock()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float, run: str | None = None) -> T:
        """Run ``coro`` on the judges' loop and wait for it, at most ``timeout`` seconds;
        ``run``: the labeling its provider calls are for (their :class:`StopGate` asks
        whether it stopped)."""
        future = asyncio.run_coroutine_threadsafe(_for_run(run, coro), self.loop)
        try:
            return future.result(timeout)
        except FutureTimeout:
            future.cancel()
            raise StageTimeout(f"took longer than {timeout:g} s") from None

    def judge(self, name: str, options: JudgeOptions, limits: RateLimits | None) -> Judge:
        """The judge for these settings, built once per process."""
        key = "|".join(
            [name, options.model_dump_json(), limits.model_dump_json() if limits else ""]
        )
        with self._lock:
            found = self._judges.get(key)
            if found is None:
                found = self.run(self._build(name, options, limits), timeout=600)
                self._judges[key] = found
        return found

    async def _build(self, name: str, options: JudgeOptions, limits: RateLimits | None) -> Judge:
        judge = make_judge(name, options)
        judge.preflight()
        if isinstance(judge, LLMJudge):
            # a 429 goes back to the queue with its Retry-After instead of waiting here
            judge.retry = dataclasses.replace(judge.retry, reschedule_rate_limits=True)
            # a worker cannot read the run's store; a shared cache folder it can
            judge.replies = folder_cache_from_env()
            if judge.replies is not None:
                # a resample stage's answered calls are kept as they come, so that a
                # rescheduled stage asks only the others again
                judge.keep_now = _keeper(judge.replies)
            # a flex call may wait 15 minutes: it must end well inside the stage's time
            # limit, which has room for a re-ask and a retry
            backend = judge.backend
            limit = self.settings.task_time_limit_s / 3
            if isinstance(backend, OpenAIBackend) and backend.service_tier == "flex":
                backend.timeout = min(backend.timeout, limit)
            patient = None
            if limits is not None and limits.active:
                limiter = RedisRateLimiter(self._async_client(), limiter_key(name), limits)
                patient = PatientLimiter(limiter, self.settings.task_time_limit_s / 2)
            judge.limiter = StopGate(self._async_client(), patient)
        return judge

    def _async_client(self) -> redis.asyncio.Redis:
        """The judges' loop's Redis client (made on that loop, used only there)."""
        if self._async_redis is None:
            self._async_redis = redis.asyncio.Redis.from_url(self.settings.redis_url)
        return self._async_redis


async def _for_run(run: str | None, coro: Coroutine[Any, Any, T]) -> T:
    """``coro`` with ``CURRENT_RUN`` set to ``run`` (in this task's context only)."""
    CURRENT_RUN.set(run)
    return await coro


class StopGate:
    """Before every provider call a worker's LLM judge makes (a first try, a retry, a
    re-ask): the call is not made once its labeling stopped (its driver stopped on a
    rejected key or an interrupt, or a worker's call met the rejected key), and the stage
    goes back to its driver instead, as ``Reschedule`` that the task turns into a give-back.
    The labeling's rate limit, if any, is waited for first: a stage that waited its turn
    while the labeling stopped does not call either."""

    def __init__(self, client: redis.asyncio.Redis, limiter: PatientLimiter | None) -> None:
        self.client = client
        self.limiter = limiter

    async def acquire(self, tokens: int) -> None:
        if self.limiter is not None:
            await self.limiter.acquire(tokens)
        run = CURRENT_RUN.get()
        if run is None:
            return
        key = keys.stop(run)
        reason = await retrying_async(lambda: self.client.get(key), "reading the labeling's stop")
        if reason is not None:
            text = reason.decode() if isinstance(reason, bytes) else str(reason)
            raise Reschedule(0.0, reason=f"the labeling stopped ({text})")

    async def settle(self, estimated: int, actual: int) -> None:
        if self.limiter is not None:
            await self.limiter.settle(estimated, actual)


class PatientLimiter:
    """The fleet's rate limiter for a worker. A stage that would wait longer than
    ``max_wait_s`` for its turn goes back to the queue for that long instead (like a
    429), freeing the worker slot and keeping the wait out of the stage's time limit.
    A Redis restart is waited out instead of failing the stage, and the bookkeeping
    after a call (settling its real token count) never turns a paid reply into a
    failure."""

    def __init__(self, limiter: RedisRateLimiter, max_wait_s: float) -> None:
        self.limiter = limiter
        self.max_wait_s = max_wait_s

    async def acquire(self, tokens: int) -> None:
        what = f"taking a request from the rate limit {self.limiter.key}"
        waited = 0.0
        while (wait := await retrying_async(lambda: self.limiter.try_acquire(tokens), what)) > 0:
            if waited + wait > self.max_wait_s:
                raise Reschedule(wait, reason=f"fleet rate limit {self.limiter.key}: "
                                              f"next request in {wait:.1f} s")  # fmt: skip
            pause = jittered(wait)
            await asyncio.sleep(pause)
            waited += pause

    async def settle(self, estimated: int, actual: int) -> None:
        what = f"settling tokens with the rate limit {self.limiter.key}"
        try:
            await retrying_async(
                lambda: self.limiter.settle(estimated, actual), what, SETTLE_RETRY_S
            )
        except UNREACHABLE as exc:
            log.warning("%s: gave up (%s); the estimate stands", what, exc)


_runtime: WorkerRuntime | None = None
_runtime_lock = threading.Lock()


def runtime(settings: FleetSettings) -> WorkerRuntime:
    """This process's runtime (a forked child makes its own)."""
    global _runtime
    with _runtime_lock:
        if _runtime is None or _runtime.pid != os.getpid():
            _runtime = WorkerRuntime(settings)
        return _runtime


def _keeper(cache: FolderCache) -> Callable[[list[KeptReply]], None]:
    def keep(kept: list[KeptReply]) -> None:
        for reply in kept:
            cache.put(reply)

    return keep
