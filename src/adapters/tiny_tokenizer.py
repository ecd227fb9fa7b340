"""A byte-level BPE tokenizer trained locally (the ``tokenizers`` library) for tiny models."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any


def train_bpe_tokenizer(
    texts: Iterable[str],
    special_tokens: Sequence[str],
    vocab_size: int,
    bos_token: str,
    eos_token: str,
    pad_token: str,
    extra_special_tokens: Sequence[str] = (),
) -> Any:
    """Train a byte-level BPE on ``texts``; returns a ``PreTrainedTokenizerFast``.

    Special tokens get the first ids, in order (``special_tokens`` then
    ``extra_special_tokens``, repeats dropped), and are never split. The extra ones let one
    tokenizer serve several chat formats, e.g. the Qwen markers ``<|im_start|>``,
    ``<|im_end|>`` and ``<|endoftext|>`` next to the DeepSeek ones (``QWEN_SPECIAL_TOKENS`` in
    ``collectors.corpus``).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = list(dict.fromkeys([*special_tokens, *extra_special_tokens]))

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=bos_token,
        eos_token=eos_token,
        pad_token=pad_token,
        additional_special_tokens=[
            t for t in specials if t not in (bos_token, eos_token, pad_token)
        ],
    )
