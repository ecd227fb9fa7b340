"""``labeler make-adapter``: a random adapter of one's own shape, to try the pipeline."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from labeler.cli.app import check_output, cli, console
from labeler.errors import UserError

TINY = "a tiny BPE trained on built-in text"


@cli.command("make-adapter")
@click.option("--out", type=click.Path(path_type=Path), required=True,
              help="The checkpoint folder to write (an existing one only with "
                   "--overwrite).")  # fmt: skip
@click.option("--like", "like", metavar="HUB_ID_OR_PATH", default=None,
              help="Take the architecture and shape from this model's config.json, and its "
                   "tokenizer when it has one; no weights are downloaded.")  # fmt: skip
@click.option("--arch", type=click.Choice(["qwen2", "llama"]), default=None,
              help="The architecture [default: qwen2, or --like's].")  # fmt: skip
@click.option("--layers", "n_layers", type=int, default=None,
              help="Decoder layers [default: 4, or --like's].")  # fmt: skip
@click.option("--d-model", type=int, default=None,
              help="Hidden size [default: 128, or --like's].")  # fmt: skip
@click.option("--intermediate", type=int, default=None,
              help="MLP width [default: 4 x --d-model, or --like's].")  # fmt: skip
@click.option("--heads", type=int, default=None,
              help="Attention heads [default: --d-model / 64 (at least 1), or "
                   "--like's].")  # fmt: skip
@click.option("--kv-heads", type=int, default=None,
              help="Key-value heads [default: half the heads (at least 1), or "
                   "--like's].")  # fmt: skip
@click.option("--features-per-layer", "n_features", default=512, show_default=True,
              help="Adapter features per layer (the paper's: 8192).")  # fmt: skip
@click.option("--l0", default=4.0, show_default=True,
              help="Active features per token per layer the adapter is calibrated to.")  # fmt: skip
@click.option("--vocab-size", default=2048, show_default=True,
              help="Size of the tiny tokenizer trained when --like gives none.")  # fmt: skip
@click.option("--chat-format", type=click.Choice(["deepseek", "qwen"]), default="deepseek",
              show_default=True,
              help="The chat markers of the tiny tokenizer (not used with --like's).")  # fmt: skip
@click.option("--seed", default=0, show_default=True, help="Seeds the weights.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out folder.")
def make_adapter(
    out: Path, like: str | None, arch: str | None, n_layers: int | None, d_model: int | None,
    intermediate: int | None, heads: int | None, kv_heads: int | None, n_features: int,
    l0: float, vocab_size: int, chat_format: str, seed: int, overwrite: bool,
) -> None:  # fmt: skip
    """Write a transcoder-adapter checkpoint with random weights, of a shape you choose,
    for trying the pipeline on a model of your own shape: not for real labels (its
    features mean nothing).

    \b
    The folder loads with `labeler collect --adapter DIR` like a released checkpoint.
    Its adapter is calibrated so that about --l0 features fire per token per layer.
    With --like, the shape (and the tokenizer, when the folder or hub id has one) is
    that model's; options given override it. Without a tokenizer, a tiny byte-level BPE
    is trained on built-in reasoning traces, with the markers of --chat-format.
    Examples:
      labeler make-adapter --out trial --arch llama --layers 3 --d-model 96
      labeler make-adapter --out trial --like deepseek-ai/DeepSeek-R1-Distill-Qwen-7B --layers 2
    """
    from dataclasses import replace

    from adapters.random_adapter import n_parameters, trial_shape

    check_output(out, overwrite)
    for name, value in (("--layers", n_layers), ("--d-model", d_model),
                        ("--intermediate", intermediate), ("--heads", heads),
                        ("--kv-heads", kv_heads), ("--features-per-layer", n_features),
                        ("--vocab-size", vocab_size)):  # fmt: skip
        if value is not None and value < 1:
            raise UserError(f"{name} {value}: must be at least 1")
    if l0 <= 0:
        raise UserError(f"--l0 {l0}: must be positive")
    like_shape, like_folder = _like_shape(like) if like else (None, None)
    shape = trial_shape(like_shape, arch=arch, n_layers=n_layers, d_model=d_model,
                        intermediate=intermediate, n_heads=heads, n_kv_heads=kv_heads,
                        n_features=n_features)  # fmt: skip
    _check_heads(shape)
    tokenizer, source = _tokenizer(like_folder, vocab_size, chat_format)
    copied = source != TINY  # a model's tokenizer: its config's vocabulary, at least
    shape = replace(shape, vocab_size=max(shape.vocab_size if copied else 0, len(tokenizer)))
    n = n_parameters(shape)
    console.print(f"{shape.arch}: {shape.n_layers} layers x {shape.d_model} (MLP "
                  f"{shape.intermediate}, {shape.n_heads} heads, {shape.n_kv_heads} key-value), "
                  f"{shape.n_features} features a layer, vocabulary {shape.vocab_size:,}; "
                  f"{n:,} parameters ({4 * n / 1e9:.2f} GB in float32)")  # fmt: skip
    from adapters.random_adapter import make_trial_adapter

    with console.status("building and calibrating the random adapter"):
        make_trial_adapter(out, shape, tokenizer, l0, seed, source)
    console.print(f"wrote {out} (tokenizer: {source}); random weights, for trying the "
                  "pipeline, not for real labels. Next:")  # fmt: skip
    console.print(f"  labeler collect --adapter {out} --corpus CORPUS.jsonl --out RUN",
                  markup=False, highlight=False)  # fmt: skip


def _like_shape(like: str) -> tuple[Any, Path]:
    """The shape in ``like``'s config.json, and the folder it was read from (a hub id's
    json and tokenizer files are downloaded, not its weights)."""
    from adapters.random_adapter import shape_from_config
    from adapters.tokenizer_loading import tokenizer_folder

    folder = tokenizer_folder(like)
    path = folder / "config.json"
    if not path.is_file():
        raise UserError(f"{like}: no config.json; --like needs a model folder or hub id")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON ({exc.msg})") from exc
    if not isinstance(raw, dict):
        raise UserError(f"{path}: must hold a JSON object")
    return shape_from_config(raw, str(path)), folder


def _check_heads(shape: Any) -> None:
    if shape.d_model % shape.n_heads or (shape.d_model // shape.n_heads) % 2:
        raise UserError(f"--d-model {shape.d_model}, --heads {shape.n_heads}: the heads must "
                        "divide the hidden size into an even head size")  # fmt: skip
    if shape.n_heads % shape.n_kv_heads:
        raise UserError(f"--heads {shape.n_heads}, --kv-heads {shape.n_kv_heads}: the key-value "
                        "heads must divide the heads")  # fmt: skip


def _tokenizer(folder: Path | None, vocab_size: int, chat_format: str) -> tuple[Any, str]:
    """The model folder's tokenizer where it has one, else the tiny trained BPE."""
    from adapters.random_adapter import tiny_tokenizer
    from adapters.tokenizer_loading import load_tokenizer

    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    if folder is not None and any((folder / name).is_file() for name in names):
        return load_tokenizer(folder), str(folder)
    with console.status("training a tiny tokenizer"):
        return tiny_tokenizer(vocab_size, chat_format), TINY
