"""``labeler collect`` on corpora as people have them, and the chat format checked against
the tokenizer before the model loads: a ``messages`` corpus with a system turn and three
exchanges on the planted demo model, ``--chat-format auto`` (the default) picking the
format from the tokenizer, and a Qwen-format tokenizer refused under ``--chat-format
deepseek`` by a checkpoint whose weights are damaged (so the model was never loaded)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from adapters.tiny_tokenizer import train_bpe_tokenizer
from adapters.tokenizer_loading import load_tokenizer
from collectors.corpus import (
    ENDOFTEXT,
    IM_END,
    IM_START,
    QWEN_SPECIAL_TOKENS,
    THINK_END,
    THINK_START,
    read_traces,
    segments,
    tokenize_traces,
)
from collectors.run_format import REGIONS, RUN_JSON
from collectors.tokenizer_check import choose_chat_format
from tests.conftest import CollectedDemo
from tests.test_bad_input import assert_fails, labeler
from tests.test_chat_messages import (
    A1,
    A2,
    A3,
    DROPPED_THREE,
    Q1,
    Q2,
    Q3,
    R1,
    R2,
    R3,
    SYSTEM,
    region_runs,
    three_exchanges,
)


def write_corpus(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def messages_corpus(folder: Path) -> Path:
    """The three-exchange conversation, and one exchange whose thinking is a
    ``reasoning_content`` field (as DeepSeek's API returns it)."""
    reasoning = {"messages": [{"role": "user", "content": Q2},
                              {"role": "assistant", "content": A1, "reasoning_content": R2}],
                 "domain": "math"}  # fmt: skip
    return write_corpus(folder / "messages.jsonl", [three_exchanges(), reasoning])


def region_text(corpus: Any, i: int, tokenizer: Any, region: str) -> str:
    return "".join(text for text, r in region_runs(corpus, i, tokenizer) if r == region)


def test_collect_a_messages_corpus(collected: CollectedDemo, tmp_path: Path) -> None:
    corpus_path = messages_corpus(tmp_path)
    out = tmp_path / "run"
    result = labeler("collect", "--adapter", collected.paths.checkpoint, "--corpus",
                     corpus_path, "--out", out, "--layers", "0")  # fmt: skip
    assert result.returncode == 0, result.stderr
    stdout = " ".join(result.stdout.split())
    assert "chat format deepseek (auto: the tokenizer has" in stdout, stdout
    assert ("left out 5 parts of the corpus's conversations: 1 unknown_role, 1 tool_message, "
            "1 tool_call, 1 non_text_part, 1 empty_message") in stdout, stdout  # fmt: skip
    # what collect tokenized, as the tokenizer it loads sees it: every turn, its region
    tokenizer = load_tokenizer(collected.paths.checkpoint)
    expected = tokenize_traces(list(read_traces(corpus_path)), tokenizer, 1024)
    question = region_text(expected, 0, tokenizer, "question")
    assert question == f"{SYSTEM}{Q1}{Q2}{Q3}"
    assert region_text(expected, 0, tokenizer, "thinking") == f"\n{R1}\n{R2}\n{R3}\n"
    assert region_text(expected, 0, tokenizer, "answer") == f"\n\n{A1}{A2}\n\n{A3}"
    assert region_text(expected, 1, tokenizer, "thinking") == f"\n{R2}\n"
    assert region_text(expected, 1, tokenizer, "question") == Q2
    info = json.loads((out / RUN_JSON).read_text())
    assert info["params"]["chat_format"] == "deepseek"
    assert info["n_sequences"] == 2 and info["n_tokens"] == expected.n_tokens
    counts = np.bincount(expected.regions, minlength=len(REGIONS))
    by_region = {r: n for r, n in info["tokens_by_region"].items() if n}
    assert by_region == {REGIONS[code]: int(n) for code, n in enumerate(counts) if n}


def test_run_json_counts_the_parts_left_out(collected: CollectedDemo, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = labeler("collect", "--adapter", collected.paths.checkpoint, "--corpus",
                     messages_corpus(tmp_path), "--out", out, "--layers", "0")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads((out / RUN_JSON).read_text())["n_dropped"] == DROPPED_THREE


# --- the chat format against the tokenizer, before the model loads ----------------------------


def qwen_tokenizer(corpus: Path) -> Any:
    """A byte-level BPE with the Qwen markers (and <think>), trained on the demo corpus."""
    texts = [text for trace in read_traces(corpus) for text, _ in segments(trace)[0]]
    return train_bpe_tokenizer(texts, (*QWEN_SPECIAL_TOKENS, THINK_START, THINK_END), 600,
                               ENDOFTEXT, ENDOFTEXT, ENDOFTEXT)  # fmt: skip


@pytest.fixture
def qwen_checkpoint_with_damaged_weights(collected: CollectedDemo, tmp_path: Path) -> Path:
    """The demo checkpoint with a Qwen-format tokenizer and a weights file that cannot be
    read: any attempt to load the model fails."""
    folder = tmp_path / "ckpt"
    shutil.copytree(collected.paths.checkpoint, folder)
    for old in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / old).unlink(missing_ok=True)
    qwen_tokenizer(collected.paths.corpus).save_pretrained(folder)
    weights = folder / "model.safetensors"
    assert weights.is_file()
    weights.write_bytes(b"not safetensors" * 100)
    return folder


def test_a_qwen_tokenizer_is_refused_under_deepseek_before_the_model_loads(
    collected: CollectedDemo, qwen_checkpoint_with_damaged_weights: Path, tmp_path: Path
) -> None:
    folder = qwen_checkpoint_with_damaged_weights
    out = tmp_path / "run"
    result = labeler("collect", "--adapter", folder, "--corpus", collected.paths.corpus,
                     "--out", out, "--chat-format", "deepseek")  # fmt: skip
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert_fails(result, f"error: {folder}: the tokenizer (",
                 "does not have the deepseek chat format's special tokens",
                 f"it has the qwen chat format's ('{IM_START}', '{IM_END}')",
                 "pass --chat-format qwen")  # fmt: skip
    assert "safetensors" not in result.stderr and "could not be loaded" not in result.stderr
    assert not out.exists()


def test_auto_picks_qwen_from_the_tokenizer_then_loads_the_model(
    collected: CollectedDemo, qwen_checkpoint_with_damaged_weights: Path, tmp_path: Path
) -> None:
    """With the default --chat-format auto the same checkpoint passes the chat-format check
    (qwen, said so) and only then fails on its weights."""
    result = labeler("collect", "--adapter", qwen_checkpoint_with_damaged_weights, "--corpus",
                     collected.paths.corpus, "--out", tmp_path / "run")  # fmt: skip
    stdout = " ".join(result.stdout.split())
    assert f"chat format qwen (auto: the tokenizer has '{IM_START}', '{IM_END}'" in stdout
    assert_fails(result, "model.safetensors")


def test_auto_with_a_tokenizer_of_neither_format(collected: CollectedDemo, tmp_path: Path) -> None:
    texts = [text for trace in read_traces(collected.paths.corpus) for text, _ in
             segments(trace)[0]][:200]  # fmt: skip
    plain = train_bpe_tokenizer(texts, ("<s>",), 400, "<s>", "<s>", "<s>")
    plain.name_or_path = "plain"
    traces = list(read_traces(collected.paths.corpus))
    from collectors.errors import CollectError

    with pytest.raises(CollectError) as info:
        choose_chat_format(plain, traces, "auto", collected.paths.corpus)
    message = str(info.value)
    for needle in ("plain: the tokenizer (", "has the special tokens of no chat format",
                   "deepseek: '<｜begin▁of▁sentence｜>' encodes as", "qwen: '<|im_start|>'",
                   "--tokenizer PATH_OR_ID"):  # fmt: skip
        assert needle in message, message
    text_only = list(read_traces(write_corpus(tmp_path / "t.jsonl", [{"text": "So, 2 + 2."}])))
    choice = choose_chat_format(plain, text_only, "auto", tmp_path / "t.jsonl")
    assert "plain text" in choice.reason
