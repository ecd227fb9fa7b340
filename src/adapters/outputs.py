"""Writing outputs: a full disk is one clear error naming what could not be written,
and a file written whole or not at all."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from adapters.errors import UserError

# errno values that mean "no room to write": a full disk, a quota, a file size limit.
NO_ROOM = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
_NO_ROOM_TEXT = ("no space left on device", "file too large", "disk quota exceeded")


def is_no_room(exc: BaseException | None) -> bool:
    """Whether ``exc``, or an error it was raised from, says there was no room to write
    (libraries such as polars report the OS error only in their message)."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in NO_ROOM:
            return True
        if any(text in str(exc).lower() for text in _NO_ROOM_TEXT):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


class NoRoomError(UserError):
    """An output that could not be written for lack of disk space."""


@contextmanager
def writing(
    path: Path, kept: str = "nothing half-written is left as if complete"
) -> Iterator[None]:
    """Turn a full disk inside the block into a :class:`NoRoomError` naming ``path``;
    ``kept`` says what of the work survives."""
    try:
        yield
    except NoRoomError:
        raise
    except Exception as exc:
        if not is_no_room(exc):
            raise
        raise NoRoomError(
            f"{path}: no space left to write it; free some disk space and run the command "
            f"again ({kept})"
        ) from exc


@contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` (same suffix, so writers that go by it still
    work) that replaces ``path`` when the block succeeds; a full disk is a
    :class:`NoRoomError` naming ``path``, and nothing is left behind."""
    tmp = path.with_name(f".{path.stem}.partial-{os.getpid()}{path.suffix}")
    try:
        with writing(path):
            yield tmp
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``path`` whole or not at all."""
    with replacing(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
