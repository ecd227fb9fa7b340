"""The labeler from Python (a notebook, a script): open a run, read its features, examples
and final labels as polars frames, label it, summarize it, run a causal study.

Each function is a thin wrapper over what the CLI runs: ``label`` hands a
:class:`~labeler.labeling.request.LabelingRequest` to the transport registry that
``labeler label`` uses, ``Run.labels`` and ``Run.summary`` call the code of ``labeler
summarize`` and ``labeler export``, ``study`` invokes ``labeler intervene`` itself. Errors
are exceptions (:class:`labeler.errors.UserError` for a bad input), never an exit; nothing
is printed unless ``progress=True``. Documented in docs/python.md.

Importing this module imports neither torch nor polars; they load when first needed.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from labeler.errors import UserError, first_error

if TYPE_CHECKING:
    import polars as pl

    from collectors.run_format import RunInfo
    from labeler.causal.results import StudyReport
    from labeler.judges.base import JudgeOptions
    from labeler.judges.ratelimit import RateLimits
    from labeler.labeling.engine import LabelReport
    from labeler.labeling.request import TransportName
    from labeler.labeling.store import LabelStore
    from labeler.reporting.disputes import DisputeRules
    from labeler.reporting.summarize import RunSummary
    from labeler.run.data import RunData

log = logging.getLogger(__name__)

__all__ = ["Feature", "Run", "effects", "label", "open_run", "study"]


@dataclass(frozen=True)
class Feature:
    """One feature: its statistics, its examples, every judge's judgment, its final label."""

    feature_id: str
    layer: int
    index: int
    stats: dict[str, Any]
    """Its row of ``features.parquet`` (frequency, count, per-domain and per-region
    counts, logit lens; docs/run-format.md)."""
    examples: pl.DataFrame
    """Its examples: kind (top, random, quantile), rank, activation, tokens, acts, ..."""
    judgments: pl.DataFrame
    """One row per judge: status, explanation, labels, detection scores (empty when the
    run has no labels or the feature was not planned)."""
    label: dict[str, Any] | None
    """Its final label (a row of ``Run.labels()``); None when it is not planned."""
    neighbours: pl.DataFrame | None = None
    """Its nearest features of its layer (kind: decoder, encoder or coactivation; rank,
    feature_id, value, shared), as its page lists them (docs/feature-pages.md); None until
    ``labeler browse`` has built the run's neighbour index."""


class Run:
    """A collected run folder, read lazily. Open one with :func:`open_run`."""

    def __init__(self, data: RunData) -> None:
        self._data = data

    @property
    def path(self) -> Path:
        return self._data.folder

    @property
    def info(self) -> RunInfo:
        """``run.json``: the adapter, the corpus, the layers, alive counts, parameters."""
        return self._data.info

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r})"

    @property
    def features(self) -> pl.DataFrame:
        """One row per feature of every collected layer (feature_id, layer, index, alive,
        frequency, count, ...); read once."""
        return self._data.features

    @property
    def examples(self) -> pl.LazyFrame:
        """Every stored example, lazily: filter on ``layer`` and ``index`` (the file is in
        that order, so other row groups are skipped) before ``.collect()``."""
        import polars as pl

        from collectors.run_format import EXAMPLES

        return pl.scan_parquet(self.path / EXAMPLES)

    def labels(self) -> pl.DataFrame:
        """The final label of every planned feature, as ``labeler summarize`` and
        ``labeler export`` count them: a person's decision, else the judges' consensus,
        else one judge (column ``source``: human, consensus, single_judge or none)."""
        from labeler.reporting.final_labels import final_labels
        from labeler.reporting.label_table import judgment_frame, planned_frame, review_frame

        with self._store() as store:
            planned = planned_frame(store)
            judgments = judgment_frame(store).join(
                planned.select("feature_id", "layer"), on="feature_id"
            )
            return final_labels(planned, judgments, review_frame(store))

    def summary(self, rules: DisputeRules | None = None) -> RunSummary:
        """What ``labeler summarize`` reports (``summary.json``'s object), computed anew;
        nothing is written."""
        from labeler.reporting.summarize import summarize

        with self._store() as store:
            return summarize(store, self.info, str(self.path), rules)

    def audit(self, n: int, seed: int | None = None, weighting: str = "uncertainty") -> list[str]:
        """Draw ``n`` labeled features for people to decide, as ``labeler audit`` does
        (docs/audit.md); the feature ids in draw order, the order to decide them in.
        Their decisions correct :meth:`summary`'s shares (its ``audit``)."""
        from labeler.audit.design import new_audit

        with self._store() as store:
            return new_audit(store, n, seed, weighting).drawn.feature_ids  # type: ignore[arg-type]

    def feature(self, feature_id: str | tuple[int, int]) -> Feature:
        """One feature by id (``"L3F17"``) or (layer, index)."""
        import polars as pl

        from collectors.run_format import feature_id as format_id
        from collectors.run_format import parse_feature_id
        from labeler.reporting.label_table import judgment_frame

        if isinstance(feature_id, tuple):
            layer, index = feature_id
        else:
            try:
                layer, index = parse_feature_id(feature_id)
            except ValueError as exc:
                raise UserError(f"{self.path}: {exc}") from exc
        fid = format_id(layer, index)
        rows = self.features.filter(pl.col("feature_id") == fid)
        if rows.is_empty():
            layers = ", ".join(map(str, sorted(set(self.features["layer"].to_list()))))
            raise UserError(f"{self.path}: no feature {fid}; its layers are {layers}, each with "
                            f"{self.info.n_features_per_layer} features")  # fmt: skip
        examples = (
            self.examples.filter((pl.col("layer") == layer) & (pl.col("index") == index))
            .drop("feature_id", "layer", "index")
            .collect()
        )
        judgments = pl.DataFrame()
        final = None
        if (self.path / "labels.sqlite").exists():
            with self._store() as store:
                judgments = judgment_frame(store, full=True, feature_id=fid).sort("judge")
            labeled = self.labels().filter(pl.col("feature_id") == fid)
            final = labeled.row(0, named=True) if labeled.height else None
        return Feature(fid, layer, index, rows.row(0, named=True), examples, judgments, final,
                       self._neighbours(layer, index))  # fmt: skip

    def _neighbours(self, layer: int, index: int) -> pl.DataFrame | None:
        import polars as pl

        from labeler.review.neighbours import NeighbourIndex

        found = NeighbourIndex.open(self.path)
        if found is None:
            return None
        try:
            lists = found.of(layer, index)
        finally:
            found.close()
        rows = [
            {"kind": kind, "rank": rank, "feature_id": n.feature_id, "value": n.value,
             "shared": n.shared}
            for kind, listed in lists.items()
            for rank, n in enumerate(listed, 1)
        ]  # fmt: skip
        schema = {"kind": pl.String, "rank": pl.Int32, "feature_id": pl.String,
                  "value": pl.Float64, "shared": pl.Int64}  # fmt: skip
        return pl.DataFrame(rows, schema=schema)

    @contextlib.contextmanager
    def _store(self) -> Iterator[LabelStore]:
        from labeler.labeling.store import LabelStore

        path = self.path / "labels.sqlite"
        if not path.exists():
            raise UserError(f"{self.path}: no labels yet; label it first "
                            f"(labeler.label(run) or `labeler label {self.path}`)")  # fmt: skip
        store = LabelStore(path)
        try:
            yield store
        finally:
            store.close()


def open_run(path: str | Path) -> Run:
    """The run folder ``path`` (``run.json`` checked now; tables read when first used)."""
    from labeler.run.data import RunData

    return Run(RunData.open(Path(path)))


def _as_run(run: Run | str | Path) -> Run:
    return run if isinstance(run, Run) else open_run(run)


def label(
    run: Run | str | Path,
    judges: str | Sequence[str] = ("heuristic",),
    *,
    sample_per_layer: int | None = None,
    seed: int = 0,
    executor: TransportName = "local",
    budget_usd: float | None = None,
    concurrency: int = 8,
    max_inflight: int | None = None,
    poll_s: float | None = None,
    limits: Mapping[str, RateLimits] | None = None,
    wait: bool = False,
    options: JudgeOptions | Mapping[str, Any] | None = None,
    resamples: int | None = None,
    progress: bool = False,
) -> dict[str, LabelReport]:
    """Label ``run`` as ``labeler label`` does: the same request, the same transports
    (``local``, ``celery``, ``batch``); a re-run labels only what is missing or failed.

    ``options``: a :class:`~labeler.judges.base.JudgeOptions` or its fields as a dict
    (``base_url``, ``timeout_s``, ``n_examples``, ...). ``resamples``: classify each
    feature that many more times on seeded halves of its examples (``labeler label
    --resamples``; the options' ``resamples`` otherwise). Returns each judge's report
    (planned, skipped, labeled, failed, spent_usd). Raises ``UserError`` when a judge
    cannot work or the run is busy; features that failed are counted in the reports
    (rerun to retry them), not raised.
    """
    from pydantic import ValidationError

    from labeler.judges.base import JudgeOptions
    from labeler.labeling.request import Hooks, LabelingRequest
    from labeler.labeling.store import LabelStore
    from labeler.labeling.transports.registry import TRANSPORTS, prepare

    target = _as_run(run)
    names = (judges,) if isinstance(judges, str) else tuple(judges)
    if not names:
        raise UserError("judges: name at least one judge (heuristic, openai:MODEL, ...)")
    if executor not in TRANSPORTS:
        raise UserError(f"executor {executor!r}: choose one of {', '.join(TRANSPORTS)}")
    fields = (
        options.model_dump(exclude_unset=True) if isinstance(options, JudgeOptions)
        else {"seed": seed} | dict(options or {})
    )  # fmt: skip
    if resamples is not None:
        fields["resamples"] = resamples
    if not isinstance(options, JudgeOptions) or resamples is not None:
        try:
            options = JudgeOptions(**fields)
        except ValidationError as exc:
            field, message = first_error(exc)
            raise UserError(f"options: {field}: {message}") from exc
    request = LabelingRequest(
        judges=names, options=options, sample_per_layer=sample_per_layer, seed=seed,
        budget_usd=budget_usd, wait=wait, limits=dict(limits or {}), concurrency=concurrency,
        max_inflight=max_inflight, poll_s=poll_s,
    )  # fmt: skip
    prepared = prepare(executor, request)
    if prepared.notice is not None:
        log.info("%s", prepared.notice)
    store = LabelStore(target.path / "labels.sqlite")
    try:
        with _progress(progress, prepared.title) as advance:

            def started(n: int) -> None:  # as the CLI does: the costs' price table
                store.set_meta("prices", prepared.prices.source)
                advance(0, n)

            hooks = Hooks(started, lambda _judge, _ok: advance(1, None))
            reports = prepared.label(target._data, store, hooks)
    finally:
        store.close()
    if (after := prepared.after()) is not None:
        log.warning("%s", after)
    stopped = next(iter(reports.values())).stopped if reports else None
    if stopped is not None and stopped != "interrupted":
        raise UserError(f"{stopped}; stopped before spending on the rest of the run")
    if stopped == "interrupted":
        raise KeyboardInterrupt("labeling interrupted; everything finished is stored")
    return reports


@contextlib.contextmanager
def _progress(show: bool, title: str) -> Iterator[Any]:
    """A function ``advance(done, total)``: a progress bar on stderr, or nothing."""
    if not show:
        yield lambda _done, _total: None
        return
    from rich.console import Console

    from labeler.cli.render import progress_bar

    with progress_bar(Console(stderr=True), title, "features") as bar:
        task = bar.add_task(title, total=None)

        def advance(done: int, total: int | None) -> None:
            if total is not None:
                bar.update(task, total=total)
            bar.advance(task, done)

        yield advance


def study(
    run: Run | str | Path,
    select: str | Sequence[str] = (),
    features: Sequence[str] | str | Path | None = None,
    *,
    progress: bool = False,
    **settings: Any,
) -> StudyReport:
    """Run ``labeler intervene`` on ``run`` and return its report (also written to the
    study's folder with its figure, as the command writes them).

    ``select``: one or more ``FIELD=VALUE[,...]`` groups of final labels; ``features``:
    feature ids, or a file of them. ``settings`` are the command's options by their
    Python names: ``teacher_forced=True``, ``prompts=PATH``, ``corpus=PATH``,
    ``controls=19``, ``modes=["ablated"]``, ``words=["wait", "hmm"]``, ``limit=16``,
    ``samples``, ``max_new_tokens``, ``temperature``, ``top_p``, ``batch_size``,
    ``batch_tokens``, ``seed``, ``device``, ``dtype``, ``out``, ``plot``, ``overwrite``.
    A stopped study resumes. Progress (on stderr) only with ``progress=True``.
    """
    import click

    from labeler.causal.results import StudyReport
    from labeler.cli.intervene import intervene

    target = _as_run(run)
    renamed = {"prompts": "prompts_path", "corpus": "corpus_path", "plot": "plot_path"}
    params = {p.name for p in intervene.params} - {"run", "groups", "ids_file", "as_json"}
    kwargs: dict[str, Any] = {}
    for name, value in settings.items():
        key = renamed.get(name, name)
        if key not in params:
            known = sorted({next((k for k, v in renamed.items() if v == p), p) for p in params})
            raise TypeError(f"study() got an unknown setting {name!r}; known: {', '.join(known)}")
        if key in ("modes", "words") and not isinstance(value, str):
            value = ",".join(value)
        elif key in ("prompts_path", "corpus_path", "plot_path", "out") and value is not None:
            value = Path(value)
        kwargs[key] = value
    groups = (select,) if isinstance(select, str) else tuple(select)
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.ExitStack() as stack:
        ids_file = _ids_file(stack, features)
        stack.enter_context(contextlib.redirect_stdout(stdout))  # the command's JSON report
        if not progress:
            stack.enter_context(contextlib.redirect_stderr(stderr))
        with click.Context(intervene, info_name="intervene") as ctx:
            ctx.invoke(intervene, run=target.path, groups=groups, ids_file=ids_file,
                       as_json=True, **kwargs)  # fmt: skip
    for line in stderr.getvalue().splitlines():
        log.info("%s", line)
    return StudyReport.model_validate_json(stdout.getvalue())


def _ids_file(
    stack: contextlib.ExitStack, features: Sequence[str] | str | Path | None
) -> Path | None:
    """``features`` as the command takes them: a file of feature ids."""
    if features is None:
        return None
    if isinstance(features, (str, Path)):
        return Path(features)
    folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="labeler-study-")))
    ids = list(features)
    shown = ",".join(ids[:3]) + (f"+{len(ids) - 3}" if len(ids) > 3 else "")
    path = folder / f"{shown or 'none'}.txt"  # the study's title names its file
    path.write_text("".join(f"{fid}\n" for fid in features), encoding="utf-8")
    return path


def effects(report: StudyReport) -> pl.DataFrame:
    """A study's effects as one frame: per mode, the selection's row and each control's
    (difference in the word rate per 1,000 tokens against the reference, its 95%
    interval), with the mode's permutation p-value."""
    import polars as pl

    rows = []
    for mode in report.modes:
        for kind, effect in [("selection", mode.selection)] + [
            ("control", c) for c in mode.controls
        ]:
            rows.append({"mode": mode.mode, "kind": kind, "condition": effect.condition,
                         "reference": effect.reference, "reference_rate": effect.reference_rate,
                         "rate": effect.rate, "difference": effect.difference, "low": effect.low,
                         "high": effect.high, "p_value": mode.p_value})  # fmt: skip
    return pl.DataFrame(rows)
