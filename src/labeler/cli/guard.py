"""The CLI's last line of defence: every exception that reaches the top becomes one
line on stderr and a non-zero exit. Errors the user can act on (``USER_ERRORS``) say
what is wrong with which file; a full disk names the file it could not write; a corrupt
SQLite store names the store; anything else is reported as unexpected, with a hint to
rerun with ``-v``, which shows the traceback."""

from __future__ import annotations

import sqlite3
import sys
import traceback

from adapters.outputs import is_no_room
from labeler.errors import OPENED_STORES, USER_ERRORS

EXIT_USER = 2  # bad input or state the user can fix
EXIT_UNEXPECTED = 1  # a bug, or an environment this tool does not know about

# SQLite reports a failed write as one of these; it does not say which file.
_SQLITE_NO_ROOM = ("database or disk is full", "disk i/o error")
_SQLITE_CORRUPT = ("malformed", "not a database", "file is encrypted")


def _stores() -> str:
    return ", ".join(str(p) for p in OPENED_STORES) or "the label store"


def _where(exc: BaseException) -> str | None:
    """The file an OSError (or one it was raised from) is about."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.filename:
            return str(exc.filename)
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return None


def describe(exc: BaseException) -> tuple[str, int]:
    """The one line to print for ``exc`` and the exit code."""
    if isinstance(exc, USER_ERRORS):
        return str(exc), EXIT_USER
    if isinstance(exc, sqlite3.DatabaseError):
        text = str(exc).lower()
        if any(s in text for s in _SQLITE_NO_ROOM):
            return (f"{_stores()}: could not write ({exc}); free some disk space and run "
                    "the command again (what was stored before is kept)", EXIT_USER)  # fmt: skip
        if any(s in text for s in _SQLITE_CORRUPT):
            return (f"{_stores()}: the SQLite file is damaged ({exc}); restore it from a "
                    "copy, or move it away and label again", EXIT_USER)  # fmt: skip
    if is_no_room(exc):
        where = _where(exc) or "the output"
        return (f"{where}: no space left to write; free some disk space and run the command "
                "again (nothing half-written is kept)", EXIT_USER)  # fmt: skip
    if isinstance(exc, OSError) and exc.filename:
        return f"{exc.filename}: {exc.strerror or exc}", EXIT_USER
    if isinstance(exc, MemoryError):
        return "out of memory; see the command's --help for options that bound memory", 1
    name = type(exc).__name__
    first = next(iter(str(exc).strip().splitlines()), "")[:300]
    return (f"unexpected {name}: {first}; rerun with -v (labeler -v COMMAND ...) to see the "
            "traceback, and please report it", EXIT_UNEXPECTED)  # fmt: skip


def report(exc: BaseException, verbose: bool) -> int:
    """Print ``exc`` as one line (with ``verbose``, the traceback first, for anything not
    one of ``USER_ERRORS``); returns the exit code."""
    from labeler.cli.app import err_console
    from labeler.redaction import redact

    line, code = describe(exc)
    if verbose and not isinstance(exc, USER_ERRORS):
        sys.stderr.write(redact("".join(traceback.format_exception(exc))))
    err_console.print("[bold red]error:[/bold red] ", end="", highlight=False)
    err_console.print(redact(line), markup=False, highlight=False)
    return code
