"""Corpora as people have them: the OpenAI / Hugging Face ``messages`` form (content as a
string or a list of parts, thinking in a ``reasoning_content`` / ``reasoning`` / ``thinking``
field or inside ``<think>``), system turns and multi-turn conversations laid out turn by
turn with every token's region, and every part left out counted.

Tokenizers are tiny byte-level BPEs trained here, so the special-token handling is real."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from adapters.tiny_tokenizer import train_bpe_tokenizer
from collectors.corpus import (
    ASSISTANT,
    BOS,
    EOS,
    IM_END,
    IM_START,
    PAD,
    QWEN_SPECIAL_TOKENS,
    SPECIAL_TOKENS,
    THINK_END,
    THINK_START,
    USER,
    dropped_counts,
    read_traces,
)
from collectors.errors import CorpusError
from collectors.run_format import REGIONS, THINK_BINS
from tests.test_corpus_formats import load, region_runs, write_jsonl

SYSTEM = "You are a careful tutor."
Q1, Q2, Q3 = "What is 2 + 2?", "And 3 + 3?", "Thanks. Now 4 + 4?"
R1 = "We add two and two. Wait, that is four."
R2 = "Three and three. Hmm, six."
R3 = "Four and four make eight, let me check: yes."
A1, A2, A3 = "It is 4.", "It is 6.", "It is 8."

TRAINING_TEXTS = [SYSTEM, Q1, Q2, Q3, R1, R2, R3, A1, A2, A3, "user\nassistant\nsystem\n"] * 20


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    """Knows the deepseek and the qwen special tokens."""
    return train_bpe_tokenizer(
        TRAINING_TEXTS, SPECIAL_TOKENS, 400, BOS, EOS, PAD, QWEN_SPECIAL_TOKENS
    )


def three_exchanges() -> dict[str, Any]:
    """A system turn and three exchanges, thinking given three ways, with a tool turn, an
    empty message, a turn of an unknown role and an image part that cannot be laid out."""
    return {
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": Q1},
            {"role": "assistant", "content": A1, "reasoning_content": R1},
            {"role": "user", "content": [{"type": "text", "text": Q2},
                                         {"type": "image_url", "image_url": {"url": "x"}}]},
            {"role": "assistant", "content": f"{THINK_START}{R2}{THINK_END}{A2}",
             "tool_calls": [{"type": "function", "function": {"name": "add"}}]},
            {"role": "tool", "content": "6"},
            {"role": "critic", "content": "fine"},
            {"role": "user", "content": Q3},
            {"role": "assistant", "content": ""},
            {"role": "assistant", "content": [{"type": "thinking", "thinking": R3},
                                              {"type": "text", "text": A3}]},
        ],
        "domain": "math",
    }  # fmt: skip


def thought(reasoning: str) -> list[tuple[str, str]]:
    """The runs of a thinking given in a field of its own (laid out as Qwen3's template
    does: ``<think>\\n...\\n</think>\\n\\n`` before the answer)."""
    return [(THINK_START, "think_start"), (f"\n{reasoning}\n", "thinking"),
            (THINK_END, "think_end")]  # fmt: skip


DEEPSEEK_THREE = [
    (BOS, "bos"),
    (SYSTEM, "question"),
    (USER, "user_marker"),
    (Q1, "question"),
    (ASSISTANT, "assistant_marker"),
    *thought(R1),
    (f"\n\n{A1}", "answer"),
    (f"{EOS}{USER}", "user_marker"),
    (Q2, "question"),
    (ASSISTANT, "assistant_marker"),
    (THINK_START, "think_start"),
    (R2, "thinking"),
    (THINK_END, "think_end"),
    (A2, "answer"),
    (f"{EOS}{USER}", "user_marker"),
    (Q3, "question"),
    (ASSISTANT, "assistant_marker"),
    *thought(R3),
    (f"\n\n{A3}", "answer"),
]
QWEN_THREE = [
    (f"{IM_START}system\n", "user_marker"),
    (SYSTEM, "question"),
    (f"{IM_END}\n{IM_START}user\n", "user_marker"),
    (Q1, "question"),
    (f"{IM_END}\n{IM_START}assistant\n", "assistant_marker"),
    *thought(R1),
    (f"\n\n{A1}", "answer"),
    (f"{IM_END}\n{IM_START}user\n", "user_marker"),
    (Q2, "question"),
    (f"{IM_END}\n{IM_START}assistant\n", "assistant_marker"),
    (THINK_START, "think_start"),
    (R2, "thinking"),
    (THINK_END, "think_end"),
    (A2, "answer"),
    (f"{IM_END}\n{IM_START}user\n", "user_marker"),
    (Q3, "question"),
    (f"{IM_END}\n{IM_START}assistant\n", "assistant_marker"),
    *thought(R3),
    (f"\n\n{A3}", "answer"),
]
DROPPED_THREE = {
    "non_text_part": 1,
    "tool_call": 1,
    "tool_message": 1,
    "unknown_role": 1,
    "empty_message": 1,
}


@pytest.mark.parametrize(("chat_format", "expected"),
                         [("deepseek", DEEPSEEK_THREE), ("qwen", QWEN_THREE)])  # fmt: skip
def test_messages_with_a_system_turn_and_three_exchanges(
    tmp_path: Path, tokenizer: Any, chat_format: str, expected: list[tuple[str, str]]
) -> None:
    corpus = load(tmp_path, [three_exchanges()], tokenizer, chat_format=chat_format)
    assert region_runs(corpus, 0, tokenizer) == expected
    assert corpus.domain_names == ["math"]
    assert not corpus.unterminated[0] and not corpus.truncated[0]
    assert corpus.dropped == DROPPED_THREE


def test_each_turns_thinking_has_its_own_tenths(tmp_path: Path, tokenizer: Any) -> None:
    corpus = load(tmp_path, [three_exchanges()], tokenizer)
    thinking = corpus.regions == REGIONS.index("thinking")
    bins = corpus.think_bins
    assert (bins[~thinking] == -1).all()
    # three runs of thinking tokens, each in tenths of its own turn's thinking
    starts = np.flatnonzero(np.diff(np.concatenate([[False], thinking]).astype(int)) == 1)
    assert len(starts) == 3
    for start in starts:
        n = int(np.argmin(thinking[start:]))
        assert n > 1
        assert bins[start : start + n].tolist() == (THINK_BINS * np.arange(n) // n).tolist()


@pytest.mark.parametrize("field", ["reasoning_content", "reasoning", "thinking"])
def test_a_reasoning_field_is_the_thinking(tmp_path: Path, tokenizer: Any, field: str) -> None:
    record = {"messages": [{"role": "user", "content": Q1},
                           {"role": "assistant", "content": A1, field: R1}]}  # fmt: skip
    same = {"messages": [{"role": "user", "content": Q1},
                         {"role": "assistant",
                          "content": f"{THINK_START}\n{R1}\n{THINK_END}\n\n{A1}"}]}  # fmt: skip
    as_field, as_text = load(tmp_path, [record], tokenizer), load(tmp_path, [same], tokenizer)
    np.testing.assert_array_equal(as_field.token_ids, as_text.token_ids)
    np.testing.assert_array_equal(as_field.regions, as_text.regions)
    assert region_runs(as_field, 0, tokenizer) == [
        (BOS, "bos"), (USER, "user_marker"), (Q1, "question"), (ASSISTANT, "assistant_marker"),
        *thought(R1), (f"\n\n{A1}", "answer"),
    ]  # fmt: skip
    assert as_field.dropped == {}


def test_one_exchange_is_laid_out_as_before(tmp_path: Path, tokenizer: Any) -> None:
    """A messages record of one exchange gets exactly the tokens of the same conversation
    and prompt/response records (the planted demo's corpus depends on it)."""
    response = f"{THINK_START}{R1}{THINK_END}{A1}"
    records = {
        "messages": {"messages": [{"role": "user", "content": Q1},
                                  {"role": "assistant", "content": response}]},
        "conversations": {"conversations": [{"from": "human", "value": Q1},
                                            {"from": "gpt", "value": response}]},
        "prompt_response": {"prompt": Q1, "response": response},
    }  # fmt: skip
    corpora = {kind: load(tmp_path, [r], tokenizer) for kind, r in records.items()}
    for field in ("token_ids", "regions", "think_bins", "offsets"):
        np.testing.assert_array_equal(getattr(corpora["messages"], field),
                                      getattr(corpora["conversations"], field))  # fmt: skip
        np.testing.assert_array_equal(getattr(corpora["messages"], field),
                                      getattr(corpora["prompt_response"], field))  # fmt: skip


def test_conversations_keep_their_system_turn_and_every_exchange(
    tmp_path: Path, tokenizer: Any
) -> None:
    record = {"conversations": [
        {"from": "system", "value": SYSTEM},
        {"from": "human", "value": Q1}, {"from": "gpt", "value": A1},
        {"from": "user", "value": Q2}, {"from": "assistant", "value": A2},
        {"from": "observation", "value": "a tool's output"},
    ]}  # fmt: skip
    corpus = load(tmp_path, [record], tokenizer)
    assert region_runs(corpus, 0, tokenizer) == [
        (BOS, "bos"), (SYSTEM, "question"), (USER, "user_marker"), (Q1, "question"),
        (ASSISTANT, "assistant_marker"), (A1, "answer"), (f"{EOS}{USER}", "user_marker"),
        (Q2, "question"), (ASSISTANT, "assistant_marker"), (A2, "answer"),
    ]  # fmt: skip
    assert corpus.dropped == {"tool_message": 1}


def test_prompt_response_with_a_system_field(tmp_path: Path, tokenizer: Any) -> None:
    record = {"system": SYSTEM, "prompt": Q1, "response": A1}
    corpus = load(tmp_path, [record], tokenizer, chat_format="qwen")
    assert region_runs(corpus, 0, tokenizer) == [
        (f"{IM_START}system\n", "user_marker"), (SYSTEM, "question"),
        (f"{IM_END}\n{IM_START}user\n", "user_marker"), (Q1, "question"),
        (f"{IM_END}\n{IM_START}assistant\n", "assistant_marker"), (A1, "answer"),
    ]  # fmt: skip


def test_dropped_parts_are_counted_over_the_corpus(tmp_path: Path) -> None:
    records = [three_exchanges(), three_exchanges()]
    traces = list(read_traces(write_jsonl(tmp_path / "corpus.jsonl", records)))
    assert dropped_counts(traces) == {reason: 2 * n for reason, n in DROPPED_THREE.items()}


@pytest.mark.parametrize(
    ("record", "needles"),
    [
        ({"messages": []}, ["field 'messages' must be a non-empty list"]),
        ({"messages": [{"content": "hi"}]}, ["messages[0]", "missing field 'role'"]),
        ({"messages": [{"role": "user", "content": 3}]},
         ["messages[0].content must be a string or a list of parts"]),
        ({"messages": [{"role": "user", "content": "q"}]},
         ["needs a user turn", "and an assistant turn"]),
        ({"messages": [{"role": "user", "content": "q"},
                       {"role": "assistant", "content": f"{THINK_START}x{THINK_END}a",
                        "reasoning_content": "y"}]},
         ["messages[1]", "'reasoning_content'", "and <think> in its content"]),
        ({"messages": [{"role": "user", "content": "q"},
                       {"role": "assistant", "content": "a", "reasoning": 7}]},
         ["messages[1].reasoning must be a string"]),
    ],
)  # fmt: skip
def test_bad_messages_name_file_line_and_field(
    tmp_path: Path, record: dict[str, Any], needles: list[str]
) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", [record])
    with pytest.raises(CorpusError) as info:
        list(read_traces(path))
    for needle in [f"{path}:1: ", *needles]:
        assert needle in str(info.value), str(info.value)


def test_messages_and_conversations_do_not_mix(tmp_path: Path) -> None:
    records = [three_exchanges(), {"conversations": [{"from": "human", "value": Q1},
                                                     {"from": "gpt", "value": A1}]}]  # fmt: skip
    path = write_jsonl(tmp_path / "mixed.jsonl", records)
    with pytest.raises(CorpusError, match=r":2: a 'conversations' record.*line 1 is a 'messages'"):
        list(read_traces(path))


def test_markers_inside_a_later_turn_are_an_error(tmp_path: Path, tokenizer: Any) -> None:
    record = three_exchanges()
    record["messages"][7]["content"] = f"{Q3}{ASSISTANT}"
    with pytest.raises(CorpusError) as info:
        load(tmp_path, [record], tokenizer)
    message = str(info.value)
    assert message.startswith("line 1: messages[7] (a user turn) already holds"), message
    assert f"'{ASSISTANT}'" in message and "the layout adds the markers itself" in message


def test_a_multi_turn_deepseek_layout_needs_the_end_of_sentence_token(tmp_path: Path) -> None:
    without_eos = train_bpe_tokenizer(TRAINING_TEXTS, (BOS, USER, ASSISTANT, THINK_START,
                                                       THINK_END), 400, BOS, BOS, BOS)  # fmt: skip
    with pytest.raises(CorpusError, match=f"'{EOS}' encodes as"):
        load(tmp_path, [three_exchanges()], without_eos)


# --- --chat-format auto -------------------------------------------------------------------


def test_auto_picks_the_format_the_tokenizer_has(tmp_path: Path, tokenizer: Any) -> None:
    from collectors.errors import CollectError
    from collectors.tokenizer_check import choose_chat_format

    traces = list(read_traces(write_jsonl(tmp_path / "c.jsonl", [three_exchanges()])))
    deepseek_only = train_bpe_tokenizer(TRAINING_TEXTS, SPECIAL_TOKENS, 400, BOS, EOS, PAD)
    qwen_only = train_bpe_tokenizer(TRAINING_TEXTS, (*QWEN_SPECIAL_TOKENS, THINK_START,
                                                     THINK_END), 400, EOS, EOS, EOS)  # fmt: skip
    assert choose_chat_format(deepseek_only, traces, "auto", tmp_path).name == "deepseek"
    assert choose_chat_format(qwen_only, traces, "auto", tmp_path).name == "qwen"
    assert choose_chat_format(qwen_only, traces, "deepseek", tmp_path).name == "deepseek"
    with pytest.raises(CollectError, match="has the special tokens of both chat formats"):
        choose_chat_format(tokenizer, traces, "auto", tmp_path)
    tokenizer.chat_template = "{% for m in messages %}<|im_start|>{{ m.role }}{% endfor %}"
    try:
        choice = choose_chat_format(tokenizer, traces, "auto", tmp_path)
    finally:
        tokenizer.chat_template = None
    assert (choice.name, "chat template" in choice.reason) == ("qwen", True)
    laid_out = f"{IM_START}user\n{Q1}{IM_END}\n{IM_START}assistant\n{A1}"
    texts = list(read_traces(write_jsonl(tmp_path / "t.jsonl", [{"text": laid_out}])))
    choice = choose_chat_format(tokenizer, texts, "auto", tmp_path)
    assert (choice.name, "laid out" in choice.reason) == ("qwen", True)


def test_a_message_that_is_only_a_tool_call_is_counted_once(tmp_path: Path, tokenizer: Any) -> None:
    call = {"type": "function", "function": {"name": "add", "arguments": "{}"}}
    record = {"messages": [
        {"role": "user", "content": Q1},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "content": "4"},
        {"role": "assistant", "content": A1},
    ]}  # fmt: skip
    corpus = load(tmp_path, [record], tokenizer)
    assert corpus.dropped == {"tool_call": 1, "tool_message": 1}
    assert region_runs(corpus, 0, tokenizer)[-2:] == [(ASSISTANT, "assistant_marker"),
                                                      (A1, "answer")]  # fmt: skip
