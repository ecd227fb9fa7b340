"""Corpus formats (conversations, prompt/response, text, pre-formatted text), chat layouts
(deepseek, qwen), regions, think bins, truncation, and the errors for bad records, chat
markers in the wrong place and tokenizers.

Tokenizers are tiny byte-level BPEs trained here, so the special-token handling is real."""

from __future__ import annotations

import itertools
import json
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
    LONG_PIECE_CHARS_PER_TOKEN,
    LONG_PIECE_MIN_CHARS,
    PAD,
    QWEN_SPECIAL_TOKENS,
    SPECIAL_TOKENS,
    THINK_END,
    THINK_START,
    USER,
    TokenizedCorpus,
    Trace,
    _count_tokens,
    check_layouts,
    read_traces,
    segments,
    tokenize_traces,
)
from collectors.errors import CorpusError
from collectors.run_format import REGIONS, THINK_BINS

PROMPT = "What is 2 + 2? Answer in one word."
THINKING = (
    "\nWe add two and two. Wait, let me check: 2 + 2 = 4. Hmm, that is right. "
    "Actually, four is the answer, so we say four and stop thinking now.\n"
)
RESPONSE = f"Sure. {THINK_START}{THINKING}{THINK_END}\nThe answer is four."
TEXT = "Plain web text about cats, with <think> in it, and no chat layout at all."

TRAINING_TEXTS = [PROMPT, THINKING, RESPONSE, TEXT, "user\nassistant\n"] * 20


def _train(specials: tuple[str, ...], extra: tuple[str, ...] = ()) -> Any:
    return train_bpe_tokenizer(TRAINING_TEXTS, specials, 400, BOS, EOS, PAD, extra)


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    """Knows the deepseek and the qwen special tokens."""
    return _train(SPECIAL_TOKENS, QWEN_SPECIAL_TOKENS)


@pytest.fixture(scope="module")
def deepseek_tokenizer() -> Any:
    """Knows the deepseek special tokens only."""
    return _train(SPECIAL_TOKENS)


def conversation(prompt: str, response: str, **extra: Any) -> dict[str, Any]:
    turns = [{"from": "human", "value": prompt}, {"from": "gpt", "value": response}]
    return {"conversations": turns, **extra}


def write_jsonl(path: Path, records: list[dict[str, Any] | str | None]) -> Path:
    """One line per entry: a record as JSON, a string as is, None as a blank line."""
    lines = ["" if r is None else r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def load(
    tmp_path: Path,
    records: list[dict[str, Any] | str | None],
    tokenizer: Any,
    max_length: int = 4096,
    chat_format: str = "deepseek",
    name: str = "corpus.jsonl",
) -> TokenizedCorpus:
    traces = list(read_traces(write_jsonl(tmp_path / name, records)))
    return tokenize_traces(traces, tokenizer, max_length, chat_format=chat_format)


def region_runs(corpus: TokenizedCorpus, i: int, tokenizer: Any) -> list[tuple[str, str]]:
    """Sequence ``i`` as (decoded text, region) runs of consecutive tokens of one region."""
    start, end = int(corpus.offsets[i]), int(corpus.offsets[i + 1])
    regions = corpus.regions[start:end]
    cuts = [0, *(np.flatnonzero(np.diff(regions)) + 1).tolist(), end - start]
    return [
        (
            tokenizer.decode(
                corpus.token_ids[start + a : start + b].tolist(),
                skip_special_tokens=False,
                clean_up_tokenization_spaces=False,
            ),
            REGIONS[regions[a]],
        )
        for a, b in itertools.pairwise(cuts)
    ]


def single_id(tokenizer: Any, text: str) -> int:
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) == 1
    return int(ids[0])


# --- layouts and regions ------------------------------------------------------------------


DEEPSEEK_RUNS = [
    (BOS, "bos"),
    ("<｜User｜>", "user_marker"),
    (PROMPT, "question"),
    ("<｜Assistant｜>", "assistant_marker"),
    ("Sure. ", "answer"),
    (THINK_START, "think_start"),
    (THINKING, "thinking"),
    (THINK_END, "think_end"),
    ("\nThe answer is four.", "answer"),
]
QWEN_RUNS = [
    (f"{IM_START}user\n", "user_marker"),
    (PROMPT, "question"),
    (f"{IM_END}\n{IM_START}assistant\n", "assistant_marker"),
    *DEEPSEEK_RUNS[4:],
]


def test_conversation_regions_deepseek(tmp_path: Path, tokenizer: Any) -> None:
    corpus = load(tmp_path, [conversation(PROMPT, RESPONSE, domain="math")], tokenizer)
    assert region_runs(corpus, 0, tokenizer) == DEEPSEEK_RUNS
    assert corpus.token_ids[0] == single_id(tokenizer, BOS)
    assert corpus.domain_names == ["math"]
    assert not corpus.truncated[0] and not corpus.unterminated[0]


def test_conversation_regions_qwen(tmp_path: Path, tokenizer: Any) -> None:
    corpus = load(tmp_path, [conversation(PROMPT, RESPONSE)], tokenizer, chat_format="qwen")
    assert region_runs(corpus, 0, tokenizer) == QWEN_RUNS
    assert corpus.token_ids[0] == single_id(tokenizer, IM_START)
    assert REGIONS.index("bos") not in corpus.regions
    assert single_id(tokenizer, BOS) not in corpus.token_ids


@pytest.mark.parametrize("chat_format", ["deepseek", "qwen"])
def test_segments_match_tokenized_regions(tmp_path: Path, tokenizer: Any, chat_format: str) -> None:
    corpus = load(tmp_path, [conversation(PROMPT, RESPONSE)], tokenizer, chat_format=chat_format)
    trace = Trace(line=1, prompt=PROMPT, response=RESPONSE, domain="unknown")
    pieces, unterminated = segments(trace, chat_format=chat_format)
    assert not unterminated
    assert region_runs(corpus, 0, tokenizer) == [(t, r) for t, r in pieces if t]


def test_segments_default_is_deepseek() -> None:
    trace = Trace(line=1, prompt=PROMPT, response=RESPONSE, domain="unknown")
    assert segments(trace) == segments(trace, chat_format="deepseek")
    assert segments(trace)[0][0] == (BOS, "bos")


@pytest.mark.parametrize("chat_format", ["deepseek", "qwen"])
def test_prompt_response_equals_conversation(
    tmp_path: Path, tokenizer: Any, chat_format: str
) -> None:
    responses = [RESPONSE, "no thinking here", f"{THINK_START}cut off", ""]
    conv = load(
        tmp_path,
        [conversation(PROMPT, r, domain="math") for r in responses],
        tokenizer,
        chat_format=chat_format,
        name="conv.jsonl",
    )
    pr = load(
        tmp_path,
        [{"prompt": PROMPT, "response": r, "domain": "math"} for r in responses],
        tokenizer,
        chat_format=chat_format,
        name="pr.jsonl",
    )
    for field in ("token_ids", "regions", "think_bins", "offsets", "domains", "unterminated"):
        np.testing.assert_array_equal(getattr(conv, field), getattr(pr, field), err_msg=field)
    assert conv.domain_names == pr.domain_names == ["math"]


def test_text_records(tmp_path: Path, tokenizer: Any) -> None:
    records: list[dict[str, Any] | str | None] = [
        {"text": TEXT, "domain": "web"},
        None,
        {"text": "Second."},
    ]
    corpus = load(tmp_path, records, tokenizer, chat_format="qwen")
    assert corpus.n_sequences == 2
    assert region_runs(corpus, 0, tokenizer) == [(TEXT, "text")]
    assert region_runs(corpus, 1, tokenizer) == [("Second.", "text")]
    assert (corpus.regions == REGIONS.index("text")).all()
    assert (corpus.think_bins == -1).all()
    assert single_id(tokenizer, BOS) not in corpus.token_ids
    assert not corpus.unterminated.any()
    assert corpus.domain_names == ["unknown", "web"]
    assert corpus.domains.tolist() == [1, 0]
    trace = next(read_traces(tmp_path / "corpus.jsonl"))
    assert (trace.kind, trace.text, trace.line) == ("text", TEXT, 1)
    assert segments(trace, chat_format="qwen") == ([(TEXT, "text")], False)


def test_format_is_decided_by_key_order(tmp_path: Path) -> None:
    records: list[dict[str, Any] | str | None] = [
        {**conversation("p", "r"), "prompt": "x", "response": "y", "text": "z"},
        {"prompt": "p", "response": "r", "text": "z"},
        {"text": "z", "domain": "web"},
    ]
    kinds = []
    for i, record in enumerate(records):
        path = write_jsonl(tmp_path / f"{i}.jsonl", [record])
        kinds.append([(t.kind, t.prompt, t.response) for t in read_traces(path)])
    assert kinds == [
        [("conversations", "p", "r")],
        [("prompt_response", "p", "r")],
        [("text", "", "")],
    ]


def test_text_corpus_needs_no_chat_specials(tmp_path: Path, deepseek_tokenizer: Any) -> None:
    corpus = load(tmp_path, [{"text": TEXT}], deepseek_tokenizer, chat_format="qwen")
    assert region_runs(corpus, 0, deepseek_tokenizer) == [(TEXT, "text")]


def test_unterminated_thinking_is_kept(tmp_path: Path, tokenizer: Any) -> None:
    cut = f"{THINK_START}{THINKING}"
    corpus = load(tmp_path, [conversation(PROMPT, cut), conversation(PROMPT, RESPONSE)], tokenizer)
    assert region_runs(corpus, 0, tokenizer)[-2:] == [
        (THINK_START, "think_start"),
        (THINKING, "thinking"),
    ]
    assert corpus.unterminated.tolist() == [True, False]
    assert corpus.n_unterminated_think == 1
    assert corpus.n_truncated == 0


# --- think bins and truncation ------------------------------------------------------------


def thinking_bins(corpus: TokenizedCorpus, i: int) -> np.ndarray:
    seq = slice(int(corpus.offsets[i]), int(corpus.offsets[i + 1]))
    thinking = corpus.regions[seq] == REGIONS.index("thinking")
    assert ((corpus.think_bins[seq] >= 0) == thinking).all()
    bins: np.ndarray = corpus.think_bins[seq][thinking]
    return bins


def test_think_bins(tmp_path: Path, tokenizer: Any) -> None:
    corpus = load(tmp_path, [conversation(PROMPT, RESPONSE)], tokenizer)
    assert corpus.think_bins.dtype == np.int8
    bins = thinking_bins(corpus, 0)
    n = len(bins)
    assert n >= THINK_BINS
    assert (np.diff(bins) >= 0).all()
    assert set(bins.tolist()) == set(range(THINK_BINS))
    np.testing.assert_array_equal(bins, THINK_BINS * np.arange(n) // n)


def test_truncation_keeps_bins_of_the_whole_thinking(tmp_path: Path, tokenizer: Any) -> None:
    records: list[dict[str, Any] | str | None] = [conversation(PROMPT, RESPONSE)] * 2
    full = load(tmp_path, records, tokenizer, name="full.jsonl")
    full_bins = thinking_bins(full, 0)
    length = int(full.lengths()[0])
    thinking_at = int(np.flatnonzero(full.regions == REGIONS.index("thinking"))[0])
    max_length = thinking_at + len(full_bins) // 2  # cut in the middle of the thinking
    cut = load(tmp_path, records, tokenizer, max_length=max_length, name="cut.jsonl")
    assert cut.lengths().tolist() == [max_length, max_length] and length > max_length
    assert cut.truncated.tolist() == [True, True] and cut.n_truncated == 2
    for i in range(2):
        np.testing.assert_array_equal(cut.sequence(i), full.sequence(0)[:max_length])
        bins = thinking_bins(cut, i)
        assert len(bins) == len(full_bins) // 2
        np.testing.assert_array_equal(bins, full_bins[: len(bins)])
        assert bins.max() < THINK_BINS // 2  # relative to the whole thinking, not the kept half
    assert not cut.unterminated.any()  # cut by truncation is not unterminated


def test_batch_and_one_by_one_encoding_agree(tmp_path: Path, tokenizer: Any) -> None:
    class EncodeOnly:
        """A tokenizer with ``encode`` only: the slow path."""

        def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
            return list(tokenizer.encode(text, add_special_tokens=add_special_tokens))

    path = write_jsonl(
        tmp_path / "c.jsonl", [conversation(f"{PROMPT} {i}", RESPONSE) for i in range(300)]
    )
    traces = list(read_traces(path))
    fast = tokenize_traces(traces, tokenizer, 60, chat_format="qwen")
    slow = tokenize_traces(traces, EncodeOnly(), 60, chat_format="qwen")
    for field in ("token_ids", "regions", "think_bins", "offsets", "truncated"):
        np.testing.assert_array_equal(getattr(fast, field), getattr(slow, field), err_msg=field)


# --- errors -------------------------------------------------------------------------------


def test_mixed_formats_name_both_lines(tmp_path: Path) -> None:
    records: list[dict[str, Any] | str | None] = [
        conversation(PROMPT, RESPONSE),
        *[None] * 5,
        {"text": TEXT},
    ]
    path = write_jsonl(tmp_path / "mixed.jsonl", records)
    with pytest.raises(CorpusError) as info:
        list(read_traces(path))
    message = str(info.value)
    assert f"{path}:7" in message and "line 1" in message
    assert "'conversations'" in message and "'text'" in message


def test_conversations_and_prompt_response_do_not_mix(tmp_path: Path) -> None:
    records: list[dict[str, Any] | str | None] = [
        {"prompt": PROMPT, "response": RESPONSE},
        conversation(PROMPT, RESPONSE),
    ]
    path = write_jsonl(tmp_path / "mixed.jsonl", records)
    with pytest.raises(CorpusError, match=r"'conversations'.*line 1.*'prompt_response'"):
        list(read_traces(path))


@pytest.mark.parametrize(
    ("record", "needles"),
    [
        ({"prompt": 3, "response": "r"}, ["'prompt'", "string", "int"]),
        ({"prompt": "p", "response": None}, ["'response'", "string"]),
        ({"prompt": "p"}, ["missing field 'response'"]),
        ({"response": "r"}, ["missing field 'prompt'"]),
        ({"text": ["a"]}, ["'text'", "string", "list"]),
        ({"text": ""}, ["'text'", "non-empty"]),
        ({"text": "t", "domain": ""}, ["'domain'", "non-empty string"]),
        ({"prompt": "p", "response": "r", "domain": 7}, ["'domain'", "non-empty string"]),
        ({"conversations": "hi"}, ["'conversations'", "non-empty list"]),
        (
            {"conversations": [{"from": "human", "value": 1}]},
            ["conversations[0].value must be a string"],
        ),
        ({"conversations": [{"value": "v"}]}, ["missing field 'from'"]),
        ({"conversations": [{"from": "gpt", "value": "v"}]}, ["needs a user turn"]),
        ({"question": "q", "answer": "a"}, ["matches no corpus format", "'conversations'"]),
        ("[1, 2]", ["JSON object", "list"]),
        ("{not json", ["not valid JSON"]),
    ],
)
def test_bad_records_name_file_line_and_field(
    tmp_path: Path, record: dict[str, Any] | str, needles: list[str]
) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", [None, record])
    with pytest.raises(CorpusError) as info:
        list(read_traces(path))
    for needle in [f"{path}:2", *needles]:
        assert needle in str(info.value)


def test_missing_file_and_empty_corpus(tmp_path: Path, tokenizer: Any) -> None:
    with pytest.raises(CorpusError, match="not found"):
        list(read_traces(tmp_path / "nope.jsonl"))
    traces = list(read_traces(write_jsonl(tmp_path / "empty.jsonl", [None, None])))
    with pytest.raises(CorpusError, match="no traces"):
        tokenize_traces(traces, tokenizer, 100)


def test_tokenizer_without_qwen_specials(tmp_path: Path, deepseek_tokenizer: Any) -> None:
    with pytest.raises(CorpusError) as info:
        load(tmp_path, [conversation(PROMPT, RESPONSE)], deepseek_tokenizer, chat_format="qwen")
    message = str(info.value)
    assert "lacks the qwen chat format's special tokens" in message
    assert f"'{IM_START}'" in message and f"'{IM_END}'" in message
    assert "--chat-format deepseek" in message


def test_tokenizer_without_deepseek_specials(tmp_path: Path) -> None:
    qwen_only = _train((*QWEN_SPECIAL_TOKENS, THINK_START, THINK_END, BOS, EOS, PAD))
    records: list[dict[str, Any] | str | None] = [conversation(PROMPT, RESPONSE)]
    with pytest.raises(CorpusError, match=r"lacks the deepseek .*--chat-format qwen"):
        load(tmp_path, records, qwen_only)
    corpus = load(tmp_path, records, qwen_only, chat_format="qwen")
    assert region_runs(corpus, 0, qwen_only) == QWEN_RUNS


def test_think_markers_checked_only_when_used(tmp_path: Path) -> None:
    no_think = _train((*QWEN_SPECIAL_TOKENS, BOS, EOS, PAD))
    plain = load(tmp_path, [conversation(PROMPT, "four")], no_think, chat_format="qwen")
    assert region_runs(plain, 0, no_think)[-1] == ("four", "answer")
    with pytest.raises(CorpusError, match=f"'{THINK_START}' encodes as"):
        load(tmp_path, [conversation(PROMPT, RESPONSE)], no_think, chat_format="qwen")


def test_unknown_chat_format(tmp_path: Path, tokenizer: Any) -> None:
    with pytest.raises(CorpusError, match=r"unknown chat format 'llama'.*deepseek, qwen"):
        load(tmp_path, [conversation(PROMPT, RESPONSE)], tokenizer, chat_format="llama")


def test_extra_special_tokens_are_single_tokens(tokenizer: Any) -> None:
    for special in (*SPECIAL_TOKENS, *QWEN_SPECIAL_TOKENS):
        single_id(tokenizer, special)
    specials = tokenizer.all_special_tokens
    assert all(special in specials for special in QWEN_SPECIAL_TOKENS)
    again = _train(SPECIAL_TOKENS, (BOS, *QWEN_SPECIAL_TOKENS))  # repeats are dropped
    assert again.get_vocab() == tokenizer.get_vocab()


# --- pre-formatted traces and chat markers ------------------------------------------------


def preformatted(prompt: str, response: str, chat_format: str, head: str = "") -> str:
    """A trace laid out by hand in ``chat_format``, as the paper's attribution prompts are."""
    if chat_format == "deepseek":
        return f"{head or BOS}{USER}{prompt}{ASSISTANT}{response}"
    return f"{head}{IM_START}user\n{prompt}{IM_END}\n{IM_START}assistant\n{response}"


PREFORMATTED_RESPONSES = [
    RESPONSE,
    "no thinking here",
    f"{THINK_START}cut off",
    f"{THINKING}{THINK_END} four",
    "",
]


@pytest.mark.parametrize("chat_format", ["deepseek", "qwen"])
def test_preformatted_text_equals_conversation(
    tmp_path: Path, tokenizer: Any, chat_format: str
) -> None:
    conv = load(
        tmp_path,
        [conversation(PROMPT, r, domain="math") for r in PREFORMATTED_RESPONSES],
        tokenizer,
        chat_format=chat_format,
        name="conv.jsonl",
    )
    text = load(
        tmp_path,
        [
            {"text": preformatted(PROMPT, r, chat_format), "domain": "math"}
            for r in PREFORMATTED_RESPONSES
        ],
        tokenizer,
        chat_format=chat_format,
        name="text.jsonl",
    )
    for field in ("token_ids", "regions", "think_bins", "offsets", "domains", "unterminated"):
        np.testing.assert_array_equal(getattr(conv, field), getattr(text, field), err_msg=field)
    assert text.unterminated.tolist() == [False, False, True, False, False]
    assert REGIONS.index("text") not in text.regions
    assert region_runs(text, 0, tokenizer) == region_runs(conv, 0, tokenizer)


def test_preformatted_markers_are_kept_as_written(tmp_path: Path, tokenizer: Any) -> None:
    system = "You are a careful assistant."
    records: list[dict[str, Any] | str | None] = [
        {"text": f"{USER}{PROMPT}{ASSISTANT}four"},  # no BOS: none is added
        {"text": preformatted(PROMPT, "four", "deepseek", head=f"{BOS}{system}")},
    ]
    corpus = load(tmp_path, records, tokenizer)
    assert region_runs(corpus, 0, tokenizer) == [
        (USER, "user_marker"),
        (PROMPT, "question"),
        (ASSISTANT, "assistant_marker"),
        ("four", "answer"),
    ]
    assert region_runs(corpus, 1, tokenizer)[:3] == [
        (BOS, "bos"),
        (system, "question"),
        (USER, "user_marker"),
    ]
    qwen_system = f"{IM_START}system\n{system}{IM_END}\n"
    qwen = load(
        tmp_path,
        [{"text": preformatted(PROMPT, f"four{IM_END}\n", "qwen", head=qwen_system)}],
        tokenizer,
        chat_format="qwen",
        name="qwen.jsonl",
    )
    assert region_runs(qwen, 0, tokenizer) == [
        (qwen_system, "question"),
        (f"{IM_START}user\n", "user_marker"),
        (PROMPT, "question"),
        (f"{IM_END}\n{IM_START}assistant\n", "assistant_marker"),
        (f"four{IM_END}\n", "answer"),  # an end-of-turn marker after the answer is allowed
    ]


def layout_error(tmp_path: Path, records: list[dict[str, Any] | str | None], chat_format: str,
                 tokenizer: Any) -> str:  # fmt: skip
    """The message of the layout error, from the check (with the path) and from tokenizing
    (the line only); both must raise it."""
    path = write_jsonl(tmp_path / "bad.jsonl", records)
    traces = list(read_traces(path))
    with pytest.raises(CorpusError) as checked:
        check_layouts(traces, chat_format, path)
    with pytest.raises(CorpusError) as tokenized:
        tokenize_traces(traces, tokenizer, 4096, chat_format)
    message = str(checked.value)
    assert message.startswith(f"{path}:")
    assert str(tokenized.value).split(": ", 1)[1] == message.split(": ", 1)[1]
    return message


@pytest.mark.parametrize(
    ("record", "chat_format", "needles"),
    [
        (
            {"text": preformatted(PROMPT, RESPONSE, "qwen")},
            "deepseek",
            ["laid out in the qwen chat format", "pass --chat-format qwen"],
        ),
        (
            {"text": preformatted(PROMPT, RESPONSE, "deepseek")},
            "qwen",
            ["laid out in the deepseek chat format", "pass --chat-format deepseek"],
        ),
        (
            {
                "text": preformatted(
                    PROMPT, RESPONSE + preformatted("again", "r", "deepseek"), "deepseek"
                )
            },
            "deepseek",
            ["pre-formatted deepseek trace", "holds them 2 and 2 times", "one user turn"],
        ),
        (
            {"text": f"{BOS}{ASSISTANT}{RESPONSE}{USER}{PROMPT}"},
            "deepseek",
            ["holds the assistant marker first"],
        ),
        (
            {"text": f"{IM_START}user\n{PROMPT}{IM_START}assistant\n{RESPONSE}"},
            "qwen",
            ["holds them 1 and 0 times", repr(f"{IM_END}\n{IM_START}assistant\n")],
        ),
    ],
)
def test_malformed_preformatted_text_names_file_and_line(
    tmp_path: Path,
    tokenizer: Any,
    record: dict[str, Any],
    chat_format: str,
    needles: list[str],
) -> None:
    fine = {"text": preformatted(PROMPT, RESPONSE, chat_format)}
    message = layout_error(tmp_path, [fine, None, record], chat_format, tokenizer)
    for needle in ["bad.jsonl:3: field 'text'", *needles]:
        assert needle in message, message


@pytest.mark.parametrize(
    ("record", "needles"),
    [
        (
            {"prompt": "", "response": preformatted(PROMPT, RESPONSE, "deepseek")},
            [
                "field 'response' already holds the chat marker",
                f"'{BOS}'",
                '{"text": ...} with --chat-format deepseek',
            ],
        ),
        (
            {"prompt": "", "response": preformatted(PROMPT, RESPONSE, "qwen")},
            ["field 'response'", f"'{IM_START}'", "--chat-format qwen"],
        ),
        (
            {"prompt": f"{USER}{PROMPT}", "response": RESPONSE},
            ["field 'prompt'", f"'{USER}'"],
        ),
        (
            conversation(PROMPT, f"{RESPONSE}{ASSISTANT}"),
            ["the assistant turn of field 'conversations'", f"'{ASSISTANT}'"],
        ),
        (
            conversation(preformatted(PROMPT, "", "qwen"), RESPONSE),
            ["the user turn of field 'conversations'", f"'{IM_START}'"],
        ),
    ],
)
def test_chat_markers_inside_a_prompt_or_response_are_an_error(
    tmp_path: Path, tokenizer: Any, record: dict[str, Any], needles: list[str]
) -> None:
    fine = record | (
        {"conversations": conversation(PROMPT, RESPONSE)["conversations"]}
        if "conversations" in record
        else {"prompt": PROMPT, "response": RESPONSE}
    )
    message = layout_error(tmp_path, [fine, record], "deepseek", tokenizer)
    for needle in ["bad.jsonl:2: ", "the layout adds the markers itself", *needles]:
        assert needle in message, message


def test_preformatted_and_plain_text_do_not_mix(tmp_path: Path, tokenizer: Any) -> None:
    records: list[dict[str, Any] | str | None] = [
        {"text": preformatted(PROMPT, RESPONSE, "deepseek")},
        {"text": TEXT},
    ]
    message = layout_error(tmp_path, records, "deepseek", tokenizer)
    assert (
        "bad.jsonl:2: a plain 'text' record, but line 1 is a pre-formatted 'text' record" in message
    )


# --- a very long line is encoded only as far as the sequence keeps it -------------------------


@pytest.mark.parametrize("terminated", [True, False])
def test_a_long_thinking_is_encoded_only_as_far_as_kept(
    tmp_path: Path, tokenizer: Any, terminated: bool
) -> None:
    thinking = THINKING * 8_000  # 1.2 MB, far over 64 characters a token of max_length 64
    assert len(thinking) > 16 * LONG_PIECE_MIN_CHARS
    response = f"{THINK_START}{thinking}" + (f"{THINK_END}\nfour." if terminated else "")
    records: list[dict[str, Any] | str | None] = [
        conversation(PROMPT, response),
        conversation(PROMPT, RESPONSE),
    ]
    whole = load(tmp_path, records, tokenizer, max_length=10**7, name="whole.jsonl")
    kept = load(tmp_path, records, tokenizer, max_length=64, name="kept.jsonl")
    # the same first 64 tokens, regions and tenths as encoding it all, flagged the same way
    np.testing.assert_array_equal(kept.sequence(0), whole.sequence(0)[:64])
    np.testing.assert_array_equal(kept.regions[:64], whole.regions[:64])
    np.testing.assert_array_equal(kept.think_bins[:64], whole.think_bins[:64])
    assert kept.truncated.tolist() == [True, True]
    assert kept.unterminated.tolist() == [not terminated, False]
    # the whole thinking is counted, a chunk at a time, off by at most a token an edge
    n_whole = len(tokenizer.encode(thinking, add_special_tokens=False))
    n_chunks = len(thinking) // (LONG_PIECE_CHARS_PER_TOKEN * 64) + 1
    assert (
        abs(_count_tokens(tokenizer, thinking, 64 * LONG_PIECE_CHARS_PER_TOKEN) - n_whole)
        <= 2 * n_chunks
    )
