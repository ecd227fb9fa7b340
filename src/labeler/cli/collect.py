"""``labeler collect``, ``merge-runs`` and ``import``: making run folders."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from labeler.cli.app import (
    _layers,
    check_output,
    cli,
    console,
)
from labeler.errors import UserError


def _load_source(
    adapter_path: str, params: Any, device: str, dtype: str, tokenizer: str | None = None
) -> Any:
    """The model to collect from: the adapter, or with ``params.neurons`` a plain model;
    ``tokenizer`` (a folder or hub id) replaces the checkpoint's own tokenizer."""
    if params.neurons is not None:
        from collectors.neurons import load_neuron_model

        return load_neuron_model(
            adapter_path, params.neurons, params.seed, device, dtype, tokenizer=tokenizer
        )
    from adapters.branch import load_adapter

    return load_adapter(adapter_path, device=device, dtype=dtype, tokenizer=tokenizer)


def _read_traces(corpus_path: Path) -> list[Any]:
    """Every record of the corpus, validated (before any model is loaded)."""
    from collectors.corpus import read_traces
    from collectors.errors import CorpusError

    with console.status(f"reading {corpus_path}"):
        traces = list(read_traces(corpus_path))
    if not traces:
        raise CorpusError(f"{corpus_path}: the corpus holds no traces (no non-blank line)")
    return traces


def _load_tokenizer(adapter_path: str, tokenizer_path: str | None) -> Any:
    """The tokenizer the model will be loaded with, alone (it is cheap): the one at
    ``tokenizer_path``, or the checkpoint's own (a hub id: its tokenizer files only)."""
    from adapters.checkpoint import resolve_checkpoint
    from adapters.tokenizer_loading import load_tokenizer

    if tokenizer_path is not None:
        return load_tokenizer(tokenizer_path)
    local = Path(adapter_path).expanduser()
    hub_id = adapter_path.count("/") == 1 and not adapter_path.startswith((".", "/"))
    if local.exists() or not hub_id:
        return load_tokenizer(resolve_checkpoint(adapter_path))  # a missing folder says so
    return load_tokenizer(adapter_path)


def _chat_format(tokenizer: Any, traces: list[Any], params: Any, corpus_path: Path) -> Any:
    """``params`` with the chat format resolved (``auto``: picked and said which)."""
    from collectors.tokenizer_check import AUTO, choose_chat_format

    choice = choose_chat_format(tokenizer, traces, params.chat_format, corpus_path)
    if params.chat_format == AUTO:
        console.print(f"chat format {choice.name} ({choice.reason})", highlight=False)
    return params.model_copy(update={"chat_format": choice.name})


def _read_corpus(
    corpus_path: Path, tokenizer: Any, params: Any, traces: list[Any] | None = None
) -> Any:
    from collectors.corpus import tokenize_traces
    from collectors.tokenizer_check import check_tokenizer

    traces = traces if traces is not None else _read_traces(corpus_path)
    with console.status(f"tokenizing {corpus_path}"):
        check_tokenizer(tokenizer, traces, params.chat_format, corpus_path)
        corpus = tokenize_traces(traces, tokenizer, params.max_length, params.chat_format)
    console.print(
        f"corpus {corpus_path}: {corpus.n_sequences:,} sequences, {corpus.n_tokens:,} tokens "
        f"({corpus.n_truncated:,} truncated to {params.max_length}, "
        f"{corpus.n_unterminated_think:,} without </think>; all kept)"
    )
    if corpus.dropped:
        parts = ", ".join(f"{n:,} {reason}" for reason, n in corpus.dropped.items())
        console.print(
            f"left out {sum(corpus.dropped.values()):,} parts of the corpus's conversations: "
            f"{parts} (no place in the chat layout; see docs/collecting.md)",
            highlight=False,
        )
    return corpus


def _collect(
    adapter_path: str,
    corpus_path: Path,
    out: Path,
    params: Any,
    device: str,
    dtype: str,
    overwrite: bool,
    shard: str | None = None,
    checkpoint_every: int | None = None,
    restart: bool = False,
    tokenizer_path: str | None = None,
) -> Any:
    from collectors.batching import WHOLE, Shard
    from collectors.collect import CollectJob, collect_run
    from labeler.cli.render import progress_bar

    # Everything that can be checked without the model is checked before loading it:
    # the corpus, the output, and the tokenizer (loaded alone) against the chat format.
    parsed_shard = Shard.parse(shard) if shard else WHOLE
    check_output(out, overwrite)
    traces = _read_traces(corpus_path)
    with console.status("loading the tokenizer"):
        tokenizer = _load_tokenizer(adapter_path, tokenizer_path)
    params = _chat_format(tokenizer, traces, params, corpus_path)
    corpus = _read_corpus(corpus_path, tokenizer, params, traces)
    with console.status("loading the model"):
        # the same tokenizer is loaded again with the model; the one checked is kept
        source, _, folder = _load_source(adapter_path, params, device, dtype, tokenizer_path)
    job = CollectJob(
        source=source, tokenizer=tokenizer, corpus=corpus, params=params, adapter_folder=folder,
        corpus_path=corpus_path, unit="neuron" if params.neurons else "feature",
        shard=parsed_shard,
    )  # fmt: skip
    label = "collecting" + (f" shard {parsed_shard}" if shard else "")
    with progress_bar(console, label, "tokens") as progress:
        task = progress.add_task(label, total=None)

        def on_plan(total: int, done: int) -> None:
            progress.update(task, total=total, completed=done)
            if done:
                console.print(f"resuming from a checkpoint: {done:,} of {total:,} tokens done")

        info = collect_run(
            job, out, checkpoint_every=checkpoint_every, overwrite=overwrite, restart=restart,
            on_plan=on_plan, progress=lambda n: progress.advance(task, n),
        )  # fmt: skip
    alive = sum(info.n_alive.values())
    per_layer = params.neurons or info.n_features_per_layer
    total = min(per_layer, info.n_features_per_layer) * len(info.layers)
    console.print(f"wrote {out}: {alive:,} of {total:,} {info.unit}s alive")
    return info


@cli.command()
@click.option("--adapter", "--model", "adapter_path", required=True,
              help="Checkpoint folder in the paper's format, or a hub id (with --neurons: "
                   "any Hugging Face causal LM).")  # fmt: skip
@click.option("--corpus", "corpus_path", required=True, type=click.Path(path_type=Path),
              help="JSONL: `conversations`, `messages`, `prompt`/`response` or `text` "
                   "records (docs/collecting.md).")  # fmt: skip
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Run folder to write.")
@click.option("--chat-format", default="auto", type=click.Choice(["auto", "deepseek", "qwen"]),
              show_default=True, help="Chat layout of conversation records, and of `text` "
                   "records already laid out in it; auto: the one the corpus's texts are "
                   "laid out in, else the one the tokenizer has (checked before the model "
                   "loads).")  # fmt: skip
@click.option("--tokenizer", "tokenizer_path", default=None, metavar="PATH_OR_ID",
              help="Folder or hub id of the tokenizer to use instead of the checkpoint's own "
                   "(default: its tokenizer.json as saved).")  # fmt: skip
@click.option("--max-length", default=1024, show_default=True,
              help="Truncate longer sequences (they are counted, never dropped).")  # fmt: skip
@click.option("--batch-tokens", default=8192, show_default=True,
              help="Token budget of a forward batch (sequences bucketed by length).")  # fmt: skip
@click.option("--top-k", default=20, show_default=True, help="Top examples kept per feature.")
@click.option("--n-random", default=10, show_default=True,
              help="Uniformly sampled activating examples per feature.")  # fmt: skip
@click.option("--quantiles", "n_quantiles", default=0, show_default=True,
              help="Sample examples from N activation quantiles (10 = deciles).")  # fmt: skip
@click.option("--per-quantile", default=5, show_default=True,
              help="Examples kept from each quantile.")  # fmt: skip
@click.option("--lens-through-norm", is_flag=True,
              help="Apply the final norm to decoder columns before the logit lens.")  # fmt: skip
@click.option("--layers", default=None, help="Comma-separated layers to collect (default all).")
@click.option("--neurons", type=int, default=None, metavar="N_PER_LAYER",
              help="Collect N random plain MLP neurons per layer instead of adapter features "
                   "(the neuron baseline).")  # fmt: skip
@click.option("--device", default="auto", type=click.Choice(["auto", "cpu", "cuda"]),
              show_default=True)  # fmt: skip
@click.option("--dtype", default="auto", type=click.Choice(["auto", "float32", "bfloat16"]),
              show_default=True, help="auto: bfloat16 on GPU, float32 on CPU.")  # fmt: skip
@click.option("--seed", default=0, show_default=True,
              help="Seed of the random sample, the negatives and the neuron sample.")  # fmt: skip
@click.option("--shard", default=None, metavar="I/N",
              help="Collect shard I of N (1-based); then `labeler merge-runs`.")  # fmt: skip
@click.option("--checkpoint-every", type=int, default=None, metavar="N",
              help="Checkpoint every N sequences; rerun the same command to resume.")  # fmt: skip
@click.option("--restart", is_flag=True, help="Discard a checkpoint left by another collection.")
@click.option("--overwrite", is_flag=True, help="Replace an existing run folder.")
def collect(
    adapter_path: str,
    corpus_path: Path,
    out: Path,
    chat_format: str,
    tokenizer_path: str | None,
    max_length: int,
    batch_tokens: int,
    top_k: int,
    n_random: int,
    n_quantiles: int,
    per_quantile: int,
    lens_through_norm: bool,
    layers: str | None,
    neurons: int | None,
    device: str,
    dtype: str,
    seed: int,
    shard: str | None,
    checkpoint_every: int | None,
    restart: bool,
    overwrite: bool,
) -> None:
    """Run the adapter model over a corpus and write a run folder of feature examples
    and statistics (docs/run-format.md).

    \b
    Long collections: --checkpoint-every N, then rerun the same command after a crash.
    Many GPUs: one `--shard i/n` job per GPU, then `labeler merge-runs` (docs/sharding.md).
    """
    from pydantic import ValidationError

    from collectors.run_format import CollectParams

    try:
        params = CollectParams(
            max_length=max_length, batch_tokens=batch_tokens, top_k=top_k, n_random=n_random,
            n_quantiles=n_quantiles, per_quantile=per_quantile,
            lens_through_norm=lens_through_norm, chat_format=chat_format,
            layers=_layers(layers), seed=seed, neurons=neurons,
        )  # fmt: skip
    except ValidationError as exc:
        first = exc.errors()[0]
        name = {"n_quantiles": "quantiles"}.get(str(first["loc"][0]), str(first["loc"][0]))
        raise UserError(f"--{name.replace('_', '-')}: {first['msg']}") from exc
    _collect(adapter_path, corpus_path, out, params, device, dtype, overwrite, shard,
             checkpoint_every, restart, tokenizer_path)  # fmt: skip


@cli.command("merge-runs")
@click.argument("shards", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Run folder to write.")
@click.option("--corpus", "corpus_path", type=click.Path(path_type=Path), default=None,
              help="The shards' corpus, if it moved (default: the path in run.json).")  # fmt: skip
@click.option("--tokenizer", default=None,
              help="Folder or hub id of the tokenizer, if the checkpoint moved.")  # fmt: skip
@click.option("--overwrite", is_flag=True, help="Replace an existing run folder.")
def merge_runs(shards: tuple[Path, ...], out: Path, corpus_path: Path | None,
               tokenizer: str | None, overwrite: bool) -> None:  # fmt: skip
    """Merge shard runs (`collect --shard i/n`) into one run, identical to collecting
    the whole corpus at once."""
    from collectors.merge import check_shards, load_tokenizer
    from collectors.merge import merge_runs as merge

    checked = check_shards(list(shards))
    info = checked[0][1]
    corpus_file = corpus_path or Path(info.corpus_path)
    tok = load_tokenizer(tokenizer or info.adapter_path)
    corpus = _read_corpus(corpus_file, tok, info.params)
    with console.status("merging"):
        merged = merge(list(shards), out, tok, corpus, corpus_file, overwrite)
    console.print(f"wrote {out}: {len(shards)} shards, {merged.n_tokens:,} tokens")


@cli.command("import")
@click.argument("source", metavar="DIR", type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Run folder to write.")
@click.option("--overwrite", is_flag=True, help="Replace an existing run folder.")
def import_(source: Path, out: Path, overwrite: bool) -> None:
    """Read the paper's per-feature JSON (DIR/features/{cantor_id}.json and
    DIR/feature_metadata.json) into a run folder, to label released feature data without
    collecting again."""
    from labeler.formats.circuit_tracer import import_circuit_tracer

    with console.status(f"importing {source}"):
        info = import_circuit_tracer(source, out, overwrite)
    n = sum(info.n_alive.values())
    console.print(f"wrote {out}: {n:,} alive features in {len(info.layers)} layers")
