"""Reading a reasoning-trace corpus and tokenizing it into regions.

A corpus is JSONL in the OpenThoughts3 ``conversations`` format, one trace a line:
``{"conversations": [{"from": "human", "value": PROMPT}, {"from": "gpt", "value": RESPONSE}],
"domain": "math"}``. Each trace is laid out in the reasoning model's chat format
(``deepseek``: ``<｜begin▁of▁sentence｜><｜User｜>PROMPT<｜Assistant｜>RESPONSE``) and every
token is tagged with its region. Traces without ``</think>`` are kept: everything after
``<think>`` is thinking, and they are counted in ``n_unterminated_think``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from collectors.errors import CorpusError
from collectors.run_format import REGIONS

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
PAD = "<｜▁pad▁｜>"
THINK_START = "<think>"
THINK_END = "</think>"
SPECIAL_TOKENS = (BOS, EOS, USER, ASSISTANT, PAD, THINK_START, THINK_END)

USER_ROLES = {"human", "user"}
ASSISTANT_ROLES = {"gpt", "assistant"}
UNKNOWN_DOMAIN = "unknown"
REGION_CODE = {name: code for code, name in enumerate(REGIONS)}


class Encoder(Protocol):
    """The part of a Hugging Face tokenizer the corpus needs."""

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


@dataclass(frozen=True)
class Trace:
    """One corpus record: a prompt, a response and its domain."""

    line: int
    prompt: str
    response: str
    domain: str


@dataclass(frozen=True)
class TokenizedCorpus:
    """The whole corpus as flat arrays; sequence ``i`` is ``[offsets[i], offsets[i+1])``."""

    token_ids: np.ndarray  # int64 [n_tokens]
    regions: np.ndarray  # int8 [n_tokens], codes into REGIONS
    offsets: np.ndarray  # int64 [n_sequences + 1]
    domains: np.ndarray  # int16 [n_sequences], codes into domain_names
    domain_names: list[str]
    n_truncated: int
    n_unterminated_think: int

    @property
    def n_sequences(self) -> int:
        return len(self.offsets) - 1

    @property
    def n_tokens(self) -> int:
        return int(self.offsets[-1])

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def sequence(self, i: int) -> np.ndarray:
        return self.token_ids[self.offsets[i] : self.offsets[i + 1]]


def _field(record: object, key: str, path: Path, line: int) -> object:
    if not isinstance(record, dict) or key not in record:
        raise CorpusError(f"{path}:{line}: missing field '{key}'")
    return record[key]


def parse_trace(raw: str, path: Path, line: int) -> Trace:
    """Validate one JSONL line; errors name the file, the line and the field."""
    try:
        record = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise CorpusError(f"{path}:{line}: not valid JSON ({exc.msg})") from exc
    conversations = _field(record, "conversations", path, line)
    if not isinstance(conversations, list) or not conversations:
        raise CorpusError(f"{path}:{line}: field 'conversations' must be a non-empty list")
    prompt: str | None = None
    response: str | None = None
    for turn_no, turn in enumerate(conversations):
        role = _field(turn, "from", path, line)
        value = _field(turn, "value", path, line)
        if not isinstance(value, str):
            raise CorpusError(f"{path}:{line}: conversations[{turn_no}].value must be a string")
        if role in USER_ROLES and prompt is None:
            prompt = value
        elif role in ASSISTANT_ROLES and response is None:
            response = value
    if prompt is None or response is None:
        raise CorpusError(
            f"{path}:{line}: field 'conversations' needs a user turn (from: human|user) "
            "and an assistant turn (from: gpt|assistant)"
        )
    domain = record.get("domain", UNKNOWN_DOMAIN) if isinstance(record, dict) else None
    if not isinstance(domain, str) or not domain:
        raise CorpusError(f"{path}:{line}: field 'domain' must be a non-empty string")
    return Trace(line=line, prompt=prompt, response=response, domain=domain)


def read_traces(path: Path) -> Iterator[Trace]:
    """Yield the traces of a JSONL corpus; blank lines are skipped, bad lines raise."""
    if not path.is_file():
        raise CorpusError(f"{path}: corpus file not found")
    with path.open(encoding="utf-8") as fh:
        for line_no, raw in enumerate(fh, start=1):
            if raw.strip():
                yield parse_trace(raw, path, line_no)


def segments(trace: Trace) -> tuple[list[tuple[str, str]], bool]:
    """The deepseek chat layout of a trace as (text, region) pieces, and whether
    the thinking is unterminated (``<think>`` without ``</think>``)."""
    pieces = [
        (BOS, "bos"),
        (USER, "user_marker"),
        (trace.prompt, "question"),
        (ASSISTANT, "assistant_marker"),
    ]
    response = trace.response
    start = response.find(THINK_START)
    if start < 0:
        pieces.append((response, "answer"))
        return pieces, False
    if start > 0:
        pieces.append((response[:start], "answer"))
    pieces.append((THINK_START, "think_start"))
    rest = response[start + len(THINK_START) :]
    end = rest.find(THINK_END)
    if end < 0:
        pieces.append((rest, "thinking"))
        return pieces, True
    pieces.append((rest[:end], "thinking"))
    pieces.append((THINK_END, "think_end"))
    pieces.append((rest[end + len(THINK_END) :], "answer"))
    return pieces, False


def tokenize_traces(
    traces: Sequence[Trace], tokenizer: Encoder, max_length: int
) -> TokenizedCorpus:
    """Tokenize traces piece by piece so that every token's region is exact.

    Sequences longer than ``max_length`` are truncated (and counted), never dropped.
    """
    if not traces:
        raise CorpusError("the corpus holds no traces")
    ids_parts: list[np.ndarray] = []
    region_parts: list[np.ndarray] = []
    lengths: list[int] = []
    domain_names = sorted({t.domain for t in traces})
    domain_code = {name: i for i, name in enumerate(domain_names)}
    n_truncated = 0
    n_unterminated = 0
    for trace in traces:
        pieces, unterminated = segments(trace)
        n_unterminated += int(unterminated)
        ids: list[int] = []
        regions: list[int] = []
        for text, region in pieces:
            if not text:
                continue
            piece_ids = tokenizer.encode(text, add_special_tokens=False)
            ids.extend(piece_ids)
            regions.extend([REGION_CODE[region]] * len(piece_ids))
        if len(ids) > max_length:
            n_truncated += 1
            ids, regions = ids[:max_length], regions[:max_length]
        ids_parts.append(np.asarray(ids, dtype=np.int64))
        region_parts.append(np.asarray(regions, dtype=np.int8))
        lengths.append(len(ids))
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return TokenizedCorpus(
        token_ids=np.concatenate(ids_parts),
        regions=np.concatenate(region_parts),
        offsets=offsets,
        domains=np.asarray([domain_code[t.domain] for t in traces], dtype=np.int16),
        domain_names=domain_names,
        n_truncated=n_truncated,
        n_unterminated_think=n_unterminated,
    )
