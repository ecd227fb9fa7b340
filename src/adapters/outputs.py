"""Writing outputs: a full disk is one clear error naming what could not be written,
and a file written whole or not at all."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from adapters.errors import AdapterError

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


class NoRoomError(AdapterError):
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
    work) that replaces ``path`` when the block succeeds: the temporary file is synced
    first, so a crash right after leaves the old file or the new one, never an empty one.
    A full disk is a :class:`NoRoomError` naming ``path``; on any error the temporary
    file is removed and the old ``path`` is left as it was."""
    tmp = path.with_name(f".{path.stem}.partial-{os.getpid()}{path.suffix}")
    try:
        with writing(path, "the earlier file, if any, is kept as it was"):
            yield tmp
            _sync(tmp)
            tmp.replace(path)
        _sync_folder(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def _sync(path: Path) -> None:
    """Push ``path``'s data to the disk (where a full disk may only now show)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable; a filesystem that cannot sync a folder
    (some network ones) still has the file, so that is no error."""
    with suppress(OSError):
        _sync(folder)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``path`` whole or not at all."""
    with replacing(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
