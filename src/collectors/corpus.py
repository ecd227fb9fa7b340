"""Reading a corpus of reasoning traces or plain text and tokenizing it into regions.

A corpus is JSONL, one record a line; blank lines are skipped. A record has one of three
formats, decided by which key it holds (checked in this order):

``conversations`` (the OpenThoughts3 format)
    ``{"conversations": [{"from": "human", "value": PROMPT},
    {"from": "gpt", "value": RESPONSE}], "domain": "math"}``; the user turn's ``from`` is
    ``human`` or ``user``, the assistant's ``gpt`` or ``assistant`` (the first of each is used).
``prompt_response``
    ``{"prompt": PROMPT, "response": RESPONSE, "domain": "math"}``: laid out exactly like the
    equivalent conversation.
``text``
    ``{"text": TEXT, "domain": "web"}``: plain text, tokenized as is (no chat layout, no BOS);
    every token is in region ``text``.

``domain`` is optional (``"unknown"`` when absent) and must be a non-empty string when present.
All records of one corpus must have the same format; a mix, a record that matches no format
or a field of the wrong type is a :class:`CorpusError` that names the file, the line and the
field.

Conversation and prompt/response records are laid out in the reasoning model's chat format:

``deepseek``
    ``<｜begin▁of▁sentence｜><｜User｜>PROMPT<｜Assistant｜>RESPONSE``
``qwen``
    ``<|im_start|>user\\nPROMPT<|im_end|>\\n<|im_start|>assistant\\nRESPONSE`` (no BOS)

and every token is tagged with its region (``REGIONS`` in ``run_format``): ``bos``,
``user_marker``, ``question``, ``assistant_marker``, then the response: text before
``<think>`` is ``answer``, ``<think>`` is ``think_start``, what follows is ``thinking`` up to
``</think>`` (``think_end``), and the rest is ``answer``. A response with ``<think>`` but no
``</think>`` is kept, all thinking after ``<think>``, and flagged ``unterminated``. Each
thinking token also gets a think bin, its relative position in the trace's whole thinking
(before truncation) in tenths; tokens outside the thinking get -1.

The tokenizer must encode each special marker string of the layout (and ``<think>``,
``</think>`` when the corpus uses them) as exactly one token, or tokenizing raises.
Sequences longer than ``max_length`` are truncated and flagged, never dropped.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, get_args, runtime_checkable

import numpy as np

from collectors.errors import CorpusError
from collectors.run_format import CHAT_FORMATS, MARKER_REGIONS, REGIONS, THINK_BINS

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
PAD = "<｜▁pad▁｜>"
THINK_START = "<think>"
THINK_END = "</think>"
SPECIAL_TOKENS = (BOS, EOS, USER, ASSISTANT, PAD, THINK_START, THINK_END)

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ENDOFTEXT = "<|endoftext|>"
QWEN_SPECIAL_TOKENS = (IM_START, IM_END, ENDOFTEXT)

USER_ROLES = {"human", "user"}
ASSISTANT_ROLES = {"gpt", "assistant"}
UNKNOWN_DOMAIN = "unknown"
REGION_CODE = {name: code for code, name in enumerate(REGIONS)}

TraceKind = Literal["conversations", "prompt_response", "text"]
TRACE_KINDS: tuple[TraceKind, ...] = get_args(TraceKind)

_ENCODE_CHUNK = 256  # traces whose pieces are encoded in one batch


@dataclass(frozen=True)
class ChatLayout:
    """How a chat format lays out a prompt and a response, as (text, region) pieces."""

    name: str
    before_prompt: tuple[tuple[str, str], ...]
    after_prompt: tuple[tuple[str, str], ...]
    specials: tuple[str, ...]  # marker strings that must each be a single token


CHAT_LAYOUTS: dict[str, ChatLayout] = {
    "deepseek": ChatLayout(
        name="deepseek",
        before_prompt=((BOS, "bos"), (USER, "user_marker")),
        after_prompt=((ASSISTANT, "assistant_marker"),),
        specials=(BOS, USER, ASSISTANT),
    ),
    "qwen": ChatLayout(
        name="qwen",
        before_prompt=((f"{IM_START}user\n", "user_marker"),),
        after_prompt=((f"{IM_END}\n{IM_START}assistant\n", "assistant_marker"),),
        specials=(IM_START, IM_END),
    ),
}


class Encoder(Protocol):
    """The part of a Hugging Face tokenizer the corpus needs."""

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


@runtime_checkable
class _BatchEncoder(Protocol):
    """A Hugging Face fast tokenizer, which encodes a list of texts in one (parallel) call."""

    is_fast: bool

    def __call__(self, text: list[str], add_special_tokens: bool = ...) -> Mapping[str, Any]: ...


@dataclass(frozen=True)
class Trace:
    """One corpus record.

    ``kind`` is the record's format. Conversation and prompt/response records fill ``prompt``
    and ``response``; text records fill ``text`` (and leave ``prompt`` and ``response`` empty).
    ``line`` is the record's 1-based line in the corpus file.
    """

    line: int
    prompt: str
    response: str
    domain: str
    kind: TraceKind = "conversations"
    text: str = ""


@dataclass(frozen=True)
class TokenizedCorpus:
    """The whole corpus as flat arrays; sequence ``i`` is ``[offsets[i], offsets[i+1])``."""

    token_ids: np.ndarray  # int64 [n_tokens]
    regions: np.ndarray  # int8 [n_tokens], codes into REGIONS
    think_bins: np.ndarray  # int8 [n_tokens], -1 outside the thinking, else 0..THINK_BINS-1
    offsets: np.ndarray  # int64 [n_sequences + 1]
    domains: np.ndarray  # int16 [n_sequences], codes into domain_names
    domain_names: list[str]
    truncated: np.ndarray  # bool [n_sequences], longer than max_length and cut
    unterminated: np.ndarray  # bool [n_sequences], <think> without </think>

    @property
    def n_sequences(self) -> int:
        return len(self.offsets) - 1

    @property
    def n_tokens(self) -> int:
        return int(self.offsets[-1])

    @property
    def n_truncated(self) -> int:
        return int(self.truncated.sum())

    @property
    def n_unterminated_think(self) -> int:
        return int(self.unterminated.sum())

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def sequence(self, i: int) -> np.ndarray:
        return self.token_ids[self.offsets[i] : self.offsets[i + 1]]


def _field(record: object, key: str, path: Path, line: int) -> object:
    if not isinstance(record, dict) or key not in record:
        raise CorpusError(f"{path}:{line}: missing field '{key}'")
    return record[key]


def _string(record: dict[str, Any], key: str, path: Path, line: int) -> str:
    value = _field(record, key, path, line)
    if not isinstance(value, str):
        raise CorpusError(
            f"{path}:{line}: field '{key}' must be a string, not {type(value).__name__}"
        )
    return value


def _conversation(record: dict[str, Any], path: Path, line: int) -> tuple[str, str]:
    conversations = record["conversations"]
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
    return prompt, response


def parse_trace(raw: str, path: Path, line: int) -> Trace:
    """Validate one JSONL line; errors name the file, the line and the field."""
    try:
        record = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise CorpusError(f"{path}:{line}: not valid JSON ({exc.msg})") from exc
    if not isinstance(record, dict):
        raise CorpusError(
            f"{path}:{line}: a record must be a JSON object, not {type(record).__name__}"
        )
    domain = record.get("domain", UNKNOWN_DOMAIN)
    if not isinstance(domain, str) or not domain:
        raise CorpusError(f"{path}:{line}: field 'domain' must be a non-empty string")
    if "conversations" in record:
        prompt, response = _conversation(record, path, line)
        return Trace(line, prompt, response, domain, kind="conversations")
    if "prompt" in record or "response" in record:
        prompt = _string(record, "prompt", path, line)
        response = _string(record, "response", path, line)
        return Trace(line, prompt, response, domain, kind="prompt_response")
    if "text" in record:
        text = _string(record, "text", path, line)
        if not text:
            raise CorpusError(f"{path}:{line}: field 'text' must be a non-empty string")
        return Trace(line, "", "", domain, kind="text", text=text)
    raise CorpusError(
        f"{path}:{line}: the record matches no corpus format: it needs field 'conversations', "
        "fields 'prompt' and 'response', or field 'text'"
    )


def read_traces(path: Path) -> Iterator[Trace]:
    """Yield the traces of a JSONL corpus; blank lines are skipped, bad lines raise.

    Every record must have the format of the first one; the first that does not raises a
    :class:`CorpusError` naming both lines and both formats.
    """
    if not path.is_file():
        raise CorpusError(f"{path}: corpus file not found")
    first: Trace | None = None
    with path.open(encoding="utf-8") as fh:
        for line_no, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            trace = parse_trace(raw, path, line_no)
            if first is None:
                first = trace
            elif trace.kind != first.kind:
                raise CorpusError(
                    f"{path}:{line_no}: a '{trace.kind}' record, but line {first.line} is a "
                    f"'{first.kind}' record; all records of a corpus must have one format"
                )
            yield trace


def _layout(chat_format: str) -> ChatLayout:
    layout = CHAT_LAYOUTS.get(chat_format)
    if layout is None:
        raise CorpusError(
            f"unknown chat format '{chat_format}'; choose one of {', '.join(CHAT_FORMATS)}"
        )
    return layout


def segments(trace: Trace, *, chat_format: str = "deepseek") -> tuple[list[tuple[str, str]], bool]:
    """The layout of a trace as (text, region) pieces, and whether the thinking is
    unterminated (``<think>`` without ``</think>``).

    Conversation and prompt/response records are laid out in ``chat_format``; a text record is
    one ``text`` piece whatever the chat format. Pieces may be empty strings.
    """
    if trace.kind == "text":
        return [(trace.text, "text")], False
    layout = _layout(chat_format)
    pieces = [*layout.before_prompt, (trace.prompt, "question"), *layout.after_prompt]
    response = trace.response
    start = response.find(THINK_START)
    if start < 0:
        end = response.find(THINK_END)
        if end >= 0:  # the chat template opened the thinking: the response starts inside it
            pieces.append((response[:end], "thinking"))
            pieces.append((THINK_END, "think_end"))
            pieces.append((response[end + len(THINK_END) :], "answer"))
        else:
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


def _encode_texts(tokenizer: Encoder, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens added; one batch call when the
    tokenizer is a fast one (same ids as ``encode``, text by text)."""
    if not texts:
        return []
    if isinstance(tokenizer, _BatchEncoder) and tokenizer.is_fast:
        return list(tokenizer(texts, add_special_tokens=False)["input_ids"])
    return [tokenizer.encode(text, add_special_tokens=False) for text in texts]


class _Markers:
    """Token ids of the layout's marker pieces, encoded once; before a marker is first used,
    the special strings it relies on are checked to be single tokens."""

    def __init__(self, tokenizer: Encoder, layout: ChatLayout) -> None:
        self._tokenizer = tokenizer
        self._layout = layout
        self._ids: dict[str, list[int]] = {}

    def ids(self, text: str, region: str) -> list[int]:
        cached = self._ids.get(text)
        if cached is None:
            if region == "think_start":
                self._check((THINK_START,))
            elif region == "think_end":
                self._check((THINK_END,))
            else:
                self._check(self._layout.specials)
            cached = self._ids[text] = self._tokenizer.encode(text, add_special_tokens=False)
        return cached

    def _check(self, specials: tuple[str, ...]) -> None:
        lacking = []
        for special in specials:
            n = len(self._tokenizer.encode(special, add_special_tokens=False))
            if n != 1:
                lacking.append(f"'{special}' encodes as {n} tokens")
        if lacking:
            others = " or ".join(f for f in CHAT_FORMATS if f != self._layout.name)
            raise CorpusError(
                f"the tokenizer lacks the {self._layout.name} chat format's special tokens "
                f"({'; '.join(lacking)}; each must be exactly one token); "
                f"is this the model's tokenizer? try --chat-format {others}"
            )


def _check_one_kind(traces: Sequence[Trace]) -> None:
    first = traces[0]
    for trace in traces:
        if trace.kind != first.kind:
            raise CorpusError(
                f"the traces mix formats: line {first.line} is a '{first.kind}' record, "
                f"line {trace.line} a '{trace.kind}' record"
            )


def tokenize_traces(
    traces: Sequence[Trace],
    tokenizer: Encoder,
    max_length: int,
    chat_format: str = "deepseek",
) -> TokenizedCorpus:
    """Tokenize traces piece by piece (see :func:`segments`) so that every token's region is
    exact; marker pieces are encoded once, the others in batches.

    Sequences longer than ``max_length`` are truncated (and flagged), never dropped; think bins
    are relative to the whole thinking, truncated or not.
    """
    if not traces:
        raise CorpusError("the corpus holds no traces")
    if max_length < 1:
        raise CorpusError(f"max_length must be at least 1, not {max_length}")
    _check_one_kind(traces)
    markers = _Markers(tokenizer, _layout(chat_format))
    ids_parts: list[np.ndarray] = []
    region_parts: list[np.ndarray] = []
    bin_parts: list[np.ndarray] = []
    lengths: list[int] = []
    truncated: list[bool] = []
    unterminated: list[bool] = []
    for chunk_start in range(0, len(traces), _ENCODE_CHUNK):
        chunk = traces[chunk_start : chunk_start + _ENCODE_CHUNK]
        laid_out = [segments(trace, chat_format=chat_format) for trace in chunk]
        texts = [
            text
            for pieces, _ in laid_out
            for text, region in pieces
            if text and region not in MARKER_REGIONS
        ]
        encoded = iter(_encode_texts(tokenizer, texts))
        for pieces, is_unterminated in laid_out:
            ids: list[int] = []
            codes: list[int] = []
            counts: list[int] = []
            think_start = think_count = 0
            for text, region in pieces:
                if not text:
                    continue
                piece_ids = markers.ids(text, region) if region in MARKER_REGIONS else next(encoded)
                if region == "thinking":
                    think_start, think_count = len(ids), len(piece_ids)
                ids.extend(piece_ids)
                codes.append(REGION_CODE[region])
                counts.append(len(piece_ids))
            regions = np.repeat(np.asarray(codes, dtype=np.int8), counts)
            bins = np.full(len(ids), -1, dtype=np.int8)
            if think_count:
                think_end = think_start + think_count
                bins[think_start:think_end] = THINK_BINS * np.arange(think_count) // think_count
            cut = len(ids) > max_length
            ids_parts.append(np.asarray(ids[:max_length], dtype=np.int64))
            region_parts.append(regions[:max_length])
            bin_parts.append(bins[:max_length])
            lengths.append(min(len(ids), max_length))
            truncated.append(cut)
            unterminated.append(is_unterminated)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    domain_names = sorted({t.domain for t in traces})
    domain_code = {name: i for i, name in enumerate(domain_names)}
    return TokenizedCorpus(
        token_ids=np.concatenate(ids_parts),
        regions=np.concatenate(region_parts),
        think_bins=np.concatenate(bin_parts),
        offsets=offsets,
        domains=np.asarray([domain_code[t.domain] for t in traces], dtype=np.int16),
        domain_names=domain_names,
        truncated=np.asarray(truncated, dtype=bool),
        unterminated=np.asarray(unterminated, dtype=bool),
    )
