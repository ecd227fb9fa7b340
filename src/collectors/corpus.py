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
    every token is in region ``text``. A text already laid out in the chat format (it holds
    the format's user marker: ``<｜User｜>`` for ``deepseek``, ``<|im_start|>user\\n`` for
    ``qwen``) is a *pre-formatted* trace, split at its markers into the regions below.

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

A pre-formatted text record gets exactly the tokens and regions of the equivalent
conversation: it must hold the format's user marker once and, after it, the assistant marker
(``<｜Assistant｜>``, or ``<|im_end|>\\n<|im_start|>assistant\\n``) once; a leading BOS is
``bos``, any text before the user marker (a system prompt) is ``question``, and what follows
the assistant marker is the response. Its markers are kept as written: a text without BOS
gets none. A text record laid out in the other chat format, with the wrong number of
markers, or mixed with plain text records in one corpus is an error. The layout adds the
markers of conversation and prompt/response records itself, so a prompt or response that
already holds a turn marker (``TURN_MARKERS``) is an error, never laid out twice.

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
# Markers that open a turn in some chat format: a prompt or response holding one is
# already laid out (end-of-turn markers such as a trailing <|im_end|> are allowed).
TURN_MARKERS = {BOS: "deepseek", USER: "deepseek", ASSISTANT: "deepseek", IM_START: "qwen"}

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

    def _marker(self, region: str) -> str | None:
        for text, piece_region in (*self.before_prompt, *self.after_prompt):
            if piece_region == region:
                return text
        return None

    @property
    def bos(self) -> str | None:
        """The BOS piece the layout starts with, if any."""
        return self._marker("bos")

    @property
    def user_marker(self) -> str:
        """The piece before the prompt that opens the user turn."""
        marker = self._marker("user_marker")
        assert marker is not None
        return marker

    @property
    def assistant_marker(self) -> str:
        """The piece between the prompt and the response."""
        marker = self._marker("assistant_marker")
        assert marker is not None
        return marker


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


def _decode_line(raw: bytes, path: Path, line: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        bad = raw[exc.start : exc.start + 1].hex().upper()
        raise CorpusError(
            f"{path}:{line}: not valid UTF-8 (byte 0x{bad} at byte {exc.start + 1} of the "
            "line); the corpus must be UTF-8 JSONL: re-encode the file, e.g. with iconv"
        ) from exc


def read_traces(path: Path) -> Iterator[Trace]:
    """Yield the traces of a JSONL corpus; blank lines are skipped, bad lines raise.

    Every record must have the format of the first one; the first that does not raises a
    :class:`CorpusError` naming both lines and both formats.
    """
    if not path.is_file():
        raise CorpusError(f"{path}: corpus file not found")
    first: Trace | None = None
    with path.open("rb") as fh:
        for line_no, raw_bytes in enumerate(fh, start=1):
            raw = _decode_line(raw_bytes, path, line_no)
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


def _where(trace: Trace, path: Path | None) -> str:
    return f"{path}:{trace.line}" if path is not None else f"line {trace.line}"


def segments(
    trace: Trace, *, chat_format: str = "deepseek", path: Path | None = None
) -> tuple[list[tuple[str, str]], bool]:
    """The layout of a trace as (text, region) pieces, and whether the thinking is
    unterminated (``<think>`` without ``</think>``).

    Conversation and prompt/response records are laid out in ``chat_format``; a plain text
    record is one ``text`` piece whatever the chat format, a pre-formatted one is split at its
    markers (see the module docstring). Pieces may be empty strings. Errors name ``path``
    and the record's line (only the line without ``path``).
    """
    if trace.kind == "text":
        return _text_segments(trace, chat_format, path)
    layout = _layout(chat_format)
    _check_no_turn_markers(trace, path)
    pieces = [*layout.before_prompt, (trace.prompt, "question"), *layout.after_prompt]
    response, unterminated = _response_segments(trace.response)
    return pieces + response, unterminated


def _response_segments(response: str) -> tuple[list[tuple[str, str]], bool]:
    """A response's pieces: answer, think start, thinking, think end, answer."""
    pieces: list[tuple[str, str]] = []
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


def _turn_fields(trace: Trace) -> tuple[tuple[str, str], tuple[str, str]]:
    if trace.kind == "conversations":
        return (
            ("the user turn of field 'conversations'", trace.prompt),
            ("the assistant turn of field 'conversations'", trace.response),
        )
    return (("field 'prompt'", trace.prompt), ("field 'response'", trace.response))


def _check_no_turn_markers(trace: Trace, path: Path | None) -> None:
    for name, value in _turn_fields(trace):
        for marker, chat_format in TURN_MARKERS.items():
            if marker in value:
                raise CorpusError(
                    f"{_where(trace, path)}: {name} already holds the chat marker "
                    f"'{marker}', and the layout adds the markers itself; give the prompt "
                    "and the response without chat markers, or the whole laid-out trace as "
                    f'{{"text": ...}} with --chat-format {chat_format}'
                )


def is_preformatted(trace: Trace) -> bool:
    """Whether a record is a text already laid out in some chat format."""
    return trace.kind == "text" and any(
        layout.user_marker in trace.text for layout in CHAT_LAYOUTS.values()
    )


def _text_segments(
    trace: Trace, chat_format: str, path: Path | None
) -> tuple[list[tuple[str, str]], bool]:
    text = trace.text
    found = [layout for layout in CHAT_LAYOUTS.values() if layout.user_marker in text]
    if not found:
        return [(text, "text")], False
    layout = _layout(chat_format)
    if layout not in found:
        other = found[0]
        raise CorpusError(
            f"{_where(trace, path)}: field 'text' is laid out in the {other.name} chat format "
            f"(it holds {other.user_marker!r}), not the {layout.name} one; "
            f"pass --chat-format {other.name}"
        )
    user, assistant = layout.user_marker, layout.assistant_marker
    n_user, n_assistant = text.count(user), text.count(assistant)
    user_at = text.find(user)
    assistant_at = text.find(assistant, user_at + len(user))
    if n_user != 1 or n_assistant != 1 or assistant_at < 0:
        found_as = (
            f"holds them {n_user} and {n_assistant} times"
            if n_user != 1 or n_assistant != 1
            else "holds the assistant marker first"
        )
        raise CorpusError(
            f"{_where(trace, path)}: field 'text' is a pre-formatted {layout.name} trace, so it "
            f"must hold {user!r} once and after it {assistant!r} once (it {found_as}); "
            "give one user turn and one assistant turn a record"
        )
    pieces: list[tuple[str, str]] = []
    head = text[:user_at]
    if layout.bos is not None and head.startswith(layout.bos):
        pieces.append((layout.bos, "bos"))
        head = head[len(layout.bos) :]
    if head:
        pieces.append((head, "question"))  # a system prompt
    pieces += [
        (user, "user_marker"),
        (text[user_at + len(user) : assistant_at], "question"),
        (assistant, "assistant_marker"),
    ]
    response, unterminated = _response_segments(text[assistant_at + len(assistant) :])
    return pieces + response, unterminated


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


def _describe(trace: Trace) -> str:
    if trace.kind == "text":
        return "pre-formatted 'text'" if is_preformatted(trace) else "plain 'text'"
    return f"'{trace.kind}'"


def _check_one_kind(traces: Sequence[Trace], path: Path | None = None) -> None:
    """All traces of one format; text records all pre-formatted or all plain."""
    first = traces[0]
    first_preformatted = is_preformatted(first)
    for trace in traces:
        if trace.kind != first.kind or is_preformatted(trace) != first_preformatted:
            raise CorpusError(
                f"{_where(trace, path)}: a {_describe(trace)} record, but line {first.line} is "
                f"a {_describe(first)} record; all records of a corpus must have one format"
            )


def check_layouts(
    traces: Sequence[Trace], chat_format: str, path: Path | None = None
) -> frozenset[str]:
    """Raise the first layout error of the corpus (what :func:`tokenize_traces` would raise
    on the way), naming ``path`` and the line, without tokenizing anything; return the
    regions the corpus's pieces fall in."""
    if not traces:
        raise CorpusError(f"{path or 'the corpus'}: holds no traces")
    _layout(chat_format)
    _check_one_kind(traces, path)
    regions: set[str] = set()
    for trace in traces:
        pieces, _ = segments(trace, chat_format=chat_format, path=path)
        regions.update(region for text, region in pieces if text)
    return frozenset(regions)


# A piece of text longer than this many characters per token of --max-length (and at
# least LONG_PIECE_MIN_CHARS) is encoded only as far as the sequence can keep: a fast
# tokenizer holds ~150 bytes per character of what it encodes, so a 50 MB line would
# take 7.5 GB to keep 1,024 tokens. A thinking piece is also counted whole, a chunk at
# a time, for its thinking tenths.
LONG_PIECE_CHARS_PER_TOKEN = 64
LONG_PIECE_MIN_CHARS = 1 << 16
_COUNT_BATCH = 16  # chunks of a long piece counted in one call


def _head(text: str, limit: int) -> str:
    """``text`` up to about ``limit`` characters, cut before a space or newline where
    one is near the limit (so the words before the cut tokenize as in the whole)."""
    if len(text) <= limit:
        return text
    cut = max(text.rfind(" ", limit * 9 // 10, limit), text.rfind("\n", limit * 9 // 10, limit))
    return text[: cut if cut > 0 else limit]


def _count_tokens(tokenizer: Encoder, text: str, limit: int) -> int:
    """The tokens of a long ``text``, counted a chunk of about ``limit`` characters at a
    time (exact but for a token or two at each chunk's edge)."""
    chunks = []
    start = 0
    while start < len(text):
        head = _head(text[start : start + limit + 1], limit)
        chunks.append(head)
        start += len(head)
    return sum(
        len(ids)
        for i in range(0, len(chunks), _COUNT_BATCH)
        for ids in _encode_texts(tokenizer, chunks[i : i + _COUNT_BATCH])
    )


def _long_piece(
    tokenizer: Encoder,
    text: str,
    head_ids: list[int],
    limit: int,
    max_length: int,
    count_whole: bool,
) -> tuple[list[int], int]:
    """A piece's ids as far as a sequence can keep them, and its whole token count
    (counted only when ``count_whole``: the thinking, whose tenths need it)."""
    if len(text) <= limit:
        return head_ids, len(head_ids)
    if len(head_ids) <= max_length + 16:  # more than 64 characters a token: encode it all
        ids = _encode_texts(tokenizer, [text])[0]
        return ids, len(ids)
    return head_ids, _count_tokens(tokenizer, text, limit) if count_whole else len(head_ids)


def tokenize_traces(
    traces: Sequence[Trace],
    tokenizer: Encoder,
    max_length: int,
    chat_format: str = "deepseek",
    path: Path | None = None,
) -> TokenizedCorpus:
    """Tokenize traces piece by piece (see :func:`segments`) so that every token's region is
    exact; marker pieces are encoded once, the others in batches.

    Sequences longer than ``max_length`` are truncated (and flagged), never dropped; think bins
    are relative to the whole thinking, truncated or not. Layout errors name ``path`` (the
    corpus file) when given.
    """
    if not traces:
        raise CorpusError("the corpus holds no traces")
    if max_length < 1:
        raise CorpusError(f"max_length must be at least 1, not {max_length}")
    _check_one_kind(traces, path)
    markers = _Markers(tokenizer, _layout(chat_format))
    ids_parts: list[np.ndarray] = []
    region_parts: list[np.ndarray] = []
    bin_parts: list[np.ndarray] = []
    lengths: list[int] = []
    truncated: list[bool] = []
    unterminated: list[bool] = []
    for chunk_start in range(0, len(traces), _ENCODE_CHUNK):
        chunk = traces[chunk_start : chunk_start + _ENCODE_CHUNK]
        laid_out = [segments(trace, chat_format=chat_format, path=path) for trace in chunk]
        pieces_in_order = [
            (text, region)
            for pieces, _ in laid_out
            for text, region in pieces
            if text and region not in MARKER_REGIONS
        ]
        long_limit = max(LONG_PIECE_CHARS_PER_TOKEN * max_length, LONG_PIECE_MIN_CHARS)
        heads = [_head(text, long_limit) for text, _ in pieces_in_order]
        encoded = iter(_encode_texts(tokenizer, heads))
        for pieces, is_unterminated in laid_out:
            ids: list[int] = []
            codes: list[int] = []
            counts: list[int] = []
            think_start = think_count = think_total = 0
            for text, region in pieces:
                if not text:
                    continue
                if region in MARKER_REGIONS:
                    piece_ids = markers.ids(text, region)
                    total = len(piece_ids)
                else:
                    piece_ids, total = _long_piece(tokenizer, text, next(encoded), long_limit,
                                                   max_length, region == "thinking")  # fmt: skip
                if region == "thinking":
                    think_start, think_count, think_total = len(ids), len(piece_ids), total
                ids.extend(piece_ids)
                codes.append(REGION_CODE[region])
                counts.append(len(piece_ids))
            regions = np.repeat(np.asarray(codes, dtype=np.int8), counts)
            bins = np.full(len(ids), -1, dtype=np.int8)
            if think_count:
                think_end = think_start + think_count
                bins[think_start:think_end] = THINK_BINS * np.arange(think_count) // think_total
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
