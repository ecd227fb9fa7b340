"""The prompts an intervention is measured on, laid out for generation.

A prompts file is JSONL in the corpus formats (``docs/corpus.md``); only the question is
used:

- ``{"conversations": [{"from": "human", "value": PROMPT}, ...]}``: the first user turn;
- ``{"prompt": PROMPT}`` (a ``response`` is allowed and ignored);
- ``{"text": TEXT}``: the text as is, already laid out (generation continues it).

An optional ``answer`` string is the reference the last ``\\boxed{}`` of a response is
compared with; ``id`` names the record (else its line number). Conversation and prompt
records are laid out in the run's chat format with the thinking opened, as the model
saw its training traces: ``<｜begin▁of▁sentence｜><｜User｜>PROMPT<｜Assistant｜><think>\\n``
for ``deepseek``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from adapters.errors import UserError
from collectors.corpus import CHAT_LAYOUTS, THINK_START, USER_ROLES


@dataclass(frozen=True)
class Prompt:
    id: str
    text: str
    """The prompt laid out, ready to be continued."""
    reference: str | None = None


def lay_out(question: str, chat_format: str) -> str:
    """The question in the chat format, the assistant's thinking opened."""
    layout = CHAT_LAYOUTS[chat_format]
    before = "".join(text for text, _ in layout.before_prompt)
    after = "".join(text for text, _ in layout.after_prompt)
    return f"{before}{question}{after}{THINK_START}\n"


def _question(record: dict[str, object], where: str) -> tuple[str, bool]:
    """The record's question and whether it still needs the chat layout."""
    if "conversations" in record:
        turns = record["conversations"]
        if not isinstance(turns, list):
            raise UserError(f"{where}: 'conversations' must be a list of turns")
        for turn in turns:
            if isinstance(turn, dict) and turn.get("from") in USER_ROLES:
                value = turn.get("value")
                if not isinstance(value, str) or not value.strip():
                    raise UserError(f"{where}: the user turn's 'value' must be a non-empty string")
                return value, True
        raise UserError(f"{where}: 'conversations' has no user turn (from: human or user)")
    for key, needs_layout in (("prompt", True), ("text", False)):
        if key in record:
            value = record[key]
            if not isinstance(value, str) or not value.strip():
                raise UserError(f"{where}: '{key}' must be a non-empty string")
            return value, needs_layout
    raise UserError(f"{where}: a prompt record needs 'conversations', 'prompt' or 'text'")


def read_prompts(path: Path, chat_format: str, limit: int | None = None) -> list[Prompt]:
    """The file's prompts, in order; every malformed record is one error naming the file,
    the line and the field."""
    if not path.is_file():
        raise UserError(f"{path}: no such prompts file")
    prompts: list[Prompt] = []
    seen: set[str] = set()
    with path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{where}: not JSON ({exc.msg})") from exc
            if not isinstance(record, dict):
                raise UserError(f"{where}: a record must be a JSON object")
            question, needs_layout = _question(record, where)
            reference = record.get("answer")
            if reference is not None and not isinstance(reference, str):
                raise UserError(f"{where}: 'answer' must be a string")
            name = str(record.get("id", f"line-{number}"))
            if name in seen:
                raise UserError(f"{where}: id {name!r} appears twice")
            seen.add(name)
            text = lay_out(question, chat_format) if needs_layout else question
            prompts.append(Prompt(name, text, reference))
            if limit is not None and len(prompts) >= limit:
                break
    if not prompts:
        raise UserError(f"{path}: no prompts")
    return prompts


def prompts_hash(prompts: list[Prompt]) -> str:
    digest = hashlib.sha256()
    for p in prompts:
        digest.update(json.dumps([p.id, p.text, p.reference]).encode())
    return digest.hexdigest()[:16]
