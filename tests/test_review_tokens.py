"""How tokens read in the review (review.tokens): special tokens by short names, bytes that
are not text on their own as ``<0xE2>``, byte-level pieces as their text."""

from __future__ import annotations

import json
from pathlib import Path

from labeler.review.tokens import Pieces, bytes_text, shown_token, shown_tokens


def test_special_tokens_have_short_names() -> None:
    specials = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜▁pad▁｜>",
                "<|im_start|>", "<|endoftext|>", "<think>", "</think>", "<s>", "</s>"]  # fmt: skip
    assert shown_tokens(specials) == ["‹bos›", "‹eos›", "‹User›", "‹pad›", "‹im_start›",
                                      "‹eos›", "‹think›", "‹/think›", "‹bos›", "‹eos›"]  # fmt: skip
    # pieces of markers read in ASCII (U+FF5C has no glyph in most Latin fonts); markup
    # that is text stays as it is
    assert shown_tokens(["<｜", "｜>", "<script>", "<|"]) == ["<|", "|>", "<script>", "<|"]


def test_fullwidth_forms_read_as_ascii() -> None:
    assert [shown_token(t) for t in ("｜", "＜ｔｈｉｎｋ＞", "ＡＢＣ１２３", "（ok）", "，")] == [
        "|", "<think>", "ABC123", "(ok)", ",",
    ]  # fmt: skip
    # the SentencePiece space (U+2581) and other text are kept; a special token keeps its name
    assert shown_tokens(["▁the", "café", "<｜Assistant｜>"]) == ["▁the", "café", "‹Assistant›"]


def test_byte_level_pieces_read_as_text_and_lone_bytes_as_hex() -> None:
    pieces = ["Ġthe", "Ċ", "âĢĶ", "â", "Ġcaf", "Ã©", "<｜Assistant｜>"]
    assert shown_tokens(pieces) == [" the", "⏎", "—", "<0xE2>", " caf", "é", "‹Assistant›"]
    assert bytes_text(b"a\xe2\x80b\xc3\xa9") == "a<0xE2><0x80>bé"
    # decoded text is not mistaken for pieces: it has spaces, and its Latin letters stay
    assert shown_tokens([" café", "ĠĊ is text here", "ł"]) == [" café", "ĠĊ is text here", "ł"]
    assert shown_tokens(["ı", "ğ", "ş", "ł"]) == ["ı", "ğ", "ş", "ł"]  # a Turkish, Polish lens


def test_a_replacement_character_takes_its_byte_from_the_tokenizer_piece() -> None:
    assert shown_tokens(["\ufffd", " x", "\ufffd"], ["â", "Ġx", "<0x9C>"]) == [
        "<0xE2>", " x", "<0x9C>",
    ]  # fmt: skip
    assert shown_tokens(["\ufffd"]) == ["\ufffd"]  # no tokenizer at hand: nothing to tell
    assert shown_tokens(["\ufffd"], [None]) == ["\ufffd"]


def test_control_and_invisible_characters_are_named() -> None:
    assert [shown_token(t) for t in ("\x1f", "\x00", "\x7f", "\t", "a\nb", "\u200b", "\x85")] == [
        "<0x1F>", "<0x00>", "<0x7F>", "⇥", "a⏎b", "<U+200B>", "<U+0085>",
    ]  # fmt: skip


def test_pieces_come_from_a_tokenizer_json_or_not_at_all(tmp_path: Path) -> None:
    (tmp_path / "bpe").mkdir()
    (tmp_path / "bpe" / "tokenizer.json").write_text(json.dumps({
        "model": {"type": "BPE", "vocab": {"!": 0, "â": 1, "Ġx": 2}},
        "added_tokens": [{"id": 3, "content": "<｜begin▁of▁sentence｜>"}],
    }))  # fmt: skip
    pieces = Pieces.near(str(tmp_path / "bpe"))
    assert pieces and pieces.of([1, 2, 3, 99]) == ["â", "Ġx", "<｜begin▁of▁sentence｜>", None]
    (tmp_path / "unigram").mkdir()
    (tmp_path / "unigram" / "tokenizer.json").write_text(
        json.dumps({"model": {"type": "Unigram", "vocab": [["<unk>", 0], ["<0xE2>", -1.0]]}})
    )
    assert Pieces.near(str(tmp_path / "unigram")).get(1) == "<0xE2>"
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "tokenizer.json").write_text("{not json")
    assert not Pieces.near(str(tmp_path / "broken"))
    assert not Pieces.near(str(tmp_path / "nowhere"))
    assert not Pieces.near("org/a-hub-id") and not Pieces.near("")
