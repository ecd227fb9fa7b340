"""``intervene --prompts`` reads the corpus's ``messages`` form as ``collect`` does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from labeler.causal.prompts import lay_out, read_prompts
from labeler.errors import USER_ERRORS


def _write(path: Path, records: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_a_messages_record_gives_its_first_user_turn(tmp_path: Path) -> None:
    prompts = _write(tmp_path / "p.jsonl", [
        {"id": "a", "answer": "4", "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": [{"type": "text", "text": "What is 2+2?"}]},
            {"role": "assistant", "content": "4", "reasoning_content": "2+2=4"},
            {"role": "user", "content": "And 3+3?"},
        ]},
        {"messages": [{"role": "user", "content": "Name a prime."}]},
    ])  # fmt: skip
    read = read_prompts(prompts, "deepseek")
    assert [p.id for p in read] == ["a", "line-2"]
    assert read[0].text == lay_out("What is 2+2?", "deepseek")
    assert read[0].reference == "4"
    assert read[1].text == lay_out("Name a prime.", "deepseek")


@pytest.mark.parametrize(
    ("messages", "needle"),
    [
        ([{"role": "assistant", "content": "hi"}], "has no user turn"),
        ([{"content": "hi"}], "missing field 'role'"),
        ("hi", "'messages' must be a list"),
    ],
)
def test_a_bad_messages_record_is_one_clear_error(
    messages: object, needle: str, tmp_path: Path
) -> None:
    prompts = _write(tmp_path / "p.jsonl", [{"messages": messages}])
    with pytest.raises(USER_ERRORS) as info:
        read_prompts(prompts, "deepseek")
    assert f"{prompts}:1" in str(info.value) and needle in str(info.value), str(info.value)
