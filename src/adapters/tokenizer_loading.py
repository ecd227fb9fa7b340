"""Loading a model's tokenizer as its folder saved it.

A folder with a ``tokenizer.json`` is loaded from that file as saved, with the special
tokens and chat template of its ``tokenizer_config.json`` (``PreTrainedTokenizerFast``).
``AutoTokenizer`` in transformers 5 does not always: for some model types (``qwen2``
among them) it picks the tokenizer class from ``config.json``'s ``model_type`` whatever
``tokenizer_config.json`` names, and that class rebuilds the tokenizer from the vocabulary
with its own split pattern and normaliser. A byte-level BPE then encodes most texts
differently from the tokenizer that was saved, and a non-BPE one (Unigram, WordLevel)
is garbled. A folder without ``tokenizer.json`` (a SentencePiece model only, say) is left
to ``AutoTokenizer``.

A hub id is downloaded (its tokenizer files only) and loaded the same way.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from adapters.errors import CheckpointError

log = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_FILES = ("*.json", "*.model", "*.txt", "*.tiktoken", "*.jinja")
_HOW_TO_FIX = "pass --tokenizer PATH_OR_ID (the folder or hub id of the model's tokenizer)"


def tokenizer_folder(path_or_id: str | Path) -> Path:
    """A local folder as is; a hub id (``owner/name``) has its tokenizer files downloaded."""
    local = Path(path_or_id).expanduser()
    if local.exists():
        if not local.is_dir():
            raise CheckpointError(
                f"{local}: a tokenizer must be a folder, not a file; {_HOW_TO_FIX}"
            )
        return local
    name = str(path_or_id)
    if name.count("/") != 1 or name.startswith((".", "/")):
        raise CheckpointError(f"{name}: no such tokenizer folder; {_HOW_TO_FIX}")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=name, allow_patterns=list(TOKENIZER_FILES)))
    except Exception as exc:  # the hub client raises many types; all mean "not reachable"
        raise CheckpointError(
            f"{name}: not a local folder, and downloading its tokenizer from the hub failed: {exc}"
        ) from exc


def load_tokenizer(path_or_id: str | Path) -> Any:
    """The tokenizer of a folder or hub id: ``tokenizer.json`` as saved where there is one
    (see the module docstring), else what ``AutoTokenizer`` makes of the folder."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    folder = tokenizer_folder(path_or_id)
    try:
        if (folder / TOKENIZER_FILE).is_file():
            tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
        else:
            tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as exc:  # transformers and tokenizers raise many types for a bad file
        raise CheckpointError(
            f"{folder}: the tokenizer could not be loaded ({exc}); {_HOW_TO_FIX}"
        ) from exc
    log.info("%s: loaded the tokenizer as %s", folder, type(tokenizer).__name__)
    return tokenizer
