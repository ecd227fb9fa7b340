"""The reviewer's keys in the terminal review.

In a terminal each key counts as it is pressed, without Enter (the terminal is put in
cbreak mode for the review and restored after it, and for each line of free text).
When standard input is not a terminal (a script pipes the keys), each line is one key
or one answer, so ``printf 'l\\nq\\n' | labeler review ...`` works as before.

Keys come back as one lowercase character, or as one of the names below; a lone Ctrl-D,
or the end of the input, raises EOFError.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from types import TracebackType
from typing import Any, Protocol, TextIO

ENTER, ESCAPE, LEFT, RIGHT, UP, DOWN, BACKSPACE = (
    "enter", "escape", "left", "right", "up", "down", "backspace",
)  # fmt: skip
_NAMED = {
    "\r": ENTER, "\n": ENTER, "\x1b": ESCAPE, "\x7f": BACKSPACE, "\x08": BACKSPACE,
    "\x1b[D": LEFT, "\x1bOD": LEFT, "\x1b[C": RIGHT, "\x1bOC": RIGHT,
    "\x1b[A": UP, "\x1bOA": UP, "\x1b[B": DOWN, "\x1bOB": DOWN,
}  # fmt: skip
_CTRL_D = "\x04"


class Keys(Protocol):
    """Where the reviewer's input comes from."""

    live: bool  # each key counts as it is pressed (a terminal)

    def key(self) -> str:
        """The next key (see the module's docstring)."""
        ...

    def line(self, prompt: Callable[[], object]) -> str:
        """A line of free text, without its newline; ``prompt`` draws its prompt once the
        input is ready to take a line."""
        ...


def split_keys(text: str) -> list[str]:
    """Raw terminal input (one read, perhaps several keys) as keys: escape sequences
    (arrows) whole, every other character on its own."""
    keys: list[str] = []
    i = 0
    while i < len(text):
        if text[i] == "\x1b" and text[i + 1 : i + 2] in ("[", "O"):
            end = i + 2
            while end < len(text) and not (text[end].isalpha() or text[end] == "~"):
                end += 1
            sequence = text[i : end + 1]
            keys.append(_NAMED.get(sequence, sequence))
            i = end + 1
            continue
        char = text[i]
        keys.append(_NAMED.get(char, char.lower()))
        i += 1
    return keys


class LineKeys:
    """Keys from a stream that is not a terminal: one key, or one answer, a line (an
    empty line is Enter)."""

    live = False

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def key(self) -> str:
        text = self._read().strip()
        return ENTER if not text else _NAMED.get(text, text.lower())

    def line(self, prompt: Callable[[], object]) -> str:
        prompt()
        return self._read()

    def _read(self) -> str:
        line = self.stream.readline()
        if not line:
            raise EOFError
        return line.rstrip("\r\n")


class TerminalKeys:
    """Single keys from a terminal; use it as a context manager (cbreak mode inside)."""

    live = True

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._pending: list[str] = []
        self._saved: list[Any] | None = None

    def __enter__(self) -> TerminalKeys:
        import termios
        import tty

        self._saved = termios.tcgetattr(self.fd)
        tty.setcbreak(self.fd, termios.TCSANOW)
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._restore()

    def _restore(self) -> None:
        import termios

        if self._saved is not None:
            termios.tcsetattr(self.fd, termios.TCSANOW, self._saved)

    def key(self) -> str:
        while not self._pending:
            data = os.read(self.fd, 64)
            if not data:
                raise EOFError
            self._pending = split_keys(data.decode("utf-8", errors="replace"))
        key = self._pending.pop(0)
        if key == _CTRL_D:
            raise EOFError
        return key

    def line(self, prompt: Callable[[], object]) -> str:
        """A line typed with the terminal's own editing and echo (cooked mode, set before
        the prompt is drawn, so that nothing typed after it is taken as keys)."""
        import termios
        import tty

        self._pending.clear()
        self._restore()
        try:
            prompt()
            chunks: list[bytes] = []
            while True:
                data = os.read(self.fd, 4096)
                if not data:
                    if not chunks:
                        raise EOFError
                    break
                chunks.append(data)
                if data.endswith(b"\n"):
                    break
        finally:
            tty.setcbreak(self.fd, termios.TCSANOW)
        return b"".join(chunks).decode("utf-8", errors="replace").rstrip("\r\n")


def keys_from(stdin: TextIO) -> TerminalKeys | LineKeys:
    """Single keys when ``stdin`` is a terminal, else one key a line."""
    try:
        if stdin.isatty():
            return TerminalKeys(stdin.fileno())
    except (AttributeError, ValueError, OSError):
        pass
    return LineKeys(stdin)
