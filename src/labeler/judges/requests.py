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

A kept reply is only as good as the file or row it was read from: a shared cache
folder may hold a file copied, swapped or cut short by hand, a full disk or a crash.
So an entry carries its request's identity and a checksum of its reply, and a read
that does not match the request asking is a miss, never another request's answer.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, field_validator

from adapters.outputs import replacing
from labeler.redaction import redact_json
from labeler.run.schemas import Usage

CACHE_DIR_ENV = "LABELER_CACHE_DIR"
CACHE_FORMAT = 1
"""Part of every request key: changing it would orphan every reply kept so far."""
ENTRY_FORMAT = 2
"""The layout of a cache folder's file (1, before it: the bare reply)."""
SNAPSHOT = re.compile(r"\d{4}(-?\d{2}-?\d{2})?")
"""A dated snapshot's suffix, as providers name the model that served an alias:
gpt-5-mini-2025-08-07, claude-haiku-4-5-20251001, gpt-4-0613."""

log = logging.getLogger(__name__)


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

    @field_validator("reply")
    @classmethod
    def _without_keys(cls, reply: dict[str, Any]) -> dict[str, Any]:
        """Redacted here, once, so that every place that keeps the reply (the run's
        store, the cache folder, the fleet's queue) keeps it without a key in it."""
        cleaned: dict[str, Any] = redact_json(reply)
        return cleaned


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
        self.others: list[AwaitingReply] = []
        """Other requests of the same stage not answered yet (its calls made at once):
        sent in the same round."""


class BatchReplies(Protocol):
    """Where a judge in the batch transport finds its replies."""

    def reply(self, request: ApiRequest, ask: int) -> dict[str, Any]:
        """The reply to the ``ask``-th asking (0, then 1 for a re-ask) of ``request``;
        raises ``AwaitingReply`` until it is in, or the backend error it ended with."""
        ...


@runtime_checkable
class ReplyCache(Protocol):
    """Replies that a judge accepted; a hit is answered at no cost."""

    def lookup(self, request: ApiRequest) -> dict[str, Any] | None:
        """The reply kept for ``request``, or None; never another request's reply."""
        ...


class KeyedReplies(Protocol):
    """Replies by request key alone (the run's label store)."""

    def get(self, key: str) -> dict[str, Any] | None: ...


def served_by(model: str, reply: dict[str, Any]) -> bool:
    """Whether ``reply`` comes from the ``model`` asked for, as far as the reply says:
    the same name, that name's dated snapshot, or no name at all. A server that answers
    with whatever model it has loaded names that one, and its reply is no answer to a
    request for another model."""
    served = reply.get("model")
    if not isinstance(served, str) or not served:
        return True
    asked, named = _undecorated(model), _undecorated(served)
    if named == asked:
        return True
    base = asked.removesuffix("-latest")
    return named.startswith(f"{base}-") and SNAPSHOT.fullmatch(named[len(base) + 1 :]) is not None


def _undecorated(model: str) -> str:
    return model.strip().lower().removesuffix(":latest")


def pack(reply: dict[str, Any]) -> bytes:
    return zlib.compress(json.dumps(reply, separators=(",", ":")).encode("utf-8"), 6)


def unpack(blob: bytes) -> dict[str, Any] | None:
    """The reply, or None if the blob is damaged (a damaged entry is a miss)."""
    try:
        value = json.loads(zlib.decompress(blob))
    except (zlib.error, ValueError):
        return None
    return value if isinstance(value, dict) else None


def reply_digest(reply: dict[str, Any]) -> str:
    """Hex SHA-256 of the reply's canonical JSON: what a cache entry's checksum is."""
    canonical = json.dumps(reply, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Identity:
    """What a cache entry must say about the request it answers."""

    key: str
    provider: str
    model: str
    endpoint: str

    @classmethod
    def of(cls, item: ApiRequest | KeptReply) -> Identity:
        return cls(item.key, item.provider, item.model, item.endpoint)


def pack_entry(kept: KeptReply) -> bytes:
    """A cache folder's file: the reply with its request's identity and checksum."""
    return pack(
        {
            "format": ENTRY_FORMAT,
            "key": kept.key,
            "provider": kept.provider,
            "model": kept.model,
            "endpoint": kept.endpoint,
            "sha256": reply_digest(kept.reply),
            "reply": kept.reply,
        }
    )


def read_entry(blob: bytes, wanted: Identity) -> tuple[dict[str, Any] | None, str | None]:
    """The reply in a cache file if it answers ``wanted``, and else what is wrong with
    the file (None for a file of the earlier layout, which cannot tell what it
    answers: a miss, rewritten when the reply is next kept)."""
    entry = unpack(blob)
    if entry is None:
        return None, "is damaged (it does not decompress to a JSON object)"
    if "format" not in entry:
        return None, None
    reply = entry.get("reply")
    if entry.get("format") != ENTRY_FORMAT or not isinstance(reply, dict):
        return None, f"has an unknown layout (format {entry.get('format')!r})"
    found = Identity(*(str(entry.get(f)) for f in ("key", "provider", "model", "endpoint")))
    if found != wanted:
        return None, (
            f"holds the reply to another request ({found.provider} {found.model} "
            f"{found.endpoint}, key {found.key[:12]})"
        )
    if entry.get("sha256") != reply_digest(reply):
        return None, "is damaged (its reply does not match its checksum)"
    if not served_by(wanted.model, reply):
        return None, f"holds a reply of model {reply.get('model')!r}, not {wanted.model!r}"
    return reply, None


class FolderCache:
    """Replies kept as files in a folder that several runs and machines may share
    (``$LABELER_CACHE_DIR``): one file per key under a two-character fan-out, written
    to a temporary name and renamed, so concurrent writers never expose half a file.

    Every read is checked against the request asking (see :func:`read_entry`); a file
    that fails is a miss, warned about once, and replaced when its reply is kept again
    (a sound file is left as it is)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._warned: set[Path] = set()

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json.z"

    def lookup(self, request: ApiRequest) -> dict[str, Any] | None:
        path = self._path(request.key)
        try:
            blob = path.read_bytes()
        except OSError:
            return None
        reply, problem = read_entry(blob, Identity.of(request))
        if problem is not None and path not in self._warned:
            self._warned.add(path)
            log.warning("reply cache: %s %s; the request is sent again and the file "
                        "replaced by its reply", path, problem)  # fmt: skip
        return reply

    def put(self, kept: KeptReply) -> None:
        path = self._path(kept.key)
        try:
            blob: bytes | None = path.read_bytes()
        except OSError:  # none yet, or unreadable: written anew
            blob = None
        if blob is not None and read_entry(blob, Identity.of(kept))[0] is not None:
            return  # kept already, and sound
        path.parent.mkdir(parents=True, exist_ok=True)
        with replacing(path) as tmp:
            tmp.write_bytes(pack_entry(kept))


def folder_cache_from_env() -> FolderCache | None:
    where = os.environ.get(CACHE_DIR_ENV)
    return FolderCache(Path(where).expanduser()) if where else None


Finder = Callable[[ApiRequest], "dict[str, Any] | None"]


class Layered:
    """The first cache that has the request's reply answers. A cache that knows replies
    by key alone (the run's store) cannot tell which request a reply answered; its
    reply must at least name the model asked for."""

    def __init__(self, caches: Sequence[ReplyCache | KeyedReplies]) -> None:
        self.caches = list(caches)
        # the protocol check is made once here, not on every lookup
        self._finders = [_finder(c) for c in self.caches]

    def lookup(self, request: ApiRequest) -> dict[str, Any] | None:
        for find in self._finders:
            found = find(request)
            if found is not None:
                return found
        return None


def _finder(cache: ReplyCache | KeyedReplies) -> Finder:
    if isinstance(cache, ReplyCache):
        return cache.lookup
    get = cache.get

    def by_key(request: ApiRequest) -> dict[str, Any] | None:
        found = get(request.key)
        return found if found is not None and served_by(request.model, found) else None

    return by_key
