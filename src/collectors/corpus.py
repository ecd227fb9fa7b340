"""Reading a corpus of reasoning traces or plain text and tokenizing it into regions.

A corpus is JSONL, one record a line; blank lines are skipped. A record has one of four
formats, decided by which key it holds (checked in this order):

``conversations`` (the OpenThoughts3 / ShareGPT format)
    ``{"conversations": [{"from": "human", "value": PROMPT},
    {"from": "gpt", "value": RESPONSE}], "domain": "math"}``; ``from`` is ``system``,
    ``human`` or ``user``, ``gpt`` or ``assistant``. A turn may also be written as a message
    (``role`` and ``content``, below).
``messages`` (the OpenAI / Hugging Face chat format)
    ``{"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content":
    PROMPT}, {"role": "assistant", "content": ANSWER, "reasoning_content": THINKING}]}``;
    ``role`` is ``system`` (or ``developer``), ``user`` or ``assistant``. ``content`` is a
    string, null, or a list of parts: ``{"type": "text", "text": ...}`` parts are joined,
    a ``{"type": "thinking", "thinking": ...}`` part is the thinking. An assistant message's
    thinking is its ``reasoning_content``, ``reasoning`` or ``thinking`` field (or thinking
    part), laid out as ``<think>\\nTHINKING\\n</think>\\n\\nANSWER`` (as Qwen3's chat template
    does), or is written inside ``<think>...</think>`` in its content (not both).
``prompt_response``
    ``{"prompt": PROMPT, "response": RESPONSE, "domain": "math"}``, with an optional
    ``"system"`` string: laid out exactly like the equivalent conversation.
``text``
    ``{"text": TEXT, "domain": "web"}``: plain text, tokenized as is (no chat layout, no BOS);
    every token is in region ``text``. A text already laid out in the chat format (it holds
    the format's user marker: ``<｜User｜>`` for ``deepseek``, ``<|im_start|>user\\n`` for
    ``qwen``) is a *pre-formatted* trace, split at its markers into the regions below.

``domain`` is optional (``"unknown"`` when absent) and must be a non-empty string when present.
All records of one corpus must have the same format; a mix, a record that matches no format
or a field of the wrong type is a :class:`CorpusError` that names the file, the line and the
field. A conversation needs a user turn and an assistant turn.

What a conversation holds that cannot be laid out is left out and counted by reason
(``DROP_REASONS``; ``Trace.dropped``, ``TokenizedCorpus.dropped``): a turn of an unknown
role, a tool's output, an assistant's tool call (its text is kept), a content part that is
not text (an image), an empty message (but an empty last assistant turn is kept, as an
empty prompt/response ``response`` is: the assistant marker with nothing after it).

Conversation, message and prompt/response records are laid out turn by turn in the
reasoning model's chat format, each turn opened by its marker (which also closes the turn
before it):

``deepseek``
    ``<｜begin▁of▁sentence｜>SYSTEM<｜User｜>PROMPT<｜Assistant｜>RESPONSE<｜end▁of▁sentence｜>
    <｜User｜>PROMPT<｜Assistant｜>RESPONSE`` (no system marker: a system text comes as is)
``qwen``
    ``<|im_start|>system\\nSYSTEM<|im_end|>\\n<|im_start|>user\\nPROMPT<|im_end|>\\n
    <|im_start|>assistant\\nRESPONSE<|im_end|>\\n<|im_start|>user\\n...`` (no BOS)

The last turn gets no end marker. Every token is tagged with its region (``REGIONS`` in
``run_format``): ``bos``; a marker opening an assistant turn is ``assistant_marker``, one
opening any other turn ``user_marker``; user and system text is ``question``; an assistant
turn's text before ``<think>`` is ``answer``, ``<think>`` is ``think_start``, what follows
is ``thinking`` up to ``</think>`` (``think_end``), and the rest is ``answer``. A turn with
``</think>`` but no ``<think>`` starts inside its thinking (the chat template opened it). A
turn with ``<think>`` but no ``</think>`` is kept, all thinking after ``<think>``, and the
trace is flagged ``unterminated``. Each thinking token also gets a think bin, its relative
position in its turn's whole thinking (before truncation) in tenths; tokens outside the
thinking get -1. :func:`response_segments` is the one place that finds the thinking.

A pre-formatted text record gets exactly the tokens and regions of the equivalent
conversation: it must hold the format's user marker once and, after it, the assistant marker
(``<｜Assistant｜>``, or ``<|im_end|>\\n<|im_start|>assistant\\n``) once; a leading BOS is
``bos``, any text before the user marker (a system prompt) is ``question``, and what follows
the assistant marker is the response. Its markers are kept as written: a text without BOS
gets none. A text record laid out in the other chat format, with the wrong number of
markers, or mixed with plain text records in one corpus is an error. The layout adds the
markers of the other records itself, so a turn that already holds a turn marker
(``TURN_MARKERS``) is an error, never laid out twice.

The tokenizer must encode each special marker string of the layout (and ``<think>``,
``</think>`` when the corpus uses them) as exactly one token, or tokenizing raises.
Sequences longer than ``max_length`` are truncated and flagged, never dropped.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
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

# Every special string a layout's markers may hold (each must be one token where used).
MARKER_SPECIALS = (BOS, EOS, USER, ASSISTANT, IM_START, IM_END)

Role = Literal["system", "user", "assistant"]
SYSTEM_ROLES = {"system", "developer"}
USER_ROLES = {"human", "user"}
ASSISTANT_ROLES = {"gpt", "assistant"}
TOOL_ROLES = {"tool", "function", "ipython", "observation"}  # a tool's output
TOOL_CALL_ROLES = {"function_call", "tool_call"}  # ShareGPT's turn of an assistant's call
THINKING_FIELDS = ("reasoning_content", "reasoning", "thinking")
TEXT_PART_TYPES = {"text", "input_text", "output_text"}
THINKING_PART_TYPES = {"thinking", "reasoning"}
DROP_REASONS = {
    "unknown_role": "a turn whose role is not system, user or assistant (or an alias)",
    "tool_message": "a tool's output (role tool, function, ipython or observation)",
    "tool_call": "an assistant's tool call (the message's text, if any, is kept)",
    "non_text_part": "a content part that is neither text nor thinking (an image, audio...)",
    "empty_message": "a message with no text (an empty last assistant turn is kept)",
}
UNKNOWN_DOMAIN = "unknown"
REGION_CODE = {name: code for code, name in enumerate(REGIONS)}

TraceKind = Literal["conversations", "messages", "prompt_response", "text"]
TRACE_KINDS: tuple[TraceKind, ...] = get_args(TraceKind)

_ENCODE_CHUNK = 256  # traces whose pieces are encoded in one batch


@dataclass(frozen=True)
class ChatLayout:
    """How a chat format lays out a conversation, as (text, region) pieces.

    ``before_prompt`` and ``after_prompt`` lay out one exchange; ``opens`` and ``closes``
    give the marker that opens a turn of each role and the one that ends a turn before
    the next one opens (see :meth:`marker`)."""

    name: str
    before_prompt: tuple[tuple[str, str], ...]
    after_prompt: tuple[tuple[str, str], ...]
    specials: tuple[str, ...]  # marker strings of one exchange that must each be one token
    opens: Mapping[str, str]
    closes: Mapping[str, str]

    def marker(self, before: Role | None, role: Role) -> tuple[str, str]:
        """The marker between a turn of role ``before`` (None: the first turn, after any
        BOS) and a turn of ``role``, and its region."""
        text = (self.closes[before] if before is not None else "") + self.opens[role]
        return text, "assistant_marker" if role == "assistant" else "user_marker"

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
        opens={"system": "", "user": USER, "assistant": ASSISTANT},
        closes={"system": "", "user": "", "assistant": EOS},
    ),
    "qwen": ChatLayout(
        name="qwen",
        before_prompt=((f"{IM_START}user\n", "user_marker"),),
        after_prompt=((f"{IM_END}\n{IM_START}assistant\n", "assistant_marker"),),
        specials=(IM_START, IM_END),
        opens={role: f"{IM_START}{role}\n" for role in ("system", "user", "assistant")},
        closes={role: f"{IM_END}\n" for role in ("system", "user", "assistant")},
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
class Turn:
    """One turn of a conversation; an assistant turn's thinking is inside ``<think>``.
    ``where`` names it in the record for errors (``messages[3]``)."""

    role: Role
    text: str
    where: str


@dataclass(frozen=True)
class Trace:
    """One corpus record.

    ``kind`` is the record's format. Conversation, message and prompt/response records fill
    ``prompt`` and ``response`` (the first user and assistant turns); when the record is more
    than that one exchange (a system turn, several exchanges) ``turns`` holds every turn
    laid out, else it is empty. Text records fill ``text`` (and leave ``prompt`` and
    ``response`` empty). ``dropped`` names, by reason (``DROP_REASONS``), each part of the
    record left out. ``line`` is the record's 1-based line in the corpus file.
    """

    line: int
    prompt: str
    response: str
    domain: str
    kind: TraceKind = "conversations"
    text: str = ""
    turns: tuple[Turn, ...] = ()
    dropped: tuple[str, ...] = ()

    def chat_turns(self) -> tuple[Turn, ...]:
        """The turns laid out: ``turns``, or the exchange ``prompt`` -> ``response``."""
        if self.turns:
            return self.turns
        return (Turn("user", self.prompt, "prompt"), Turn("assistant", self.response, "response"))


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
    dropped: dict[str, int] = field(default_factory=dict)  # parts left out, by reason

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


def _fail(path: Path, line: int, what: str) -> CorpusError:
    return CorpusError(f"{path}:{line}: {what}")


def _role(name: object, where: str, path: Path, line: int, dropped: list[str]) -> Role | None:
    """The role a turn is laid out as, or None when it is left out (its reason counted in
    ``dropped``)."""
    if not isinstance(name, str):
        raise _fail(path, line, f"{where}: the role must be a string, not {type(name).__name__}")
    role = name.lower()
    if role in SYSTEM_ROLES:
        return "system"
    if role in USER_ROLES:
        return "user"
    if role in ASSISTANT_ROLES:
        return "assistant"
    reason = ("tool_message" if role in TOOL_ROLES else "tool_call" if role in TOOL_CALL_ROLES
              else "unknown_role")  # fmt: skip
    dropped.append(reason)
    return None


def _content(
    message: dict[str, Any], where: str, path: Path, line: int, dropped: list[str]
) -> tuple[str, str | None]:
    """A message's text and the thinking of its content parts (None: no thinking part);
    parts that are neither are counted in ``dropped``."""
    content = message.get("content")
    if content is None or isinstance(content, str):
        return content or "", None
    if not isinstance(content, list):
        raise _fail(path, line, f"{where}.content must be a string or a list of parts, "
                                f"not {type(content).__name__}")  # fmt: skip
    texts: list[str] = []
    thoughts: list[str] = []
    for part_no, part in enumerate(content):
        part_where = f"{where}.content[{part_no}]"
        if isinstance(part, str):
            texts.append(part)
            continue
        if not isinstance(part, dict):
            raise _fail(path, line, f"{part_where} must be a string or an object")
        kind = part.get("type", "text")
        if kind in TEXT_PART_TYPES or kind in THINKING_PART_TYPES:
            key = "text" if kind in TEXT_PART_TYPES else str(kind)
            value = part.get(key, part.get("text"))
            if not isinstance(value, str):
                raise _fail(path, line, f"{part_where}.{key} must be a string")
            (texts if kind in TEXT_PART_TYPES else thoughts).append(value)
        else:
            dropped.append("non_text_part")
    return "".join(texts), "\n\n".join(thoughts) if thoughts else None


def _thinking_field(message: dict[str, Any], where: str, path: Path, line: int) -> str | None:
    """The thinking an assistant message gives in a field of its own, if any."""
    for key in THINKING_FIELDS:
        value = message.get(key)
        if value is None or value == "":
            continue
        if not isinstance(value, str):
            raise _fail(path, line, f"{where}.{key} must be a string, not {type(value).__name__}")
        return value
    return None


def with_thinking(thinking: str, answer: str) -> str:
    """An assistant turn whose thinking was given apart, laid out as Qwen3's chat template
    lays out ``reasoning_content``: ``<think>\\nTHINKING\\n</think>\\n\\nANSWER``."""
    return f"{THINK_START}\n{thinking.strip(chr(10))}\n{THINK_END}\n\n{answer.lstrip(chr(10))}"


def _message(message: object, where: str, path: Path, line: int, dropped: list[str]) -> Turn | None:
    """One ``role``/``content`` message as a turn, or None if it is left out (counted)."""
    if not isinstance(message, dict):
        raise _fail(path, line, f"{where} must be an object, not {type(message).__name__}")
    if "role" not in message:
        raise _fail(path, line, f"{where}: missing field 'role'")
    role = _role(message["role"], where, path, line, dropped)
    if role is None:
        return None
    text, part_thinking = _content(message, where, path, line, dropped)
    if role != "assistant":
        return Turn(role, text, where)
    field_thinking = _thinking_field(message, where, path, line)
    thinking = field_thinking if field_thinking is not None else part_thinking
    if message.get("tool_calls") or message.get("function_call"):
        dropped.append("tool_call")
        if not text and thinking is None:
            return None  # nothing but the call: counted once, as the call
    if thinking is not None:
        if THINK_START in text or THINK_END in text:
            given = next((k for k in THINKING_FIELDS if message.get(k)), "thinking part")
            raise _fail(path, line, f"{where} has its thinking in '{given}' and <think> in "
                                    "its content; give the thinking in one place")  # fmt: skip
        text = with_thinking(thinking, text)
    return Turn(role, text, where)


def _sharegpt_turn(
    turn: object, where: str, path: Path, line: int, dropped: list[str]
) -> Turn | None:
    """One ``from``/``value`` turn (or a ``role``/``content`` message) of ``conversations``."""
    if isinstance(turn, dict) and "from" not in turn and "role" in turn:
        return _message(turn, where, path, line, dropped)
    name = _field(turn, "from", path, line)
    value = _field(turn, "value", path, line)
    if not isinstance(value, str):
        raise _fail(path, line, f"{where}.value must be a string")
    role = _role(name, where, path, line, dropped)
    return None if role is None else Turn(role, value, where)


def _kept(turns: list[Turn | None], dropped: list[str]) -> list[Turn]:
    """The turns laid out: empty ones are left out (counted), but for an empty last
    assistant turn, kept as the bare assistant marker."""
    present = [turn for turn in turns if turn is not None]
    kept = []
    for i, turn in enumerate(present):
        if not turn.text and not (turn.role == "assistant" and i == len(present) - 1):
            dropped.append("empty_message")
        else:
            kept.append(turn)
    return kept


def _conversation_trace(
    record: dict[str, Any], key: Literal["conversations", "messages"], domain: str,
    path: Path, line: int,
) -> Trace:  # fmt: skip
    items = record[key]
    if not isinstance(items, list) or not items:
        raise _fail(path, line, f"field '{key}' must be a non-empty list")
    dropped: list[str] = []
    read = _sharegpt_turn if key == "conversations" else _message
    turns = _kept([read(item, f"{key}[{i}]", path, line, dropped)
                   for i, item in enumerate(items)], dropped)  # fmt: skip
    return _trace(turns, dropped, key, domain, path, line)


def _trace(
    turns: list[Turn], dropped: list[str], kind: TraceKind, domain: str, path: Path, line: int
) -> Trace:
    """A trace of ``turns``; it must hold a user turn and an assistant turn."""
    prompt = next((turn.text for turn in turns if turn.role == "user"), None)
    response = next((turn.text for turn in turns if turn.role == "assistant"), None)
    if prompt is None or response is None:
        names = ("from: human|user", "from: gpt|assistant") if kind == "conversations" else (
            "role: user", "role: assistant")  # fmt: skip
        raise _fail(path, line, f"field '{kind}' needs a user turn ({names[0]}) and an "
                                f"assistant turn ({names[1]})")  # fmt: skip
    one_exchange = [turn.role for turn in turns] == ["user", "assistant"]
    return Trace(line, prompt, response, domain, kind=kind,
                 turns=() if one_exchange else tuple(turns), dropped=tuple(dropped))  # fmt: skip


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
        return _conversation_trace(record, "conversations", domain, path, line)
    if "messages" in record:
        return _conversation_trace(record, "messages", domain, path, line)
    if "prompt" in record or "response" in record:
        prompt = _string(record, "prompt", path, line)
        response = _string(record, "response", path, line)
        system = _string(record, "system", path, line) if "system" in record else ""
        if not system:
            return Trace(line, prompt, response, domain, kind="prompt_response")
        turns = (Turn("system", system, "system"), Turn("user", prompt, "prompt"),
                 Turn("assistant", response, "response"))  # fmt: skip
        return Trace(line, prompt, response, domain, kind="prompt_response", turns=turns)
    if "text" in record:
        text = _string(record, "text", path, line)
        if not text:
            raise CorpusError(f"{path}:{line}: field 'text' must be a non-empty string")
        return Trace(line, "", "", domain, kind="text", text=text)
    raise CorpusError(
        f"{path}:{line}: the record matches no corpus format: it needs field 'conversations', "
        "field 'messages', fields 'prompt' and 'response', or field 'text'"
    )


def dropped_counts(traces: Sequence[Trace]) -> dict[str, int]:
    """How many parts of the traces were left out, by reason (``DROP_REASONS``)."""
    counts = Counter(reason for trace in traces for reason in trace.dropped)
    return {reason: counts[reason] for reason in DROP_REASONS if counts[reason]}


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
    """The layout of a trace as (text, region) pieces, and whether a thinking is
    unterminated (``<think>`` without ``</think>``).

    Conversation, message and prompt/response records are laid out turn by turn in
    ``chat_format``; a plain text record is one ``text`` piece whatever the chat format, a
    pre-formatted one is split at its markers (see the module docstring). Pieces may be
    empty strings. Errors name ``path`` and the record's line (only the line without
    ``path``).
    """
    if trace.kind == "text":
        return _text_segments(trace, chat_format, path)
    layout = _layout(chat_format)
    _check_no_turn_markers(trace, path)
    pieces: list[tuple[str, str]] = [(layout.bos, "bos")] if layout.bos is not None else []
    unterminated = False
    before: Role | None = None
    for turn in trace.chat_turns():
        marker = layout.marker(before, turn.role)
        if marker[0]:
            pieces.append(marker)
        if turn.role == "assistant":
            response, cut = response_segments(turn.text)
            pieces += response
            unterminated = unterminated or cut
        else:
            pieces.append((turn.text, "question"))
        before = turn.role
    return pieces, unterminated


def response_segments(response: str) -> tuple[list[tuple[str, str]], bool]:
    """An assistant turn's pieces: answer, think start, thinking, think end, answer; and
    whether its thinking is unterminated. The one place that finds the thinking."""
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


def _turn_fields(trace: Trace) -> list[tuple[str, str]]:
    if trace.turns:
        return [(f"field '{turn.where}' (a {turn.role} turn)" if trace.kind == "prompt_response"
                 else f"{turn.where} (a {turn.role} turn)", turn.text)
                for turn in trace.turns]  # fmt: skip
    if trace.kind in ("conversations", "messages"):
        return [
            (f"the user turn of field '{trace.kind}'", trace.prompt),
            (f"the assistant turn of field '{trace.kind}'", trace.response),
        ]
    return [("field 'prompt'", trace.prompt), ("field 'response'", trace.response)]


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
    response, unterminated = response_segments(text[assistant_at + len(assistant) :])
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
            needed = marker_specials(text)
            if region not in ("think_start", "think_end"):  # as a whole, as before
                needed = tuple(dict.fromkeys((*self._layout.specials, *needed)))
            self._check(needed)
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


def marker_specials(marker: str) -> tuple[str, ...]:
    """The special strings a marker piece relies on, each to be one token."""
    if marker in (THINK_START, THINK_END):
        return (marker,)
    return tuple(special for special in MARKER_SPECIALS if special in marker)


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
    return layout_summary(traces, chat_format, path)[0]


def layout_summary(
    traces: Sequence[Trace], chat_format: str, path: Path | None = None
) -> tuple[frozenset[str], tuple[str, ...]]:
    """:func:`check_layouts`'s regions, and the special strings the corpus's markers rely
    on (``<think>`` and ``</think>`` included where used), in a fixed order."""
    if not traces:
        raise CorpusError(f"{path or 'the corpus'}: holds no traces")
    _layout(chat_format)
    _check_one_kind(traces, path)
    regions: set[str] = set()
    markers: set[str] = set()
    for trace in traces:
        pieces, _ = segments(trace, chat_format=chat_format, path=path)
        regions.update(region for text, region in pieces if text)
        markers.update(text for text, region in pieces if text and region in MARKER_REGIONS)
    used = {special for marker in markers for special in marker_specials(marker)}
    order = (*MARKER_SPECIALS, THINK_START, THINK_END)
    return frozenset(regions), tuple(special for special in order if special in used)


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
            thinkings: list[tuple[int, int, int]] = []  # (start, kept tokens, all tokens)
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
                    thinkings.append((len(ids), len(piece_ids), total))
                ids.extend(piece_ids)
                codes.append(REGION_CODE[region])
                counts.append(len(piece_ids))
            regions = np.repeat(np.asarray(codes, dtype=np.int8), counts)
            bins = np.full(len(ids), -1, dtype=np.int8)
            for think_start, think_count, think_total in thinkings:
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
        dropped=dropped_counts(traces),
    )
