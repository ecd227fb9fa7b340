"""Checking, before the model loads, that the tokenizer fits the corpus and the chat format.

A tokenizer that encodes and decodes without complaint can still be the wrong one: one
rebuilt by a transformers class that ignores the saved ``tokenizer.json`` garbles every
text ("Write a function that adds 9" came back as "a f a a 9"), and the features of a run
collected through it describe garbage. So ``collect`` loads the tokenizer alone (it is
cheap) and checks, before the model loads:

0. the chat format (:func:`choose_chat_format`): ``auto`` picks it from the corpus (texts
   already laid out in one) or from the tokenizer (the format whose special tokens it has
   as single tokens; where it has both, the one its chat template uses), and says why;
   a format asked for by name is checked in 2;
1. the corpus's layout (:func:`collectors.corpus.check_layouts`): errors name the file
   and the line;
2. that the special tokens of the chat format (``<｜end▁of▁sentence｜>`` too where a
   deepseek conversation has several exchanges), and ``<think>``, ``</think>`` where the
   corpus uses them, are each one token that decodes back to itself; a refusal says
   which chat format's tokens the tokenizer has instead;
3. that the tokenizer gives the text back: on an evenly spaced sample of ``SAMPLE_TRACES``
   traces, every piece tokenized as text (its first ``PIECE_CHARS`` characters) must come
   back from ``decode(encode(piece))`` equal after NFKC normalisation and whitespace
   collapsing; more than ``TOLERATED_SHARE`` of the pieces differing (at least one) fails.

A failure is a :class:`~collectors.errors.CollectError` naming the tokenizer's class and
folder, a sample of what went wrong, and how to load the right tokenizer.
"""

from __future__ import annotations

import logging
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from collectors.corpus import (
    CHAT_LAYOUTS,
    Trace,
    is_preformatted,
    layout_summary,
    segments,
)
from collectors.errors import CollectError
from collectors.run_format import CHAT_FORMATS, MARKER_REGIONS

log = logging.getLogger(__name__)

SAMPLE_TRACES = 64
PIECE_CHARS = 2000
TOLERATED_SHARE = 0.02
_EXCERPT = 40  # characters shown on each side of the first difference
HOW_TO_FIX = "load the model's own tokenizer with --tokenizer PATH_OR_ID (a folder or hub id)"
AUTO = "auto"
# What marks each format in a chat template (Qwen's writes '<|im_start|>' + role).
TEMPLATE_MARKS = {"deepseek": "<｜User｜>", "qwen": "<|im_start|>"}


@dataclass(frozen=True)
class ChatFormatChoice:
    """The chat format a collection lays its corpus out in, and why (for the user)."""

    name: str
    reason: str


@dataclass(frozen=True)
class Mismatch:
    """A sampled piece that did not come back from decode(encode(piece))."""

    line: int
    text: str
    decoded: str

    def excerpt(self) -> tuple[str, str]:
        """The two normalised texts around their first difference."""
        a, b = normalise(self.text), normalise(self.decoded)
        at = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None)
        at = min(len(a), len(b)) if at is None else at
        start = max(0, at - _EXCERPT)
        return a[start : at + _EXCERPT], b[start : at + _EXCERPT]


def normalise(text: str) -> str:
    """NFKC, and every run of whitespace one space, none at the ends."""
    return " ".join(unicodedata.normalize("NFKC", text).split())


def describe(tokenizer: Any) -> str:
    """``FOLDER: the tokenizer (CLASS)``, the start of every message about it."""
    folder = str(getattr(tokenizer, "name_or_path", "") or "") or "the tokenizer"
    return f"{folder}: the tokenizer ({type(tokenizer).__name__})"


def _sample(traces: Sequence[Trace], n: int) -> list[Trace]:
    picks = np.unique(np.linspace(0, len(traces) - 1, min(n, len(traces))).astype(int))
    return [traces[int(i)] for i in picks]


def round_trip_mismatches(
    tokenizer: Any, traces: Sequence[Trace], chat_format: str
) -> tuple[int, list[Mismatch]]:
    """The number of sampled text pieces checked, and those that did not come back."""
    checked = 0
    mismatches: list[Mismatch] = []
    for trace in _sample(traces, SAMPLE_TRACES):
        pieces, _ = segments(trace, chat_format=chat_format)
        for text, region in pieces:
            if not text or region in MARKER_REGIONS:
                continue
            piece = text[:PIECE_CHARS]
            ids = tokenizer.encode(piece, add_special_tokens=False)
            decoded = tokenizer.decode(
                ids, skip_special_tokens=False, clean_up_tokenization_spaces=False
            )
            checked += 1
            if normalise(decoded) != normalise(piece):
                mismatches.append(Mismatch(trace.line, piece, decoded))
    return checked, mismatches


def _lacking(tokenizer: Any, specials: Sequence[str]) -> list[str]:
    """What is wrong with each special string that is not one token decoding to itself."""
    lacking = []
    for special in specials:
        ids = tokenizer.encode(special, add_special_tokens=False)
        if len(ids) != 1:
            lacking.append(f"'{special}' encodes as {len(ids)} tokens")
            continue
        decoded = tokenizer.decode(ids, skip_special_tokens=False)
        if decoded.strip() != special:
            lacking.append(f"'{special}' encodes as one token that decodes as {decoded!r}")
    return lacking


def formats_of(tokenizer: Any) -> dict[str, list[str]]:
    """For each chat format, what the tokenizer lacks of its special tokens (empty: it has
    them all as single tokens)."""
    return {name: _lacking(tokenizer, layout.specials) for name, layout in CHAT_LAYOUTS.items()}


def _quoted(specials: Sequence[str]) -> str:
    return ", ".join(f"'{special}'" for special in specials)


def _has(name: str) -> str:
    return f"the tokenizer has {_quoted(CHAT_LAYOUTS[name].specials)} as single tokens"


def choose_chat_format(
    tokenizer: Any, traces: Sequence[Trace], requested: str, corpus_path: Path
) -> ChatFormatChoice:
    """The chat format to lay the corpus out in: ``requested``, or with ``auto`` the one the
    corpus's texts are laid out in, else the one the tokenizer has (see the module
    docstring). Raises a :class:`CollectError` when ``auto`` cannot tell."""
    if requested != AUTO:
        return ChatFormatChoice(requested, "--chat-format")
    has = [name for name, lacking in formats_of(tokenizer).items() if not lacking]
    first = traces[0]
    if first.kind == "text" and not is_preformatted(first):
        name = has[0] if has else CHAT_FORMATS[0]
        return ChatFormatChoice(name, "auto: the corpus is plain text, laid out in no format")
    if first.kind == "text":
        name = next(n for n, lay in CHAT_LAYOUTS.items() if lay.user_marker in first.text)
        return ChatFormatChoice(name, f"auto: {corpus_path}:{first.line} is laid out in it")
    if len(has) == 1:
        return ChatFormatChoice(has[0], f"auto: {_has(has[0])}")
    if not has:
        lacking = "; ".join(f"{name}: {', '.join(problems)}"
                            for name, problems in formats_of(tokenizer).items())  # fmt: skip
        raise CollectError(
            f"{describe(tokenizer)} has the special tokens of no chat format as single tokens "
            f"({lacking}); {HOW_TO_FIX}"
        )
    template = str(getattr(tokenizer, "chat_template", None) or "")
    named = [name for name in has if TEMPLATE_MARKS[name] in template]
    if len(named) == 1:
        return ChatFormatChoice(named[0], f"auto: the tokenizer's chat template writes "
                                          f"'{TEMPLATE_MARKS[named[0]]}'")  # fmt: skip
    raise CollectError(
        f"{describe(tokenizer)} has the special tokens of both chat formats and its chat "
        f"template names {'both' if named else 'neither'}; pass --chat-format "
        f"{' or --chat-format '.join(CHAT_FORMATS)}"
    )


def _check_specials(
    tokenizer: Any, regions: frozenset[str], specials: Sequence[str], chat_format: str
) -> None:
    layout = CHAT_LAYOUTS[chat_format]
    needed = list(specials)
    if regions & {"bos", "user_marker", "assistant_marker"}:
        needed = list(dict.fromkeys((*layout.specials, *specials)))
    lacking = _lacking(tokenizer, needed)
    if not lacking:
        return
    others = [name for name, problems in formats_of(tokenizer).items()
              if not problems and name != chat_format]  # fmt: skip
    if others:
        other = others[0]
        way_out = (f"it has the {other} chat format's "
                   f"({_quoted(CHAT_LAYOUTS[other].specials)}): pass --chat-format {other} "
                   "(or auto)")  # fmt: skip
    else:
        rest = " or ".join(f for f in CHAT_FORMATS if f != chat_format)
        way_out = f"{HOW_TO_FIX}, or pass --chat-format {rest} if the model uses that format"
    raise CollectError(
        f"{describe(tokenizer)} does not have the {chat_format} chat format's special "
        f"tokens as single tokens ({'; '.join(lacking)}); {way_out}"
    )


def check_tokenizer(
    tokenizer: Any, traces: Sequence[Trace], chat_format: str, corpus_path: Path
) -> None:
    """Raise a :class:`CollectError` if the corpus's layout is wrong or the tokenizer does not
    fit it (see the module docstring)."""
    regions, specials = layout_summary(traces, chat_format, corpus_path)
    _check_specials(tokenizer, regions, specials, chat_format)
    checked, mismatches = round_trip_mismatches(tokenizer, traces, chat_format)
    log.info("%s: %d of %d sampled pieces round-trip", describe(tokenizer),
             checked - len(mismatches), checked)  # fmt: skip
    if len(mismatches) > int(TOLERATED_SHARE * checked):
        first = mismatches[0]
        text, decoded = first.excerpt()
        raise CollectError(
            f"{describe(tokenizer)} does not give the corpus text back: "
            f"{len(mismatches)} of {checked} sampled pieces differ after decode(encode(text)), "
            f"e.g. {corpus_path}:{first.line}: {text!r} came back as {decoded!r}; {HOW_TO_FIX}"
        )
