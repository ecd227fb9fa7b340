"""One provider request as data, and the replies kept of such requests.

A chat backend turns a prompt into an :class:`ApiRequest` (provider, model, endpoint
and the JSON body it posts), sends it, and reads the provider's JSON reply back into a
validated answer. Keeping the request as data is what lets every transport share the
backend: the in-process and fleet transports post it at once, the batch transport puts
the same body in a provider batch, and the reply cache answers it from an earlier
reply.

A request's :attr:`ApiRequest.key` addresses its content: two requests with the same
provider, model, endpoint and body are the same request, whichever run, feature or
judge asked it.
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict

from adapters.outputs import replacing
from labeler.run.schemas import Usage

CACHE_DIR_ENV = "LABELER_CACHE_DIR"
CACHE_FORMAT = 1


@dataclass(frozen=True)
class ApiRequest:
    provider: str
    model: str
    endpoint: str
    """The provider's path, as batch files name it: '/v1/chat/completions',
    '/v1/responses', '/v1/messages'."""
    body: dict[str, Any] = field(hash=False, compare=False)
    origin: str = ""
    """Where it goes (the API's base URL): a self-hosted server with a model of the same
    name as the provider's is another source of replies."""

    @cached_property
    def key(self) -> str:
        """The request's content address (hex SHA-256 of its canonical JSON)."""
        canonical = json.dumps(
            [CACHE_FORMAT, self.provider, self.origin, self.model, self.endpoint, self.body],
            sort_keys=True, separators=(",", ":"), ensure_ascii=False,
        )  # fmt: skip
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


class KeptReply(BaseModel):
    """A reply the judge accepted, to be kept by whoever stores the stage's outcome
    (the engine puts it in the run's store and the shared cache folder)."""

    model_config = ConfigDict(extra="forbid")

    key: str
    provider: str
    model: str
    endpoint: str
    reply: dict[str, Any]


class AwaitingReply(Exception):
    """Raised, in the batch transport, by a request whose reply is not in yet: the stage
    runs again once the batch holding ``custom_id`` has ended."""

    def __init__(self, request: ApiRequest, custom_id: str) -> None:
        super().__init__(custom_id)
        self.request = request
        self.custom_id = custom_id
        self.usage: dict[str, Usage] = {}
        """What the stage's replies in so far used (an invalid reply before a re-ask)."""
        self.cost_usd: float | None = 0.0


class BatchReplies(Protocol):
    """Where a judge in the batch transport finds its replies."""

    def reply(self, request: ApiRequest, ask: int) -> dict[str, Any]:
        """The reply to the ``ask``-th asking (0, then 1 for a re-ask) of ``request``;
        raises ``AwaitingReply`` until it is in, or the backend error it ended with."""
        ...


class ReplyCache(Protocol):
    """Replies that a judge accepted, by request key; a hit is answered at no cost."""

    def get(self, key: str) -> dict[str, Any] | None: ...


def pack(reply: dict[str, Any]) -> bytes:
    return zlib.compress(json.dumps(reply, separators=(",", ":")).encode("utf-8"), 6)


def unpack(blob: bytes) -> dict[str, Any] | None:
    """The reply, or None if the blob is damaged (a damaged entry is a miss)."""
    try:
        value = json.loads(zlib.decompress(blob))
    except (zlib.error, ValueError):
        return None
    return value if isinstance(value, dict) else None


class FolderCache:
    """Replies kept as files in a folder that several runs and machines may share
    (``$LABELER_CACHE_DIR``): one file per key under a two-character fan-out, written
    to a temporary name and renamed, so concurrent writers never expose half a file."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json.z"

    def get(self, key: str) -> dict[str, Any] | None:
        try:
            blob = self._path(key).read_bytes()
        except OSError:
            return None
        return unpack(blob)

    def put(self, kept: KeptReply) -> None:
        path = self._path(kept.key)
        if path.exists():
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        with replacing(path) as tmp:
            tmp.write_bytes(pack(kept.reply))


def folder_cache_from_env() -> FolderCache | None:
    where = os.environ.get(CACHE_DIR_ENV)
    return FolderCache(Path(where).expanduser()) if where else None


class Layered:
    """The first cache that has the key answers."""

    def __init__(self, caches: Sequence[ReplyCache]) -> None:
        self.caches = list(caches)

    def get(self, key: str) -> dict[str, Any] | None:
        for cache in self.caches:
            found = cache.get(key)
            if found is not None:
                return found
        return None
