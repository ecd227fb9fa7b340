"""Tokenizers: a checkpoint's tokenizer loads as it was saved (transformers 5 would rebuild
a ``qwen2`` folder's as its own ``Qwen2Tokenizer``), the demo's ground truth is measured on
the ids ``collect`` sees, and ``collect`` refuses a tokenizer that does not give the corpus
text back or lacks the chat format's special tokens. Also ``collect`` on a corpus of
pre-formatted chat texts."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from adapters.branch import load_adapter
from adapters.tokenizer_loading import load_tokenizer
from collectors.corpus import (
    ASSISTANT,
    BOS,
    SPECIAL_TOKENS,
    USER,
    read_traces,
    tokenize_traces,
)
from collectors.demo_model import DemoShape, train_demo_tokenizer
from collectors.run_format import REGIONS, RUN_JSON
from collectors.tokenizer_check import check_tokenizer
from tests.conftest import CollectedDemo
from tests.test_bad_input import assert_fails, collect, labeler

WORDS = ["Write", "a", "function", "that", "adds", "9", "to", "a", "number", ".", "So", "Wait"]


def save_tokenizer(core: Any, folder: Path, config_from: Path, **specials: Any) -> Path:
    """Save a ``tokenizers`` tokenizer as a Hugging Face folder beside a copy of
    ``config_from``'s config.json (a qwen2 model)."""
    from transformers import PreTrainedTokenizerFast

    folder.mkdir(parents=True)
    PreTrainedTokenizerFast(tokenizer_object=core, **specials).save_pretrained(folder)
    shutil.copy(config_from / "config.json", folder / "config.json")
    return folder


def unigram(texts: list[str]) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    core = Tokenizer(models.Unigram())
    core.pre_tokenizer = pre_tokenizers.Metaspace()
    core.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=150, special_tokens=["<unk>"], unk_token="<unk>")
    core.train_from_iterator(texts, trainer=trainer)
    return core


def word_level(specials: tuple[str, ...] = ()) -> Any:
    """A tokenizer that knows a dozen words and maps every other one to [UNK]."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {word: i for i, word in enumerate(dict.fromkeys(["[UNK]", *WORDS]))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.add_special_tokens(list(specials))
    return core


# --- loading ------------------------------------------------------------------------------


def test_demo_ids_are_the_ids_collect_sees(collected: CollectedDemo) -> None:
    """The tokenizer trained in memory and the one collect loads from the saved checkpoint
    give the same ids on every demo trace (transformers 5's Qwen2Tokenizer does not)."""
    traces = list(read_traces(collected.paths.corpus))
    in_memory = tokenize_traces(traces, train_demo_tokenizer(traces, DemoShape()), 1024)
    _, tokenizer, _ = load_adapter(str(collected.paths.checkpoint), "cpu", "float32")
    reloaded = tokenize_traces(traces, tokenizer, 1024)
    for field in ("token_ids", "regions", "think_bins", "offsets"):
        np.testing.assert_array_equal(
            getattr(in_memory, field), getattr(reloaded, field), err_msg=field
        )
    info = json.loads((collected.run / RUN_JSON).read_text())
    assert info["n_tokens"] == in_memory.n_tokens


def test_a_unigram_tokenizer_in_a_qwen2_folder_loads_as_saved(
    collected: CollectedDemo, tmp_path: Path
) -> None:
    from tokenizers import Tokenizer

    texts = [f"{w} {v}" for w in WORDS for v in WORDS]
    folder = save_tokenizer(unigram(texts), tmp_path / "tok", collected.paths.checkpoint,
                            unk_token="<unk>")  # fmt: skip
    assert json.loads((folder / "config.json").read_text())["model_type"] == "qwen2"
    saved = Tokenizer.from_file(str(folder / "tokenizer.json"))
    loaded = load_tokenizer(folder)
    text = "Write a function that adds 9"
    ids = loaded.encode(text, add_special_tokens=False)
    assert ids == saved.encode(text, add_special_tokens=False).ids
    assert loaded.decode(ids) == text


def test_missing_tokenizer_folder_names_the_option(tmp_path: Path) -> None:
    from adapters.errors import CheckpointError

    with pytest.raises(CheckpointError, match=r"nope: no such tokenizer folder; pass --tokenizer"):
        load_tokenizer(str(tmp_path / "nope"))


# --- the check ----------------------------------------------------------------------------


class DropsWord:
    """A real tokenizer whose decode loses one word: a lossy tokenizer on a few texts."""

    def __init__(self, tokenizer: Any, word: str) -> None:
        self.tokenizer, self.word = tokenizer, word
        self.name_or_path = "somewhere"

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: list[int], **kwargs: Any) -> str:
        return str(self.tokenizer.decode(ids, **kwargs)).replace(self.word, "")


def test_check_tolerates_a_few_lossy_pieces_only(collected: CollectedDemo) -> None:
    """One sampled piece in fifty may differ (a rare character a real tokenizer maps to its
    unknown token); more is an error naming the tokenizer, a sample and the way out."""
    from collectors.errors import CollectError

    corpus = collected.paths.corpus
    traces = list(read_traces(corpus))
    tokenizer = load_tokenizer(collected.paths.checkpoint)
    check_tokenizer(tokenizer, traces, "deepseek", corpus)
    one_zebra = [replace(traces[0], prompt=traces[0].prompt + " zebra"), *traces[1:]]
    check_tokenizer(DropsWord(tokenizer, " zebra"), one_zebra, "deepseek", corpus)
    zebras = [replace(t, prompt=t.prompt + " zebra") for t in traces]
    with pytest.raises(CollectError) as info:
        check_tokenizer(DropsWord(tokenizer, " zebra"), zebras, "deepseek", corpus)
    message = str(info.value)
    assert message.startswith("somewhere: the tokenizer (DropsWord) does not give the corpus")
    assert f"{corpus}:1: " in message and "zebra' came back as" in message
    assert message.endswith("--tokenizer PATH_OR_ID (a folder or hub id)")


def test_collect_refuses_a_tokenizer_that_garbles_text(
    collected: CollectedDemo, tmp_path: Path
) -> None:
    folder = save_tokenizer(word_level(SPECIAL_TOKENS), tmp_path / "tok",
                            collected.paths.checkpoint, unk_token="[UNK]",
                            additional_special_tokens=list(SPECIAL_TOKENS))  # fmt: skip
    out = tmp_path / "run"
    result = labeler("collect", "--adapter", collected.paths.checkpoint, "--corpus",
                     collected.paths.corpus, "--out", out, "--tokenizer", folder)  # fmt: skip
    assert result.returncode == 2, result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(
        f"error: {folder}: the tokenizer ({type(load_tokenizer(folder)).__name__})"
    )
    for needle in ("does not give the corpus text back", f"{collected.paths.corpus}:",
                   "[UNK]", "--tokenizer PATH_OR_ID"):  # fmt: skip
        assert needle in line, line
    assert not out.exists()


def test_collect_refuses_a_tokenizer_without_the_chat_specials(
    collected: CollectedDemo, tmp_path: Path
) -> None:
    folder = save_tokenizer(word_level(), tmp_path / "tok", collected.paths.checkpoint,
                            unk_token="[UNK]")  # fmt: skip
    out = tmp_path / "run"
    result = labeler("collect", "--adapter", collected.paths.checkpoint, "--corpus",
                     collected.paths.corpus, "--out", out, "--tokenizer", folder,
                     "--chat-format", "deepseek")  # fmt: skip
    needles = [f"{folder}: the tokenizer (", "deepseek chat format's special tokens",
               f"'{USER}' encodes as", "--tokenizer PATH_OR_ID", "--chat-format qwen"]  # fmt: skip
    assert_fails(result, *needles)
    assert not out.exists()


# --- pre-formatted traces through collect -------------------------------------------------


def test_collect_a_preformatted_corpus(collected: CollectedDemo, tmp_path: Path) -> None:
    """The demo's first traces, laid out by hand, collect with the regions and counts of
    the same traces as prompt/response records."""
    traces = list(read_traces(collected.paths.corpus))[:12]
    pairs = [(t.prompt, t.response, t.domain) for t in traces]
    prompt, response, domain = pairs[-1]
    pairs[-1] = (prompt, response.split("</think>")[0], domain)  # one without </think>
    corpus = tmp_path / "preformatted.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"{BOS}{USER}{p}{ASSISTANT}{r}", "domain": d})
                              + "\n" for p, r, d in pairs))  # fmt: skip
    out = tmp_path / "run"
    result = labeler("collect", "--adapter", collected.paths.checkpoint, "--corpus", corpus,
                     "--out", out, "--layers", "0")  # fmt: skip
    assert result.returncode == 0, result.stderr
    pr = tmp_path / "prompt_response.jsonl"
    pr.write_text("".join(json.dumps({"prompt": p, "response": r, "domain": d}) + "\n"
                          for p, r, d in pairs))  # fmt: skip
    expected = tokenize_traces(
        list(read_traces(pr)), load_tokenizer(collected.paths.checkpoint), 1024
    )
    info = json.loads((out / RUN_JSON).read_text())
    assert info["n_tokens"] == expected.n_tokens
    assert info["n_unterminated_think"] == expected.n_unterminated_think == 1
    counts = np.bincount(expected.regions, minlength=len(REGIONS))
    by_region = {r: n for r, n in info["tokens_by_region"].items() if n}
    assert by_region == {REGIONS[code]: int(n) for code, n in enumerate(counts) if n}
    assert "text" not in by_region and by_region["thinking"] > 0


def test_collect_refuses_a_preformatted_response(collected: CollectedDemo, tmp_path: Path) -> None:
    laid_out = f"{BOS}{USER}2+2?{ASSISTANT}<think>\nWait, 4.\n</think>\n4"
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(json.dumps({"prompt": "", "response": laid_out}) + "\n")
    result = collect(collected.paths.checkpoint, corpus, tmp_path / "run")
    assert_fails(result, f"{corpus}:1: field 'response' already holds the chat marker",
                 '{"text": ...} with --chat-format deepseek')  # fmt: skip
    assert not (tmp_path / "run").exists()
