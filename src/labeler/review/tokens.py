"""Tokens as a reviewer reads them, in the terminal and on the page.

A run keeps each token as its tokenizer decodes it alone, or (runs imported from the
paper's feature JSON) as the tokenizer's own piece. Neither always reads well:

- special tokens: ``<｜begin▁of▁sentence｜>`` is shown ``‹bos›``, ``<|im_start|>``
  ``‹im_start›``, ``<think>`` ``‹think›``;
- byte-level pieces (GPT-2's byte-to-unicode alphabet: ``Ġ`` a space, ``Ċ`` a newline)
  are turned back into their text;
- a byte that is not text on its own (one byte of a multi-byte character, which decodes
  to ``�``) is shown ``<0xE2>``: from the piece itself, or, where the decoded token
  kept only ``�``, from the tokenizer's ``tokenizer.json`` next to the run's adapter
  (:class:`Pieces`) when it is at hand;
- a newline is shown ``⏎``, a tab ``⇥``, other control characters ``<0x1F>``, invisible
  format characters ``<U+200B>``;
- fullwidth forms of ASCII (U+FF01 to U+FF5E: DeepSeek's ``｜`` in ``<｜`` is U+FF5C) are
  shown as ASCII: a browser without CJK fonts draws them as empty boxes. The page shows
  the token as stored on hover.
"""

from __future__ import annotations

import json
import logging
import re
import unicodedata
from collections.abc import Sequence
from functools import cache
from pathlib import Path

log = logging.getLogger(__name__)

REPLACEMENT = "\ufffd"
_FULLWIDTH = range(0xFF01, 0xFF5F)  # FULLWIDTH EXCLAMATION MARK to FULLWIDTH TILDE
_FULLWIDTH_SHIFT = 0xFF01 - ord("!")
_ALIASES = {
    "begin_of_sentence": "bos", "begin_of_text": "bos", "startoftext": "bos", "s": "bos",
    "end_of_sentence": "eos", "end_of_text": "eos", "endoftext": "eos", "/s": "eos",
}  # fmt: skip
_BARRED = re.compile(r"<[|｜]([^<>|｜]+)[|｜]>")
_TAGGED = re.compile(r"</?(?:s|unk|pad|bos|eos|mask|cls|sep|think)>", re.IGNORECASE)
_BRACKETED = re.compile(r"\[(?:CLS|SEP|PAD|UNK|MASK)\]")
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _byte_alphabet() -> dict[str, int]:
    """GPT-2's byte-to-unicode table, reversed: each of the 256 characters to its byte."""
    kept = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: b for b in kept}
    shifted = 0
    for b in range(256):
        if b not in table:
            table[b] = 256 + shifted
            shifted += 1
    return {chr(c): b for b, c in table.items()}


CHAR_TO_BYTE = _byte_alphabet()
# A space, a newline and a tab in that alphabet (Ġ Ċ ĉ): in nearly every byte-level list
# of tokens, and next to never in text.
_WHITESPACE = frozenset(c for c, b in CHAR_TO_BYTE.items() if b in b" \n\t")


def special_name(token: str) -> str | None:
    """The short name of a special token (``bos`` for ``<｜begin▁of▁sentence｜>``), or None."""
    if match := _BARRED.fullmatch(token):
        name = match.group(1).strip("▁ ").replace("▁", "_").replace(" ", "_")
        return _ALIASES.get(name.lower(), name)
    if _TAGGED.fullmatch(token) or _BRACKETED.fullmatch(token):
        name = token.strip("<>[]").lower()
        return _ALIASES.get(name, name)
    return None


def bytes_text(data: bytes) -> str:
    """UTF-8 text, each byte that is not part of a whole character shown ``<0xE2>``."""
    out: list[str] = []
    while data:
        try:
            out.append(data.decode("utf-8"))
            break
        except UnicodeDecodeError as exc:
            out.append(data[: exc.start].decode("utf-8"))
            out.extend(f"<0x{b:02X}>" for b in data[exc.start : exc.end])
            data = data[exc.end :]
    return "".join(out)


def piece_bytes(piece: str) -> bytes | None:
    """The bytes a tokenizer piece stands for: ``<0xE2>`` (SentencePiece's byte fallback)
    or a byte-level piece (``Ġthe``); None for a piece that is neither."""
    if match := _BYTE_PIECE.fullmatch(piece):
        return bytes([int(match.group(1), 16)])
    if piece and all(c in CHAR_TO_BYTE for c in piece):
        return bytes(CHAR_TO_BYTE[c] for c in piece)
    return None


def is_byte_level(tokens: Sequence[str]) -> bool:
    """Whether a list of tokens (an example's window, a logit lens) is written in the
    byte-level alphabet rather than as text: every token other than special ones is made
    of its characters, and some token has its space, newline or tab (``Ġ`` ``Ċ`` ``ĉ``;
    decoded text has real ones, which are not in that alphabet)."""
    ordinary = [t for t in tokens if special_name(t) is None]
    return (
        any(c in _WHITESPACE for t in ordinary for c in t)
        and all(c in CHAR_TO_BYTE for t in ordinary for c in t)
    )  # fmt: skip


def _visible(text: str) -> str:
    out = []
    for c in text:
        if c == "\n":
            out.append("⏎")
        elif c == "\t":
            out.append("⇥")
        elif unicodedata.category(c) == "Cc":
            out.append(f"<0x{ord(c):02X}>" if ord(c) < 0x80 else f"<U+{ord(c):04X}>")
        elif unicodedata.category(c) in ("Cf", "Cs", "Co", "Cn"):
            out.append(f"<U+{ord(c):04X}>")
        elif ord(c) in _FULLWIDTH:
            out.append(chr(ord(c) - _FULLWIDTH_SHIFT))
        else:
            out.append(c)
    return "".join(out)


def shown_token(token: str, byte_level: bool = False, piece: str | None = None) -> str:
    """How one token is shown: ``byte_level`` when it is a byte-level piece (see
    :func:`is_byte_level`), ``piece`` the tokenizer's piece for it when known."""
    name = special_name(token)
    if name is not None:
        return f"‹{name}›"
    source = token if byte_level else piece if REPLACEMENT in token else None
    data = piece_bytes(source) if source is not None else None
    return _visible(bytes_text(data) if data is not None else token)


def shown_tokens(tokens: Sequence[str], pieces: Sequence[str | None] | None = None) -> list[str]:
    """A list of tokens as shown, read as one (byte-level or text, see :func:`is_byte_level`);
    ``pieces``, where given, the tokenizer's piece of each."""
    byte_level = is_byte_level(tokens)
    return [
        shown_token(t, byte_level, pieces[i] if pieces is not None and i < len(pieces) else None)
        for i, t in enumerate(tokens)
    ]


class Pieces:
    """Token ids to the tokenizer's pieces, read from a ``tokenizer.json`` (Hugging Face's
    format, read as JSON: no tokenizer library needed); empty when there is none."""

    def __init__(self, pieces: dict[int, str]) -> None:
        self._pieces = pieces

    def __bool__(self) -> bool:
        return bool(self._pieces)

    def get(self, token_id: int) -> str | None:
        return self._pieces.get(token_id)

    def of(self, token_ids: Sequence[int]) -> list[str | None]:
        return [self._pieces.get(i) for i in token_ids]

    @classmethod
    def near(cls, adapter_path: str) -> Pieces:
        """The pieces of the tokenizer saved with the adapter at ``adapter_path`` (a local
        folder); empty when it is elsewhere (a hub id, another machine) or unreadable."""
        if not adapter_path.strip():
            return cls({})
        return _read_pieces(str(Path(adapter_path).expanduser() / "tokenizer.json"))


@cache
def _read_pieces(path: str) -> Pieces:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
        model = data.get("model") or {}
        vocab = model.get("vocab")
        pieces: dict[int, str] = {}
        if isinstance(vocab, dict):  # BPE, WordPiece: piece -> id
            pieces = {int(i): str(p) for p, i in vocab.items()}
        elif isinstance(vocab, list):  # Unigram: [piece, score] in id order
            pieces = {i: str(entry[0]) for i, entry in enumerate(vocab)}
        for added in data.get("added_tokens") or []:
            pieces[int(added["id"])] = str(added["content"])
    except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
        log.debug("no token pieces from %s: %s", path, exc)
        return Pieces({})
    return Pieces(pieces)
