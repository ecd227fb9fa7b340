"""A small pool of SDK clients for one event loop.

An async HTTP client's connection pool costs time per request that grows with the
number of open connections, so past a few dozen requests in flight one client becomes
the bottleneck on a small CPU. The pool hands each request the least busy client and
opens another when all have ``per_client`` requests in flight. Clients belong to the
event loop that made them; a new loop (a new labeling, a Celery task) gets new ones.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, Generic, TypeVar

C = TypeVar("C")

PER_CLIENT = 16


class ClientPool(Generic[C]):
    def __init__(self, make: Callable[[], C], per_client: int = PER_CLIENT) -> None:
        self._make = make
        self._per_client = per_client
        self._loop: asyncio.AbstractEventLoop | None = None
        self._clients: list[C] = []
        self._busy: list[int] = []

    @asynccontextmanager
    async def client(self) -> AsyncIterator[C]:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._loop, self._clients, self._busy = loop, [], []
        if not self._clients or min(self._busy) >= self._per_client:
            self._clients.append(self._make())
            self._busy.append(0)
        i = min(range(len(self._busy)), key=self._busy.__getitem__)
        self._busy[i] += 1
        try:
            yield self._clients[i]
        finally:
            self._busy[i] -= 1

    async def aclose(self) -> None:
        clients, self._clients, self._busy, self._loop = self._clients, [], [], None
        for client in clients:
            close: Any = getattr(client, "close", None)
            if close is not None:
                await close()
