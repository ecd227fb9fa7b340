"""Checking, before a collection starts, that the tokenizer fits the corpus.

A tokenizer that encodes and decodes without complaint can still be the wrong one: one
rebuilt by a transformers class that ignores the saved ``tokenizer.json`` garbles every
text ("Write a function that adds 9" came back as "a f a a 9"), and the features of a run
collected through it describe garbage. So ``collect`` checks, before anything runs:

1. the corpus's layout (:func:`collectors.corpus.check_layouts`): errors name the file
   and the line;
2. that the special tokens of the chat format, and ``<think>``, ``</think>`` where the
   corpus uses them, are each one token that decodes back to itself;
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
    THINK_END,
    THINK_START,
    Trace,
    check_layouts,
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


def _check_specials(tokenizer: Any, regions: frozenset[str], chat_format: str) -> None:
    layout = CHAT_LAYOUTS[chat_format]
    needed: list[str] = []
    if regions & {"bos", "user_marker", "assistant_marker"}:
        needed += layout.specials
    if "think_start" in regions:
        needed.append(THINK_START)
    if "think_end" in regions:
        needed.append(THINK_END)
    lacking = []
    for special in needed:
        ids = tokenizer.encode(special, add_special_tokens=False)
        if len(ids) != 1:
            lacking.append(f"'{special}' encodes as {len(ids)} tokens")
            continue
        decoded = tokenizer.decode(ids, skip_special_tokens=False)
        if decoded.strip() != special:
            lacking.append(f"'{special}' encodes as one token that decodes as {decoded!r}")
    if lacking:
        others = " or ".join(f for f in CHAT_FORMATS if f != chat_format)
        raise CollectError(
            f"{describe(tokenizer)} does not have the {chat_format} chat format's special "
            f"tokens as single tokens ({'; '.join(lacking)}); {HOW_TO_FIX}, or pass "
            f"--chat-format {others} if the model uses that format"
        )


def check_tokenizer(
    tokenizer: Any, traces: Sequence[Trace], chat_format: str, corpus_path: Path
) -> None:
    """Raise a :class:`CollectError` if the corpus's layout is wrong or the tokenizer does not
    fit it (see the module docstring)."""
    regions = check_layouts(traces, chat_format, corpus_path)
    _check_specials(tokenizer, regions, chat_format)
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
