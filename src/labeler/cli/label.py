"""``labeler label`` (every transport) and ``labeler status``."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import click

from labeler.errors import UserError

if TYPE_CHECKING:
    from labeler.labeling.request import LabelingRequest, TransportName
    from labeler.labeling.transports.registry import Prepared
    from labeler.run.data import RunData

from labeler.cli.app import (
    _open_labels,
    cli,
    console,
    err_console,
)


def _label(run_path: Path, executor: TransportName, request: LabelingRequest,
           dry_run: bool) -> None:  # fmt: skip
    """Label the run on the transport named ``executor``, or estimate what it would take."""
    from labeler.labeling.transports.registry import build_judges, prepare
    from labeler.run.data import RunData

    run = RunData.open(run_path)
    if not run.info.negatives_checked:
        err_console.print(
            f"note: {run_path} was imported ({run.info.source}); its detection negatives are "
            "checked only against the features known active in them"
        )
    if dry_run:
        from labeler.judges.pricing import load_prices

        judges = build_judges(request)  # unknown names fail before work
        _dry_run(run, judges, request.sample_per_layer, request.seed,
                 load_prices(request.options.prices))  # fmt: skip
        return
    prepared = prepare(executor, request)
    if prepared.notice is not None:
        console.print(f"{prepared.notice}; `labeler status {run_path}` shows it")
    _run_labeling(run_path, run, prepared, request.budget_usd)


def _run_labeling(
    run_path: Path, run: RunData, prepared: Prepared, budget_usd: float | None
) -> None:
    """Label on the prepared transport, under a progress bar and the interrupt handlers;
    then what it did, and the exit status."""
    from labeler.cli.render import progress_bar
    from labeler.labeling.interrupts import Interrupts
    from labeler.labeling.request import Hooks
    from labeler.labeling.store import LabelStore

    store = LabelStore(run_path / "labels.sqlite")
    try:
        with (
            Interrupts(_say_interrupt) as interrupts,
            progress_bar(console, prepared.title, "features") as progress,
        ):
            task = progress.add_task(prepared.title, total=None)

            def started(n: int) -> None:  # under the run's lock, once planned
                store.set_meta("prices", prepared.prices.source)
                progress.update(task, total=n)

            hooks = Hooks(started, lambda _judge, _ok: progress.advance(task), interrupts)
            reports = prepared.label(run, store, hooks)
        after = prepared.after()
        if after is not None:
            err_console.print(after)
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


def _dry_run(run: Any, judges: list[Any], sample: int | None, seed: int, prices: Any) -> None:
    from labeler.cli.render import estimate_table
    from labeler.labeling.accounting import estimate
    from labeler.labeling.plan import select_features, work_order
    from labeler.labeling.store import LabelStore

    store_path = run.folder / "labels.sqlite"
    store = LabelStore(store_path) if store_path.exists() else None
    try:
        stored = store.planned() if store is not None else []
        # in the order a labeling takes them: the estimate's sample spans the layers
        planned = work_order(select_features(run, stored, sample, seed).features, seed)
        estimates = []
        for judge in judges:
            # a feature whose judgment lacks a scorer asked for now is asked that
            # scorer's call only; one not judged yet, every call
            scorers = getattr(judge, "scorers", ())
            judged = store.done(judge.name) if store is not None else set()
            todo = [fid for fid in planned if fid not in judged]
            rescore: dict[str, list[str]] = {}
            for scorer in scorers:
                if store is not None and scorer != "detection":
                    carrying = store.done(judge.name, (scorer,))
                    rescore[scorer] = [f for f in planned if f in judged and f not in carrying]
            resamples = getattr(judge, "resamples", 0)
            if store is not None and resamples and getattr(judge, "calls_per_feature", 0):
                # K calls of each judged feature without resamples (a call per entry)
                carrying = store.done(judge.name, ("resamples",))
                lacking = [f for f in planned if f in judged and f not in carrying]
                rescore["resample"] = lacking * resamples
            estimates.append(estimate(run, judge, todo, prices, store, rescore))
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
@click.option("--scorers", default="detection", show_default=True, metavar="LIST",
              help="How explanations are scored, comma-separated: detection (always), fuzz "
                   "(are the marked tokens the ones the explanation predicts), intruder "
                   "(find the window that does not belong; no explanation). Adding a "
                   "scorer later scores the labeled features without labeling them again. "
                   "See docs/labeling.md.")  # fmt: skip
@click.option("--resamples", default=0, show_default=True, metavar="K",
              help="Classify each feature K more times (0 to 20), each on a seeded random "
                   "half of its examples, for a confidence in its label: the share of those "
                   "answers agreeing with the label (which stays the classification of all "
                   "examples). K more classifier calls per feature; on a labeled run, only "
                   "those calls. See docs/labeling.md.")  # fmt: skip
@click.option("--explain-from", default="examples", show_default=True, metavar="LIST",
              help="What the explainer sees, comma-separated: examples (the top activating "
                   "examples) and/or outputs (the logit lens with values and, where "
                   "`labeler score-outputs` ran, the tokens steering promotes). Recorded in "
                   "each label's prompt hash.")  # fmt: skip
@click.option("--concurrency", default=8, show_default=True,
              help="Model requests in flight per judge.")  # fmt: skip
@click.option("--seed", default=0, show_default=True, help="Seed of the sample and negatives.")
@click.option("--executor", type=click.Choice(["local", "celery", "batch"]), default="local",
              show_default=True,
              help="local: in this process. celery: on the worker fleet behind "
                   "LABELER_REDIS_URL (start workers with "
                   "`.venv/bin/celery -A workers worker -Q ...`; see docs/fleet.md). "
                   "batch: the providers' batch APIs at half price, "
                   "replies within 24 h (openai: and anthropic: judges; see "
                   "docs/batches.md).")  # fmt: skip
@click.option("--max-inflight", type=int, default=None,
              help="celery: (feature, judge) pairs in flight at once [default: 256]; batch: "
                   "features in flight at once [default: 50000].")  # fmt: skip
@click.option(
    "--poll-s",
    type=float,
    default=None,
    help="batch: seconds between looks at the batches in flight [default: 30].",
)
@click.option("--service-tier", type=click.Choice(["default", "flex"]), default="default",
              show_default=True,
              help="openai: judges: flex processing gives batch prices on ordinary calls, "
                   "with slower replies (15 min timeout) and 429s when OpenAI lacks capacity "
                   "(retried after a wait).")  # fmt: skip
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
    scorers: str,
    resamples: int,
    explain_from: str,
    concurrency: int,
    seed: int,
    executor: str,
    max_inflight: int | None,
    poll_s: float | None,
    service_tier: str,
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
      labeler label RUN --judge openai:gpt-5-mini --executor batch   (half price, <= 24 h)
      labeler label RUN --judge openai:gpt-5-mini --service-tier flex
      labeler label RUN --scorers detection,fuzz,intruder
      labeler label RUN --judge openai:gpt-5-mini --resamples 5
      labeler label RUN --judge openai:gpt-5-mini --explain-from examples,outputs
    """
    from pydantic import ValidationError

    from labeler.judges.base import JudgeOptions
    from labeler.judges.resampling import MAX_RESAMPLES
    from labeler.judges.scorers import parse_explain_from, parse_scorers

    if not 0 <= resamples <= MAX_RESAMPLES:
        raise UserError(
            f"--resamples: {resamples} is out of range: 0 (none) to {MAX_RESAMPLES} "
            "classifier calls more per feature"
        )
    api = openai_api or ("chat" if base_url else "responses")
    try:
        options = JudgeOptions(
            base_url=base_url, openai_api=api, timeout_s=timeout_s, max_attempts=max_attempts,
            logprobs=logprobs, n_examples=n_examples, max_output_tokens=max_output_tokens,
            device=device, dtype=dtype, prices=prices, seed=seed, service_tier=service_tier,
            scorers=parse_scorers(scorers), explain_from=parse_explain_from(explain_from),
            resamples=resamples,
        )  # fmt: skip
    except ValidationError as exc:
        first = exc.errors()[0]
        name = {"timeout_s": "timeout"}.get(str(first["loc"][0]), str(first["loc"][0]))
        raise UserError(f"--{name.replace('_', '-')}: {first['msg']}") from exc
    from labeler.labeling.request import LabelingRequest

    request = LabelingRequest(
        judges=judges, options=options, sample_per_layer=sample_per_layer, seed=seed,
        budget_usd=budget_usd, wait=wait, limits=_rate_limits(judges, rpm, tpm),
        concurrency=concurrency, max_inflight=max_inflight, poll_s=poll_s, requeue=requeue,
    )  # fmt: skip
    request.check(cast("TransportName", executor))  # a dry run is refused what a run is
    _label(run_path, cast("TransportName", executor), request, dry_run)


def _rate_limits(judges: tuple[str, ...], rpm: tuple[str, ...], tpm: tuple[str, ...]) -> Any:
    """``--rpm``/``--tpm`` values as limits per judge; a value without JUDGE= applies to
    every judge that calls an API or a model server."""
    from pydantic import ValidationError

    from labeler.judges.ratelimit import RateLimits

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


@cli.command()
@click.argument("run_path", metavar="RUN", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
def status(run_path: Path, as_json: bool) -> None:
    """Per judge: labeled, failed (by reason), pending; tokens and cost."""

    from collectors.run_format import read_run_info
    from labeler.cli.render import batches_table, status_table
    from labeler.judges.pricing import load_prices
    from labeler.labeling.accounting import run_status
    from labeler.labeling.batch_records import BatchRecords

    read_run_info(run_path)
    store = _open_labels(run_path)
    try:
        statuses, note = _live_status(store, run_status(store))
        n_planned = len(store.planned())
        executor = store.get_meta("executor") or "local"
        batches = BatchRecords(store).open()
        priced_with = store.get_meta("prices") or load_prices().source
    finally:
        store.close()
    if as_json:
        click.echo(json.dumps([s.model_dump() for s in statuses], indent=2))
        return
    console.print(f"{run_path}: {n_planned:,} features planned; executor {executor}")
    for table in status_table(statuses):
        console.print(table)
    if batches:
        console.print(batches_table(batches, time.time()))
    console.print(f"prices: {priced_with}", highlight=False)
    if note:
        err_console.print(note)


def _live_status(store: Any, statuses: list[Any]) -> tuple[list[Any], str | None]:
    """Queued and running work, throughput and ETA: from the fleet's Redis for a
    labeling by the Celery executor, from the local executor's heartbeat otherwise."""

    from labeler.labeling.accounting import throughput, with_live_state

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
