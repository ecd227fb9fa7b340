"""``labeler intervene``: test labels causally, by intervening on the features they name."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click
from rich.console import Console

from labeler.cli.app import cli, console, err_console
from labeler.cli.selection import selected_features
from labeler.errors import UserError

DEFAULT_WORDS = "wait,hmm,alternatively"
DEFAULT_CONTROLS = 19  # the fewest whose smallest p-value, 1 / (1 + K), is 0.05
_NAMED_DAMAGED = 5  # damaged log lines named one by one; the rest are counted
_NO_LIMIT = 10**8  # a tokenizer's model_max_length at or above this means "not set"


def _words(value: str) -> list[str]:
    from labeler.causal.measures import words_of

    words = [w.strip().lower() for w in value.split(",") if w.strip()]
    bad = [w for w in words if words_of(w) != [w]]
    if not words or bad:
        raise UserError(f"--words {value!r}: expected comma-separated words (letters only)")
    return words


@cli.command()
@click.argument("run", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--select", "groups", multiple=True, metavar="FIELD=VALUE[,...]",
              help="Features whose final label meets every condition; repeat for more groups "
                   "(a feature in any group is selected). Fields: category, subcategory, "
                   "mechanism, domain_type.")  # fmt: skip
@click.option("--features", "ids_file", type=click.Path(path_type=Path), default=None,
              help="A file of feature ids (L{layer}F{index}, one a line, # comments), added "
                   "to the selection.")  # fmt: skip
@click.option("--prompts", "prompts_path", type=click.Path(path_type=Path), default=None,
              help="JSONL of prompts (corpus formats; optional 'answer' per record) to "
                   "sample responses to. Not needed with --teacher-forced.")  # fmt: skip
@click.option("--teacher-forced", is_flag=True,
              help="No sampling: the expected rate of the words under the next-token "
                   "distribution over the run's corpus (or --corpus).")  # fmt: skip
@click.option(
    "--corpus",
    "corpus_path",
    type=click.Path(path_type=Path),
    default=None,
    help="The corpus read with --teacher-forced (default: the run's).",
)
@click.option(
    "--controls",
    default=DEFAULT_CONTROLS,
    show_default=True,
    help="Distinct random control selections, matched per layer and in activation "
    "frequency (fewer when the pool holds fewer). K controls can give p = 1 / (1 + K) at "
    "the smallest: 19 for 0.05. Each control is one more condition per mode to measure.",
)
@click.option("--modes", default="ablated,added", show_default=True,
              help="ablated: the selection ablated in the adapter model; added: only the "
                   "selection added to the hybrid model (branch off).")  # fmt: skip
@click.option(
    "--words",
    default=DEFAULT_WORDS,
    show_default=True,
    help="The word set counted (decoded words, any case).",
)
@click.option("--samples", default=1, show_default=True, help="Responses per prompt.")
@click.option("--limit", type=int, default=None, help="Use only the first N prompts (or traces).")
@click.option("--max-new-tokens", default=512, show_default=True)
@click.option(
    "--temperature", default=0.6, show_default=True, help="Sampling temperature (0: greedy)."
)
@click.option("--top-p", default=0.95, show_default=True)
@click.option("--batch-size", default=16, show_default=True, help="Responses generated together.")
@click.option(
    "--batch-tokens",
    default=8192,
    show_default=True,
    help="Token budget of a teacher-forced forward pass.",
)
@click.option(
    "--seed", default=0, show_default=True, help="Seeds the controls and every response's sampling."
)
@click.option("--device", default="auto", type=click.Choice(["auto", "cpu", "cuda"]),
              show_default=True)  # fmt: skip
@click.option("--dtype", default="auto", type=click.Choice(["auto", "float32", "bfloat16"]),
              show_default=True)  # fmt: skip
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="The study's folder (default RUN/interventions/sampled or teacher-forced); "
                   "a stopped study there resumes.")  # fmt: skip
@click.option(
    "--plot",
    "plot_path",
    type=click.Path(path_type=Path),
    default=None,
    help="Write the figure here (default: study.png in the study's folder).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--overwrite", is_flag=True, help="Discard a study with other settings there.")
def intervene(
    run: Path, groups: tuple[str, ...], ids_file: Path | None, prompts_path: Path | None,
    teacher_forced: bool, corpus_path: Path | None, controls: int, modes: str, words: str,
    samples: int, limit: int | None, max_new_tokens: int, temperature: float, top_p: float,
    batch_size: int, batch_tokens: int, seed: int, device: str, dtype: str, out: Path | None,
    plot_path: Path | None, as_json: bool, overwrite: bool,
) -> None:  # fmt: skip
    """Test labels causally: intervene on the features they name and measure what the
    model then does, against random controls.

    \b
    Conditions: the adapter model (baseline); the selection ablated; the hybrid model
    (branch off); the selection added to the hybrid; the same for each control.
    Measured: the word set per 1,000 generated tokens, response length, the share of
    responses that close their thinking, accuracy against 'answer' (the last \\boxed{}).
    Effects come with 95% bootstrap intervals and a permutation p-value among the
    distinct controls, stated with the smallest value that many controls can give.
    Results are stored as they finish; run it again to resume.

    \b
      labeler intervene RUN --prompts prompts.jsonl \\
          --select category=reasoning,subcategory=hesitation,mechanism=output
      labeler intervene RUN --teacher-forced --features hesitation.txt
    """
    from collectors.run_format import read_run_info
    from labeler.causal.selection import parse_group

    for group in groups:  # a malformed selection is named before anything else
        parse_group(group)
    word_set = _words(words)
    chosen_modes = [m.strip() for m in modes.split(",") if m.strip()]
    if not chosen_modes or any(m not in ("ablated", "added") for m in chosen_modes):
        raise UserError(f"--modes {modes!r}: choose from ablated, added")
    for name, value in (
        ("--samples", samples),
        ("--batch-size", batch_size),
        ("--max-new-tokens", max_new_tokens),
        ("--batch-tokens", batch_tokens),
    ):
        if value < 1:
            raise UserError(f"{name} {value}: must be at least 1")  # fmt: skip
    if controls < 0:
        raise UserError(f"--controls {controls}: must be 0 or more")
    if not 0 < top_p <= 1 or temperature < 0:
        raise UserError(f"--temperature {temperature}, --top-p {top_p}: the temperature must be "
                        "at least 0 and the top-p in (0, 1]")  # fmt: skip
    if not teacher_forced and prompts_path is None:
        raise UserError("--prompts FILE is needed to sample responses (or pass --teacher-forced)")
    info = read_run_info(run)
    selected = selected_features(run, groups, ids_file)
    from labeler.causal.conditions import conditions as study_conditions
    from labeler.causal.selection import draw_controls
    from labeler.run.data import RunData

    try:
        drawn = draw_controls(RunData.open(run).features, selected, controls, seed)
    except ValueError as exc:
        raise UserError(f"{run}: {exc}") from exc
    chatter = err_console if as_json else console  # --json keeps stdout for the report
    if drawn.shortfall:
        chatter.print(f"warning: {drawn.shortfall}", markup=False, highlight=False)
    plan_conditions = study_conditions(selected, drawn.controls, chosen_modes)  # type: ignore[arg-type]
    folder = out or run / "interventions" / ("teacher-forced" if teacher_forced else "sampled")
    study = _Study(run, info, folder, plan_conditions, word_set, seed, device, dtype, overwrite,
                   chatter)  # fmt: skip
    if teacher_forced:
        report = study.teacher_forced(corpus_path, limit, batch_tokens)
    else:
        assert prompts_path is not None
        from labeler.causal.generation import SamplingSettings

        settings = SamplingSettings(max_new_tokens, temperature, top_p, seed)
        report = study.sampled(prompts_path, limit, samples, settings, batch_size)
    from adapters.outputs import write_text_atomic
    from labeler.causal.plot import plot_study, study_title

    report = report.model_copy(update={"controls_asked": controls})
    write_text_atomic(folder / "report.json", report.model_dump_json(indent=1) + "\n")
    figure = plot_path or folder / "study.png"
    plot_study(report, study_title(groups, ids_file, report.measure), figure)
    if as_json:
        click.echo(report.model_dump_json(indent=1))
        return
    from labeler.cli.render_study import render_study

    render_study(console, report)
    console.print(f"study in {folder}; figure {figure}")


class _Study:
    def __init__(
        self, run: Path, info: Any, folder: Path, conditions: list[Any], words: list[str],
        seed: int, device: str, dtype: str, overwrite: bool, console: Console,
    ) -> None:  # fmt: skip
        self.run, self.info, self.folder = run, info, folder
        self.conditions, self.words, self.seed = conditions, words, seed
        self.device, self.dtype, self.overwrite = device, dtype, overwrite
        self.console = console

    def _plan(self, **extra: Any) -> dict[str, Any]:
        """Everything the results depend on, the device and dtype the model runs in
        included (``auto`` as resolved here): a study resumed in another precision
        would mix two models' responses."""
        from adapters.branch import resolve_device, resolve_dtype

        device = resolve_device(self.device)
        dtype = str(resolve_dtype(self.dtype, device)).removeprefix("torch.")
        return {"adapter_hash": self.info.adapter_hash, "words": self.words, "seed": self.seed,
                "conditions": [c.to_json() for c in self.conditions], "device": device.type,
                "dtype": dtype, **extra}  # fmt: skip

    def _log(self, name: str, key: tuple[str, ...], fields: Any) -> Any:
        """The study's result log; its damaged lines are named, at most a few."""
        from labeler.causal.records import ResultLog

        log = ResultLog(self.folder / name, key, fields)
        for damaged in log.damaged[:_NAMED_DAMAGED]:
            self.console.print(f"warning: {log.path}:{damaged.line}: a damaged line "
                               f"({damaged.reason}), skipped; what it held is measured again",
                               markup=False, highlight=False)  # fmt: skip
        if len(log.damaged) > _NAMED_DAMAGED:
            self.console.print(f"warning: {log.path}: {len(log.damaged) - _NAMED_DAMAGED} more "
                               "damaged lines skipped", markup=False, highlight=False)  # fmt: skip
        return log

    def _check_prompts(self, prompts: list[Any], max_new_tokens: int, path: Path) -> None:
        """Refuse prompts that do not fit the model's context with their responses,
        before the model is loaded."""
        from adapters.checkpoint import read_config, resolve_checkpoint
        from adapters.tokenizer_loading import load_tokenizer
        from labeler.causal.prompts import check_lengths

        folder = resolve_checkpoint(self.info.adapter_path)
        tokenizer = load_tokenizer(folder)
        context = read_config(folder)[1].get("max_position_embeddings")
        if not isinstance(context, int) or isinstance(context, bool):
            context = getattr(tokenizer, "model_max_length", None)
        if isinstance(context, int) and 0 < context < _NO_LIMIT:
            check_lengths(prompts, tokenizer, context, max_new_tokens, path)

    def _load(self) -> tuple[Any, Any]:
        from adapters.branch import load_adapter

        with self.console.status("loading the model"):
            adapter, tokenizer, _ = load_adapter(self.info.adapter_path, self.device, self.dtype)
        adapter.model.eval()
        return adapter, tokenizer

    def sampled(
        self, prompts_path: Path, limit: int | None, samples: int, settings: Any, batch_size: int
    ) -> Any:
        from dataclasses import asdict

        from labeler.causal.prompts import prompts_hash, read_prompts
        from labeler.causal.records import GENERATIONS, open_plan
        from labeler.causal.results import sampled_report
        from labeler.causal.study import (
            GENERATION_FIELDS,
            GENERATION_KEY,
            run_sampled,
            sampled_work,
        )

        prompts = read_prompts(prompts_path, self.info.params.chat_format, limit)
        self._check_prompts(prompts, settings.max_new_tokens, prompts_path)
        plan = self._plan(measure="sampled", prompts=prompts_hash(prompts), samples=samples,
                          sampling=asdict(settings))  # fmt: skip
        resuming = open_plan(self.folder, plan, self.overwrite)
        log = self._log(GENERATIONS, GENERATION_KEY, GENERATION_FIELDS)
        work = sampled_work(self.conditions, prompts, samples, log, batch_size)
        total = len(self.conditions) * len(prompts) * samples
        if resuming and len(log):
            self.console.print(f"resuming: {len(log):,} of {total:,} responses already generated")
        if work:
            adapter, tokenizer = self._load()
            with _Progress(self.console, "generating", "responses", total, len(log)) as progress:
                run_sampled(adapter, tokenizer, work, settings, log, progress.advance)
        references = {p.id: p.reference for p in prompts}
        return sampled_report(self.conditions, list(log), self.words, references,
                              len(prompts) * samples, self.seed)  # fmt: skip

    def teacher_forced(self, corpus_path: Path | None, limit: int | None, batch_tokens: int) -> Any:
        from collectors.corpus import read_traces, tokenize_traces
        from labeler.causal.records import TEACHER_FORCED, open_plan
        from labeler.causal.results import teacher_forced_report
        from labeler.causal.study import (
            TEACHER_FORCED_FIELDS,
            TEACHER_FORCED_KEY,
            run_teacher_forced,
        )
        from labeler.causal.teacher_forced import word_tokens

        path = corpus_path or Path(self.info.corpus_path)
        if not path.is_file():
            raise UserError(f"{path}: the corpus is not there; pass --corpus FILE")
        traces = list(read_traces(path))[:limit]
        adapter, tokenizer = self._load()
        params = self.info.params
        corpus = tokenize_traces(traces, tokenizer, params.max_length, params.chat_format, path)
        spelled = word_tokens(tokenizer, self.words)
        if not spelled.ids:
            raise UserError(f"no token of the tokenizer spells any of {', '.join(self.words)}")
        from collectors.collect import tokens_hash

        plan = self._plan(measure="teacher_forced", corpus=tokens_hash(corpus), limit=limit)
        resuming = open_plan(self.folder, plan, self.overwrite)
        log = self._log(TEACHER_FORCED, TEACHER_FORCED_KEY, TEACHER_FORCED_FIELDS)
        total = len(self.conditions) * corpus.n_sequences
        if resuming and len(log):
            self.console.print(f"resuming: {len(log):,} of {total:,} traces already read")
        if spelled.unspelled:
            self.console.print(f"not counted (no single token spells them): "
                          f"{', '.join(spelled.unspelled)}")  # fmt: skip
        with _Progress(self.console, "reading the corpus", "traces", total, len(log)) as progress:
            run_teacher_forced(adapter, corpus, self.conditions, spelled.ids, log, batch_tokens,
                               progress.advance)  # fmt: skip
        return teacher_forced_report(self.conditions, list(log), self.words, spelled.unspelled,
                                     corpus.n_sequences, self.seed)  # fmt: skip


class _Progress:
    """A bar over responses (or traces) with the tokens per second in its description."""

    def __init__(self, console: Console, label: str, unit: str, total: int, done: int) -> None:
        self.console = console
        self.label, self.unit, self.total, self.done = label, unit, total, done
        self.tokens = 0
        self.started = time.monotonic()

    def __enter__(self) -> _Progress:
        from labeler.cli.render import progress_bar

        self._bar = progress_bar(self.console, self.label, self.unit)
        self.progress = self._bar.__enter__()
        self.task = self.progress.add_task(self.label, total=self.total, completed=self.done)
        return self

    def __exit__(self, *exc: object) -> None:
        self._bar.__exit__(*exc)  # type: ignore[arg-type]

    def advance(self, units: int, tokens: int) -> None:
        self.tokens += tokens
        rate = self.tokens / max(time.monotonic() - self.started, 1e-9)
        self.progress.update(self.task, advance=units,
                             description=f"{self.label} ({rate:,.0f} tokens/s)")  # fmt: skip
