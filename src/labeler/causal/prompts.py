"""The prompts an intervention is measured on, laid out for generation.

A prompts file is JSONL in the corpus formats (``docs/corpus.md``); only the question is
used:

- ``{"conversations": [{"from": "human", "value": PROMPT}, ...]}``: the first user turn;
- ``{"messages": [{"role": "user", "content": PROMPT}, ...]}`` (the OpenAI / Hugging Face
  form, ``content`` a string or a list of text parts): the first user message; system
  messages and later turns are not part of a prompt;
- ``{"prompt": PROMPT}`` (a ``response`` is allowed and ignored);
- ``{"text": TEXT}``: the text as is, already laid out (generation continues it).

An optional ``answer`` string is the reference the last ``\\boxed{}`` of a response is
compared with; ``id`` names the record (else its line number). Conversation and prompt
records are laid out in the run's chat format with the thinking opened, as the model
saw its training traces: ``<｜begin▁of▁sentence｜><｜User｜>PROMPT<｜Assistant｜><think>\\n``
for ``deepseek``.

The file is checked as ``labeler collect`` checks a corpus (``collectors.corpus``), with
the same errors: every line must be UTF-8, a question to be laid out must not hold a chat
marker already, and a text laid out already must be laid out in the run's chat format. A
prompt must also leave room in the model's context for the response
(:func:`check_lengths`): a longer one would be generated past the positions the model
knows, or not at all for lack of memory.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from collectors.corpus import (
    CHAT_LAYOUTS,
    LONG_PIECE_CHARS_PER_TOKEN,
    THINK_START,
    USER_ROLES,
    Trace,
    TraceKind,
    _decode_line,
    _message,
    segments,
)
from labeler.errors import UserError


@dataclass(frozen=True)
class Prompt:
    id: str
    text: str
    """The prompt laid out, ready to be continued."""
    reference: str | None = None
    line: int = 0
    """The record's line in the prompts file."""


def lay_out(question: str, chat_format: str) -> str:
    """The question in the chat format, the assistant's thinking opened."""
    layout = CHAT_LAYOUTS[chat_format]
    before = "".join(text for text, _ in layout.before_prompt)
    after = "".join(text for text, _ in layout.after_prompt)
    return f"{before}{question}{after}{THINK_START}\n"


def _question(record: dict[str, object], where: str) -> tuple[str, TraceKind]:
    """The record's question and its corpus format (all but ``text`` still need the
    chat layout)."""
    if "conversations" in record:
        turns = record["conversations"]
        if not isinstance(turns, list):
            raise UserError(f"{where}: 'conversations' must be a list of turns")
        for turn in turns:
            if isinstance(turn, dict) and turn.get("from") in USER_ROLES:
                value = turn.get("value")
                if not isinstance(value, str) or not value.strip():
                    raise UserError(f"{where}: the user turn's 'value' must be a non-empty string")
                return value, "conversations"
        raise UserError(f"{where}: 'conversations' has no user turn (from: human or user)")
    if "messages" in record:
        return _first_user_message(record["messages"], where), "messages"
    formats: tuple[tuple[str, TraceKind], ...] = (("prompt", "prompt_response"), ("text", "text"))
    for key, kind in formats:
        if key in record:
            value = record[key]
            if not isinstance(value, str) or not value.strip():
                raise UserError(f"{where}: '{key}' must be a non-empty string")
            return value, kind
    raise UserError(
        f"{where}: a prompt record needs 'conversations', 'messages', 'prompt' or 'text'"
    )


def _first_user_message(messages: object, where: str) -> str:
    """The text of the first ``role: user`` message, read as ``collect`` reads messages."""
    if not isinstance(messages, list):
        raise UserError(f"{where}: 'messages' must be a list of messages")
    path, _, line = where.rpartition(":")
    for i, message in enumerate(messages):
        turn = _message(message, f"messages[{i}]", Path(path), int(line), [])
        if turn is not None and turn.role == "user":
            if not turn.text.strip():
                raise UserError(f"{where}: the user message's 'content' must be non-empty text")
            return turn.text
    raise UserError(f"{where}: 'messages' has no user turn (role: user)")


def _check_layout(question: str, kind: TraceKind, chat_format: str, path: Path, line: int) -> None:
    """Collect's layout checks on the question: no chat marker in a question to be laid
    out, and a laid-out text in the run's chat format."""
    if kind == "text":
        trace = Trace(line, "", "", "unknown", kind="text", text=question)
    else:
        trace = Trace(line, question, "", "unknown", kind=kind)
    segments(trace, chat_format=chat_format, path=path)


def _prompt(record: object, chat_format: str, path: Path, line: int) -> Prompt:
    where = f"{path}:{line}"
    if not isinstance(record, dict):
        raise UserError(f"{where}: a record must be a JSON object")
    question, kind = _question(record, where)
    _check_layout(question, kind, chat_format, path, line)
    reference = record.get("answer")
    if reference is not None and not isinstance(reference, str):
        raise UserError(f"{where}: 'answer' must be a string")
    name = str(record.get("id", f"line-{line}"))
    text = question if kind == "text" else lay_out(question, chat_format)
    return Prompt(name, text, reference, line)


def read_prompts(path: Path, chat_format: str, limit: int | None = None) -> list[Prompt]:
    """The file's prompts, in order; every malformed record is one error naming the file,
    the line and the field."""
    if not path.is_file():
        raise UserError(f"{path}: no such prompts file")
    prompts: list[Prompt] = []
    seen: set[str] = set()
    with path.open("rb") as fh:
        for number, raw in enumerate(fh, 1):
            line = _decode_line(raw, path, number)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{number}: not JSON ({exc.msg})") from exc
            prompt = _prompt(record, chat_format, path, number)
            if prompt.id in seen:
                raise UserError(f"{path}:{number}: id {prompt.id!r} appears twice")
            seen.add(prompt.id)
            prompts.append(prompt)
            if limit is not None and len(prompts) >= limit:
                break
    if not prompts:
        raise UserError(f"{path}: no prompts")
    return prompts


def _count_tokens(tokenizer: Any, text: str, cap: int) -> tuple[int, bool]:
    """The tokens of ``text`` and whether that count is exact. Only a head of the text
    long enough for ``cap`` tokens is encoded first, so a prompt of megabytes is
    refused as cheaply as a short one; a count above ``cap`` from the head alone is a
    lower bound."""
    head = text[: (cap + 1) * LONG_PIECE_CHARS_PER_TOKEN]
    n = len(tokenizer.encode(head, add_special_tokens=False))
    if len(head) == len(text):
        return n, True
    if n > cap + 1:  # one token more for a word the cut may have split
        return n - 1, False
    return len(tokenizer.encode(text, add_special_tokens=False)), True


def check_lengths(
    prompts: list[Prompt], tokenizer: Any, context: int, max_new_tokens: int, path: Path
) -> None:
    """Refuse a prompt that leaves no room for ``max_new_tokens`` in the model's
    ``context``: one line naming the file, the line and the lengths."""
    room = context - max_new_tokens
    if room < 1:
        raise UserError(f"--max-new-tokens {max_new_tokens}: the model's context is {context:,} "
                        "tokens, prompt and response together; lower it")  # fmt: skip
    for prompt in prompts:
        n, exact = _count_tokens(tokenizer, prompt.text, room)
        if n > room:
            size = f"{n:,} tokens" if exact else f"at least {n:,} tokens"
            raise UserError(
                f"{path}:{prompt.line}: the prompt is {size} laid out, and with "
                f"--max-new-tokens {max_new_tokens} that is beyond the model's context of "
                f"{context:,} tokens; shorten the prompt or lower --max-new-tokens"
            )


def prompts_hash(prompts: list[Prompt]) -> str:
    digest = hashlib.sha256()
    for p in prompts:
        digest.update(json.dumps([p.id, p.text, p.reference]).encode())
    return digest.hexdigest()[:16]
