"""The ``labeler`` command line. Heavy modules (torch, transformers) load only in the
commands that need them."""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import click
from rich.console import Console

from adapters.errors import UserError

console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)

DEMO_MARKER = ".labeler-demo"


def _layers(value: str | None) -> list[int] | None:
    if value is None:
        return None
    try:
        return sorted({int(v) for v in value.split(",") if v.strip()})
    except ValueError as exc:
        raise click.BadParameter(f"{value!r}: expected comma-separated layer numbers") from exc


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Log what happens (to stderr).")
def cli(verbose: bool) -> None:
    """Label the features of transcoder adapters.

    \b
    Pipeline:  collect -> label -> summarize -> export
      labeler collect --adapter CKPT --corpus traces.jsonl --out RUN
      labeler label RUN --judge heuristic [--sample-per-layer 250]
      labeler label RUN --judge openai:gpt-5-mini --dry-run    (then without it)
      labeler status RUN
      labeler disputes RUN
      labeler review RUN --reviewer NAME [--web]
      labeler summarize RUN [--json] [--compare OTHER_RUN]
      labeler export RUN [--with-examples] [--out catalog.jsonl.gz]
    Or all of it on a planted tiny model, offline:  labeler demo
    """
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from labeler.redaction import redact_handlers

    redact_handlers()


def _load_source(adapter_path: str, params: Any, device: str, dtype: str) -> Any:
    """The model to collect from: the adapter, or with ``params.neurons`` a plain model."""
    if params.neurons is not None:
        from collectors.neurons import load_neuron_model

        return load_neuron_model(adapter_path, params.neurons, params.seed, device, dtype)
    from adapters.branch import load_adapter

    return load_adapter(adapter_path, device=device, dtype=dtype)


def _read_corpus(corpus_path: Path, tokenizer: Any, params: Any) -> Any:
    from collectors.corpus import read_traces, tokenize_traces

    with console.status(f"reading and tokenizing {corpus_path}"):
        corpus = tokenize_traces(
            list(read_traces(corpus_path)), tokenizer, params.max_length, params.chat_format
        )
    console.print(
        f"corpus {corpus_path}: {corpus.n_sequences:,} sequences, {corpus.n_tokens:,} tokens "
        f"({corpus.n_truncated:,} truncated to {params.max_length}, "
        f"{corpus.n_unterminated_think:,} without </think>; all kept)"
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
) -> Any:
    from collectors.batching import WHOLE, Shard
    from collectors.collect import CollectJob, collect_run
    from labeler.render import progress_bar

    parsed_shard = Shard.parse(shard) if shard else WHOLE  # bad specs fail before loading
    with console.status("loading the model"):
        source, tokenizer, folder = _load_source(adapter_path, params, device, dtype)
    corpus = _read_corpus(corpus_path, tokenizer, params)
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
              help="JSONL: `conversations`, `prompt`/`response` or `text` records.")  # fmt: skip
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Run folder to write.")
@click.option("--chat-format", default="deepseek", type=click.Choice(["deepseek", "qwen"]),
              show_default=True, help="Chat layout of conversation records.")  # fmt: skip
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
             checkpoint_every, restart)  # fmt: skip


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


def _label(
    run_path: Path,
    judges: tuple[str, ...],
    sample: int | None,
    concurrency: int,
    seed: int,
    options: Any = None,
    budget_usd: float | None = None,
    dry_run: bool = False,
    limits: dict[str, Any] | None = None,
    wait: bool = False,
) -> None:
    from labeler.judges import make_judge
    from labeler.judges.pricing import load_prices
    from labeler.labeling import label_judges
    from labeler.labeling.interrupts import Interrupts
    from labeler.render import progress_bar
    from labeler.run_data import RunData
    from labeler.store import LabelStore

    run = RunData.open(run_path)
    if not run.info.negatives_checked:
        err_console.print(
            f"note: {run_path} was imported ({run.info.source}); its detection negatives are "
            "checked only against the features known active in them"
        )
    built = [make_judge(name, options) for name in judges]  # unknown names fail before work
    prices = load_prices(options.prices if options is not None else None)
    if dry_run:
        _dry_run(run, built, sample, seed, prices)
        return
    _limit_locally(built, limits or {})
    for judge in built:
        judge.preflight()
        if budget_usd is not None and judge.calls_per_feature and prices.lookup(judge.name) is None:
            raise UserError(
                f"--budget-usd: no price for {judge.name}; add one with --prices FILE "
                '({"prices": {"' + judge.name + '": {"input": ..., "cached_input": ..., '
                '"output": ...}}}, dollars per million tokens)'
            )
    store = LabelStore(run_path / "labels.sqlite")
    names = " + ".join(j.name for j in built)
    try:
        with (
            Interrupts(_say_interrupt) as interrupts,
            progress_bar(console, f"labeling ({names})", "features") as progress,
        ):
            task = progress.add_task(f"labeling ({names})", total=None)
            reports = label_judges(
                run, store, built, sample_per_layer=sample, concurrency=concurrency,
                seed=seed, budget_usd=budget_usd,
                on_start=lambda n: progress.update(task, total=n),
                on_result=lambda _judge, _ok: progress.advance(task),
                interrupts=interrupts, wait=wait,
            )  # fmt: skip
        _finish_labeling(run_path, store, reports, budget_usd)
    finally:
        store.close()


def _say_interrupt(signal_name: str, exiting: bool) -> None:
    if exiting:
        err_console.print(f"\n{signal_name} again: exiting now; every finished result is kept")
    else:
        err_console.print(
            f"\n{signal_name}: stopping; calls in flight finish and are kept "
            "(press Ctrl-C again to exit now)"
        )


def _finish_labeling(
    run_path: Path, store: Any, reports: dict[str, Any], budget_usd: float | None
) -> None:
    """What each judge did, then the exit: 130 after an interrupt, 2 when a judge cannot
    work, 3 when planned features are left failed, else 0."""
    from labeler.labeling.exits import EXIT_FAILURES, failures_by_reason
    from labeler.labeling.interrupts import EXIT_INTERRUPTED

    for judge, report in reports.items():
        spent = "" if report.spent_usd is None else f"; spent ${report.spent_usd:,.4f}"
        console.print(
            f"{judge}: {report.planned} planned, {report.skipped} already labeled, "
            f"{report.labeled} labeled now, {report.failed} failed, "
            f"{report.pending} pending{spent}"
        )
    first = next(iter(reports.values()), None)
    stopped = first.stopped if first is not None else None
    if stopped == "interrupted":
        err_console.print(
            f"interrupted: everything finished is stored; rerun to label the rest (`labeler "
            f"status {run_path}` shows what is left)"
        )
        sys.exit(EXIT_INTERRUPTED)
    if stopped is not None:
        raise UserError(f"{stopped}; stopped before spending on the rest of the run")
    if first is not None and first.budget_reached:
        console.print(
            f"[bold]budget of ${budget_usd:,.2f} reached[/bold]: no new features started; "
            f"rerun to continue (see `labeler status {run_path}`)"
        )
    failures = failures_by_reason(store, list(reports))
    if failures:
        total = sum(n for _, _, n in failures)
        err_console.print(f"{total:,} planned feature judgments are failed:", highlight=False)
        for judge, kind, n in failures:
            err_console.print(f"  {judge}: {n:,} {kind}", highlight=False)
        err_console.print(
            f"rerun to retry them; `labeler status {run_path}` gives the reasons", highlight=False
        )
        sys.exit(EXIT_FAILURES)


def _limit_locally(judges: list[Any], limits: dict[str, Any]) -> None:
    from labeler.judges.llm_judge import LLMJudge
    from labeler.ratelimit import LocalRateLimiter

    for judge in judges:
        if judge.name in limits and isinstance(judge, LLMJudge):
            judge.limiter = LocalRateLimiter(limits[judge.name])


def _dry_run(run: Any, judges: list[Any], sample: int | None, seed: int, prices: Any) -> None:
    from labeler.accounting import estimate
    from labeler.labeling import plan_features
    from labeler.render import estimate_table
    from labeler.store import LabelStore

    planned = [fid for fid, _, _ in plan_features(run, sample, seed)]
    store_path = run.folder / "labels.sqlite"
    store = LabelStore(store_path) if store_path.exists() else None
    try:
        estimates = []
        for judge in judges:
            done = store.done(judge.name) if store is not None else set()
            todo = [fid for fid in planned if fid not in done]
            estimates.append(estimate(run, judge, todo, prices, store))
    finally:
        if store is not None:
            store.close()
    console.print(estimate_table(estimates))
    console.print("dry run: nothing was sent and nothing was written")


@cli.command()
@click.argument("run_path", metavar="RUN", type=click.Path(path_type=Path))
@click.option("--judge", "judges", multiple=True, default=("heuristic",), show_default=True,
              help="heuristic, openai:MODEL, anthropic:MODEL or hf:PATH_OR_ID; repeat for an "
                   "ensemble (each judge labels the same features).")  # fmt: skip
@click.option("--sample-per-layer", type=int, default=None,
              help="Label N random alive features per layer (default: all alive).")  # fmt: skip
@click.option("--concurrency", default=8, show_default=True,
              help="Model requests in flight per judge.")  # fmt: skip
@click.option("--seed", default=0, show_default=True, help="Seed of the sample and negatives.")
@click.option("--executor", type=click.Choice(["local", "celery"]), default="local",
              show_default=True,
              help="local: in this process. celery: on the worker fleet behind "
                   "LABELER_REDIS_URL (start workers with `celery -A workers worker -Q ...`; "
                   "see the README's fleet section).")  # fmt: skip
@click.option("--max-inflight", default=256, show_default=True,
              help="celery: (feature, judge) pairs in flight at once.")  # fmt: skip
@click.option("--requeue", is_flag=True,
              help="celery: send again the stages recorded as queued (after a broker lost its "
                   "queues); workers skip whatever already finished.")  # fmt: skip
@click.option("--rpm", "rpm", multiple=True, metavar="[JUDGE=]N",
              help="Requests per minute allowed to a judge's provider and model, across the "
                   "whole fleet (in Redis) or this process (local); without JUDGE= for every "
                   "API judge. Repeatable.")  # fmt: skip
@click.option("--tpm", "tpm", multiple=True, metavar="[JUDGE=]N",
              help="Tokens per minute (input and output), like --rpm.")  # fmt: skip
@click.option("--dry-run", is_flag=True,
              help="Print calls, tokens and dollars it would take; send nothing.")  # fmt: skip
@click.option(
    "--budget-usd",
    type=float,
    default=None,
    help="Start no new feature once this run of the command has spent this much.",
)
@click.option("--wait", is_flag=True,
              help="If another labeler holds the run, wait for it to finish instead of "
                   "refusing.")  # fmt: skip
@click.option("--base-url", default=None,
              help="OpenAI-compatible server for openai: judges (vLLM, SGLang, Ollama); "
                   "default $OPENAI_BASE_URL or OpenAI.")  # fmt: skip
@click.option("--openai-api", type=click.Choice(["responses", "chat"]), default=None,
              help="OpenAI API [default: responses; chat with --base-url].")  # fmt: skip
@click.option(
    "--timeout",
    "timeout_s",
    default=60.0,
    show_default=True,
    help="Seconds per model call before it counts as failed (and is retried).",
)
@click.option("--max-attempts", default=6, show_default=True,
              help="Calls per request on 429, 5xx and timeouts (backoff with jitter, "
                   "Retry-After honoured).")  # fmt: skip
@click.option(
    "--logprobs",
    is_flag=True,
    help="Ask chat models for token log probabilities (a detection AUROC).",
)
@click.option("--n-examples", default=10, show_default=True,
              help="Top examples shown to the explainer and the classifier.")  # fmt: skip
@click.option(
    "--max-output-tokens",
    type=int,
    default=None,
    help="Output token limit per call (reasoning models need room to think).",
)
@click.option(
    "--prices",
    type=click.Path(path_type=Path),
    default=None,
    help="JSON price table overriding the packaged one (or $LABELER_PRICES).",
)
@click.option("--device", default="auto", type=click.Choice(["auto", "cpu", "cuda"]),
              show_default=True, help="For hf: judges.")  # fmt: skip
@click.option("--dtype", default="auto", type=click.Choice(["auto", "float32", "bfloat16"]),
              show_default=True, help="For hf: judges.")  # fmt: skip
def label(
    run_path: Path,
    judges: tuple[str, ...],
    sample_per_layer: int | None,
    concurrency: int,
    seed: int,
    executor: str,
    max_inflight: int,
    requeue: bool,
    rpm: tuple[str, ...],
    tpm: tuple[str, ...],
    dry_run: bool,
    budget_usd: float | None,
    wait: bool,
    base_url: str | None,
    openai_api: str | None,
    timeout_s: float,
    max_attempts: int,
    logprobs: bool,
    n_examples: int,
    max_output_tokens: int | None,
    prices: Path | None,
    device: str,
    dtype: str,
) -> None:
    """Label the features of a run; a re-run labels only what is missing or failed, and
    pays only for stages not yet stored.

    \b
    Keys come from OPENAI_API_KEY and ANTHROPIC_API_KEY and are never stored.
    One labeler at a time per run folder (--wait to queue behind another).
    Ctrl-C stops new work, keeps what finished; Ctrl-C again exits at once.
    Exit status: 0 done; 2 a judge cannot work, the run is busy, or bad input;
    3 finished with failed features (listed by reason); 130 interrupted.
    Examples:
      labeler label RUN --judge openai:gpt-5-mini --sample-per-layer 250 --dry-run
      labeler label RUN --judge anthropic:claude-haiku-4-5 --budget-usd 20
      labeler label RUN --judge openai:Qwen/Qwen2.5-7B-Instruct --base-url http://gpu:8000/v1
      labeler label RUN --judge heuristic --judge openai:gpt-5-mini   (an ensemble)
      labeler label RUN --judge openai:gpt-5-mini --executor celery --rpm 5000 --tpm 4000000
    """
    from pydantic import ValidationError

    from labeler.judges.base import JudgeOptions

    if concurrency < 1:
        raise UserError("--concurrency: must be at least 1")
    if budget_usd is not None and budget_usd <= 0:
        raise UserError("--budget-usd: must be positive")
    api = openai_api or ("chat" if base_url else "responses")
    try:
        options = JudgeOptions(
            base_url=base_url, openai_api=api, timeout_s=timeout_s, max_attempts=max_attempts,
            logprobs=logprobs, n_examples=n_examples, max_output_tokens=max_output_tokens,
            device=device, dtype=dtype, prices=prices, seed=seed,
        )  # fmt: skip
    except ValidationError as exc:
        first = exc.errors()[0]
        name = {"timeout_s": "timeout"}.get(str(first["loc"][0]), str(first["loc"][0]))
        raise UserError(f"--{name.replace('_', '-')}: {first['msg']}") from exc
    if max_inflight < 1:
        raise UserError("--max-inflight: must be at least 1")
    if (requeue or max_inflight != 256) and executor != "celery":
        raise UserError("--requeue and --max-inflight apply to --executor celery only")
    limits = _rate_limits(judges, rpm, tpm)
    if executor == "celery" and not dry_run:
        _label_with_fleet(run_path, judges, sample_per_layer, seed, options, budget_usd,
                          limits, max_inflight, requeue, wait)  # fmt: skip
        return
    _label(run_path, judges, sample_per_layer, concurrency, seed, options, budget_usd, dry_run,
           limits, wait)  # fmt: skip


def _rate_limits(judges: tuple[str, ...], rpm: tuple[str, ...], tpm: tuple[str, ...]) -> Any:
    """``--rpm``/``--tpm`` values as limits per judge; a value without JUDGE= applies to
    every judge that calls an API or a model server."""
    from pydantic import ValidationError

    from labeler.ratelimit import RateLimits

    per_judge: dict[str, dict[str, float]] = {}
    for option, values in (("rpm", rpm), ("tpm", tpm)):
        for value in values:
            judge, _, number = value.rpartition("=")
            targets = [judge] if judge else [j for j in judges if j != "heuristic"]
            if judge and judge not in judges:
                raise UserError(f"--{option} {value}: {judge!r} is not one of the --judge names")
            try:
                amount = float(number)
            except ValueError:
                raise UserError(f"--{option} {value}: expected [JUDGE=]NUMBER") from None
            for target in targets:
                per_judge.setdefault(target, {})[option] = amount
    try:
        return {judge: RateLimits(**given) for judge, given in per_judge.items()}
    except ValidationError as exc:
        first = exc.errors()[0]
        raise UserError(f"--{first['loc'][0]}: {first['msg']}") from None


def _label_with_fleet(
    run_path: Path,
    judges: tuple[str, ...],
    sample: int | None,
    seed: int,
    options: Any,
    budget_usd: float | None,
    limits: dict[str, Any],
    max_inflight: int,
    requeue: bool,
    wait: bool = False,
) -> None:
    import importlib.util

    if importlib.util.find_spec("celery") is None:
        raise UserError(
            "--executor celery needs the fleet extra: pip install 'transcoder-labeler[fleet]'"
        )
    from labeler.labeling.interrupts import Interrupts
    from labeler.render import progress_bar
    from labeler.run_data import RunData
    from labeler.store import LabelStore
    from workers.driver import FleetLabeling, label_with_fleet
    from workers.settings import FleetSettings, redacted

    run = RunData.open(run_path)
    _check_judge_names(judges)
    settings = FleetSettings.from_env()
    job = FleetLabeling(
        judges=list(judges), options=options, limits=limits, sample_per_layer=sample, seed=seed,
        max_inflight=max_inflight, budget_usd=budget_usd, requeue=requeue,
    )  # fmt: skip
    store = LabelStore(run_path / "labels.sqlite")
    console.print(f"fleet: {redacted(settings.redis_url)}; `labeler status {run_path}` shows it")
    try:
        with (
            Interrupts(_say_interrupt) as interrupts,
            progress_bar(console, "labeling (fleet)", "features") as progress,
        ):
            task = progress.add_task("labeling (fleet)", total=None)
            reports = label_with_fleet(
                run, store, job, settings,
                on_start=lambda n: progress.update(task, total=n),
                on_result=lambda _judge, _ok: progress.advance(task),
                interrupts=interrupts, wait=wait,
            )  # fmt: skip
        _finish_labeling(run_path, store, reports, budget_usd)
    finally:
        store.close()


def _check_judge_names(judges: tuple[str, ...]) -> None:
    """Judge names the driver can check without building a model or needing a key."""
    from labeler.judges import make_judge
    from labeler.staging import is_staged

    for name in judges:
        if is_staged(name):
            if not name.partition(":")[2].strip():
                raise UserError(
                    f"judge {name!r} names no model; write {name.partition(':')[0]}:MODEL"
                )
        else:
            make_judge(name)


@cli.command()
@click.argument("run_path", metavar="RUN", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
def status(run_path: Path, as_json: bool) -> None:
    """Per judge: labeled, failed (by reason), pending; tokens and cost."""

    from collectors.run_format import read_run_info
    from labeler.accounting import run_status
    from labeler.render import status_table

    read_run_info(run_path)
    store = _open_labels(run_path)
    try:
        statuses, note = _live_status(store, run_status(store))
        n_planned = len(store.planned())
        executor = store.get_meta("executor") or "local"
    finally:
        store.close()
    if as_json:
        click.echo(json.dumps([s.model_dump() for s in statuses], indent=2))
        return
    console.print(f"{run_path}: {n_planned:,} features planned; executor {executor}")
    for table in status_table(statuses):
        console.print(table)
    if note:
        err_console.print(note)


def _live_status(store: Any, statuses: list[Any]) -> tuple[list[Any], str | None]:
    """Queued and running work, throughput and ETA: from the fleet's Redis for a
    labeling by the Celery executor, from the local executor's heartbeat otherwise."""

    from labeler.accounting import throughput, with_live_state

    counts: dict[str, dict[str, int]] = {}
    note = None
    if store.get_meta("executor") == "celery":
        try:
            from workers.driver import fleet_counts
            from workers.settings import FleetSettings, redacted

            settings = FleetSettings.from_env()
            try:
                counts = fleet_counts(store, settings)
            except Exception as exc:  # Redis down: the store still answers
                note = f"fleet state unavailable ({redacted(settings.redis_url)}: {exc})"
        except ImportError:
            note = "fleet state unavailable: the fleet extra is not installed"
    else:
        beat = json.loads(store.get_meta("local_running") or "{}")
        running = beat.get("running") if beat and time.time() - beat.get("at", 0) < 10 else None
        if isinstance(running, dict):
            counts = {j: {"queued": 0, "running": int(n)} for j, n in running.items()}
    live = []
    for s in statuses:
        c = counts.get(s.judge)
        queued = c.get("queued", 0) if c is not None else (0 if counts or note is None else None)
        running = c.get("running", 0) if c is not None else (0 if note is None else None)
        live.append(with_live_state(s, queued, running, throughput(store, s.judge)))
    return live, note


def _open_labels(run_path: Path) -> Any:
    """The run's label store; an error saying what to do when nothing is labeled yet."""
    from labeler.store import LabelStore

    store_path = run_path / "labels.sqlite"
    if not store_path.exists():
        raise UserError(f"{run_path}: no labels yet; run `labeler label {run_path}` first")
    return LabelStore(store_path)


_RULES_HELP = ("JSON file of dispute rules: judges_disagree, low_confidence, min_detection, "
               "heuristic_outvoted (docs/review.md).")  # fmt: skip


def _summarize(
    run_path: Path,
    as_json: bool,
    plot: Path | None,
    compare_with: Path | None = None,
    rules_path: Path | None = None,
) -> Any:
    from collectors.run_format import read_run_info
    from labeler.agreement_plot import plot_agreement
    from labeler.disputes import DisputeRules
    from labeler.plots import plot_comparison, plot_layers
    from labeler.render import summary_tables
    from labeler.summarize import compare, summarize

    rules = DisputeRules.load(rules_path)

    def load(folder: Path) -> Any:
        info = read_run_info(folder)
        store = _open_labels(folder)
        try:
            return summarize(store, info, str(folder), rules)
        finally:
            store.close()

    summary = load(run_path)
    other = load(compare_with) if compare_with is not None else None
    comparison = compare(summary, other) if other is not None else None
    (run_path / "summary.json").write_text(summary.model_dump_json(indent=2) + "\n")
    plot_path = plot or run_path / "summary.png"
    plots = [plot_path]
    plot_layers(summary, plot_path)
    if summary.agreement is not None:
        plots.append(plot_path.with_name(plot_path.stem + "-agreement.png"))
        plot_agreement(summary.agreement, plots[-1])
    if other is not None:
        plots.append(plot_path.with_name(plot_path.stem + "-compare.png"))
        plot_comparison(summary, other, plots[-1])
    if as_json:
        data = summary.model_dump(mode="json")
        if comparison is not None:
            data["comparison"] = comparison.model_dump(mode="json")
        click.echo(json.dumps(data, indent=2))
    else:
        for part in summary_tables(summary, comparison):
            console.print(part)
        console.print(f"plots: {', '.join(map(str, plots))}; JSON: {run_path / 'summary.json'}")
    return summary


@cli.command()
@click.argument("run_path", metavar="RUN", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--plot", type=click.Path(path_type=Path), default=None,
              help="Where to write the PNG of shares by layer (default RUN/summary.png); the "
                   "agreement and comparison plots go beside it.")  # fmt: skip
@click.option("--compare", "compare_with", metavar="OTHER_RUN", default=None,
              type=click.Path(path_type=Path),
              help="Compare the final labels with another run's (say, the neuron "
                   "baseline).")  # fmt: skip
@click.option("--rules", "rules_path", type=click.Path(path_type=Path), default=None,
              help=_RULES_HELP)  # fmt: skip
def summarize(run_path: Path, as_json: bool, plot: Path | None, compare_with: Path | None,
              rules_path: Path | None) -> None:  # fmt: skip
    """The share of reasoning features among all alive features with its 95% CI (each
    layer's sample weighted by its alive features), the breakdown by category, for the
    final labels and each judge side by side; judge and human agreement; disputes; cost.

    \b
    Final labels: a person's decision, else the judges' consensus, else one judge.
    Writes RUN/summary.json and PNG plots (shares by layer; agreement; comparison).
    """
    _summarize(run_path, as_json, plot, compare_with, rules_path)


# polars' bundled allocator (jemalloc) gives freed memory back to the kernel within a
# second; an export frees and reallocates about a gigabyte per layer, which the kernel
# then faults back in page by page, a quarter of the export's CPU time. Keeping freed
# pages for 5 s instead costs about 0.7 GB at the peak and saves about 7% of the time
# (BENCHMARKS.md). Read when polars loads, so set before it is imported; a value the
# user has set wins.
EXPORT_ALLOCATOR = ("_RJEM_MALLOC_CONF", "dirty_decay_ms:5000,muzzy_decay_ms:5000")


def _export(run_path: Path, out: Path | None, with_examples: bool,
            rules_path: Path | None = None, gzip_level: int = 1) -> Path:  # fmt: skip
    os.environ.setdefault(*EXPORT_ALLOCATOR)
    from labeler.disputes import DisputeRules
    from labeler.export import export_catalog
    from labeler.label_table import planned_frame
    from labeler.render import progress_bar
    from labeler.run_data import RunData

    rules = DisputeRules.load(rules_path)
    run = RunData.open(run_path)
    target = out or run_path / "catalog.jsonl"
    if not target.name.endswith((".jsonl", ".jsonl.gz")):
        raise UserError(f"--out {target}: the catalog is written as .jsonl or .jsonl.gz")
    store = _open_labels(run_path)
    try:
        with progress_bar(console, "exporting", "features") as progress:
            task = progress.add_task("exporting", total=planned_frame(store).height)
            n = export_catalog(run, store, target, with_examples, rules,
                               progress=lambda k: progress.advance(task, k),
                               gzip_level=gzip_level)  # fmt: skip
    finally:
        store.close()
    console.print(f"wrote {n:,} features to {target}")
    return target


@cli.command()
@click.argument("run_path", metavar="RUN", type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["jsonl", "circuit-tracer"]), default="jsonl",
              show_default=True,
              help="jsonl: the labeled catalog; circuit-tracer: the paper's per-feature JSON "
                   "folder (features/{cantor_id}.json and feature_metadata.json).")  # fmt: skip
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Output: a .jsonl or .jsonl.gz file (default RUN/catalog.jsonl), or for "
                   "circuit-tracer a folder (default RUN/circuit-tracer).")  # fmt: skip
@click.option("--with-examples", is_flag=True, help="Include each feature's examples.")
@click.option("--rules", "rules_path", type=click.Path(path_type=Path), default=None,
              help=_RULES_HELP)  # fmt: skip
@click.option("--gzip-level", type=click.IntRange(1, 9), default=1, show_default=True,
              help="Compression of a .jsonl.gz catalog: 1 is fastest, 9 smallest.")  # fmt: skip
@click.option("--overwrite", is_flag=True, help="Replace an existing circuit-tracer folder.")
def export(run_path: Path, fmt: str, out: Path | None, with_examples: bool,
           rules_path: Path | None, gzip_level: int, overwrite: bool) -> None:  # fmt: skip
    """Write the labeled feature catalog: per feature its final label and where it came
    from, every judgment, every review decision, scores and provenance
    (docs/catalog-schema.md); or the run's features in the circuit-tracer viewer format."""
    if fmt == "circuit-tracer":
        from collectors.run_format import read_run_info
        from labeler.circuit_tracer import export_circuit_tracer

        read_run_info(run_path)
        target = out or run_path / "circuit-tracer"
        with console.status(f"writing {target}"):
            n = export_circuit_tracer(run_path, target, overwrite)
        console.print(f"wrote {n:,} feature files to {target}")
        return
    _export(run_path, out, with_examples, rules_path, gzip_level)


@cli.command()
@click.argument("run_path", metavar="RUN", type=click.Path(path_type=Path))
@click.option("--rules", "rules_path", type=click.Path(path_type=Path), default=None,
              help=_RULES_HELP)  # fmt: skip
@click.option(
    "--limit",
    type=click.IntRange(min=0),
    default=50,
    show_default=True,
    help="Rows to show (0: all).",
)
@click.option("--json", "as_json", is_flag=True, help="Print every disputed feature as JSON.")
def disputes(run_path: Path, rules_path: Path | None, limit: int, as_json: bool) -> None:
    """Disputed features, most informative first: judges disagree on the category, a
    judge's confidence is low, a detection score is low, or the heuristic judge
    disagrees with every model judge."""
    from collectors.run_format import read_run_info
    from labeler.disputes import DisputeRules
    from labeler.render import queue_table
    from labeler.review import review_queue

    rules = DisputeRules.load(rules_path)
    read_run_info(run_path)
    store = _open_labels(run_path)
    try:
        queue = review_queue(store, rules, include_decided=True)
    finally:
        store.close()
    if as_json:
        click.echo(json.dumps([q.model_dump() for q in queue], indent=2))
        return
    open_items = sum(1 for q in queue if not q.decided_by)
    console.print(f"{len(queue):,} disputed features, {open_items:,} not decided by anyone")
    console.print(queue_table(queue[:limit] if limit else queue))


_DECISION_OPTIONS = (
    click.option(
        "--category", required=True, help="reasoning, domain, language or uninterpretable."
    ),
    click.option(
        "--subcategory",
        default=None,
        help="For reasoning: hesitation, "
        "self_correction, verification, planning, answer_template, other.",
    ),
    click.option(
        "--mechanism", default=None, help="For reasoning: output, input_simple, input_abstract."
    ),
    click.option("--domain-type", default=None, help="For domain: math, science, code."),
    click.option("--note", default="", help="Free text kept with the decision."),
)


@cli.command()
@click.argument("run_path", metavar="RUN", type=click.Path(path_type=Path))
@click.argument("feature_id", metavar="FEATURE")
@click.option("--reviewer", required=True, help="Who decides (kept with the decision).")
@_DECISION_OPTIONS[0]
@_DECISION_OPTIONS[1]
@_DECISION_OPTIONS[2]
@_DECISION_OPTIONS[3]
@_DECISION_OPTIONS[4]
def decide(run_path: Path, feature_id: str, reviewer: str, category: str,
           subcategory: str | None, mechanism: str | None, domain_type: str | None,
           note: str) -> None:  # fmt: skip
    """Record one review decision without the interactive review (for scripts). Decisions
    are appended: earlier ones, another reviewer's or your own, are kept."""
    from collectors.run_format import read_run_info
    from labeler.review import record_decision

    read_run_info(run_path)
    store = _open_labels(run_path)
    try:
        decision = record_decision(store, {
            "feature_id": feature_id, "reviewer": reviewer, "category": category,
            "subcategory": subcategory, "mechanism": mechanism, "domain_type": domain_type,
            "note": note,
        })  # fmt: skip
        others = [r for r in store.reviews(feature_id)
                  if r.action == "decide" and r.reviewer != reviewer]  # fmt: skip
    finally:
        store.close()
    console.print(
        f"{feature_id}: {decision.category} by {reviewer} at {decision.decided_at}",
        markup=False,
        highlight=False,
    )
    for other in others:
        if other.category != decision.category:
            console.print(f"  note: {other.reviewer} decided {other.category} "
                          f"({other.decided_at}); both are kept", markup=False,
                          highlight=False)  # fmt: skip


@cli.command()
@click.argument("run_path", metavar="RUN", type=click.Path(path_type=Path))
@click.option("--reviewer", default=None,
              help="Who reviews (kept with each decision); required in the terminal.")  # fmt: skip
@click.option("--web", is_flag=True, help="Serve the review page on 127.0.0.1 instead.")
@click.option("--port", default=8765, show_default=True, help="--web: port (0: any free one).")
@click.option("--include-decided", is_flag=True,
              help="Also features someone already decided (a second opinion).")  # fmt: skip
@click.option("--rules", "rules_path", type=click.Path(path_type=Path), default=None,
              help=_RULES_HELP)  # fmt: skip
def review(run_path: Path, reviewer: str | None, web: bool, port: int, include_decided: bool,
           rules_path: Path | None) -> None:  # fmt: skip
    """Walk the disputed features, most informative first, and decide their labels:
    examples with the activating token and activation strength highlighted, the logit
    lens, and the judges' answers (hidden until asked for, to avoid anchoring).

    \b
    Terminal keys: r d l u (category), j (show judges), s (skip), q (quit).
    --web: a page on 127.0.0.1 with the same queue and keyboard shortcuts.
    Decisions are appended to RUN/labels.sqlite with the reviewer and time.
    """
    from labeler.disputes import DisputeRules
    from labeler.run_data import RunData

    rules = DisputeRules.load(rules_path)
    run = RunData.open(run_path)
    store = _open_labels(run_path)
    try:
        if web:
            from labeler.review_web import serve

            def ready(url: str) -> None:
                console.print(f"review page: {url} (Ctrl-C to stop)")

            serve(run, store, rules, reviewer or "", port, include_decided, on_ready=ready)
            return
        if not reviewer:
            raise UserError("--reviewer NAME is needed to review in the terminal")
        from labeler.review_terminal import review_in_terminal

        review_in_terminal(run, store, rules, reviewer, include_decided, console)
    finally:
        store.close()


@cli.command("import")
@click.argument("source", metavar="DIR", type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Run folder to write.")
@click.option("--overwrite", is_flag=True, help="Replace an existing run folder.")
def import_(source: Path, out: Path, overwrite: bool) -> None:
    """Read the paper's per-feature JSON (DIR/features/{cantor_id}.json and
    DIR/feature_metadata.json) into a run folder, to label released feature data without
    collecting again."""
    from labeler.circuit_tracer import import_circuit_tracer

    with console.status(f"importing {source}"):
        info = import_circuit_tracer(source, out, overwrite)
    n = sum(info.n_alive.values())
    console.print(f"wrote {out}: {n:,} alive features in {len(info.layers)} layers")


@cli.command()
@click.option("--out", type=click.Path(path_type=Path), default=Path("demo-run"),
              show_default=True, help="Folder for everything the demo makes.")  # fmt: skip
@click.option("--seed", default=0, show_default=True)
def demo(out: Path, seed: int) -> None:
    """Build a planted tiny model and corpus, then collect, label, summarize and export,
    and compare the labels with the planted ground truth. Offline, CPU, about a minute."""
    from collectors.demo_model import build_demo
    from collectors.run_format import CollectParams
    from labeler.ground_truth import compare_with_ground_truth
    from labeler.render import ground_truth_table
    from labeler.store import LabelStore

    started = time.monotonic()
    if out.exists():
        if not (out / DEMO_MARKER).exists():
            raise UserError(f"{out}: exists and is not a demo folder; choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / DEMO_MARKER).write_text("made by `labeler demo`; replaced on the next run\n")
    with console.status("building the planted model, tokenizer and corpus"):
        paths = build_demo(out / "inputs", seed=seed)
    console.print(f"built {paths.checkpoint} and {paths.corpus}")
    run_path = out / "run"
    _collect(str(paths.checkpoint), paths.corpus, run_path, CollectParams(seed=seed), "cpu",
             "float32", False)  # fmt: skip
    _label(run_path, ("heuristic",), None, 8, seed)
    _summarize(run_path, False, None)
    _export(run_path, None, True)
    store = LabelStore(run_path / "labels.sqlite")
    try:
        report = compare_with_ground_truth(paths.ground_truth, store, "heuristic")
    finally:
        store.close()
    (out / "ground_truth_report.json").write_text(report.model_dump_json(indent=2) + "\n")
    for part in ground_truth_table(report):
        console.print(part)
    console.print(f"demo finished in {time.monotonic() - started:.0f} s; everything is in {out}")


def main() -> None:
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        err_console.print("aborted")
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except UserError as exc:
        from labeler.redaction import redact

        err_console.print("[bold red]error:[/bold red] ", end="", highlight=False)
        err_console.print(redact(str(exc)), markup=False, highlight=False)
        sys.exit(2)
