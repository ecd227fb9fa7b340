"""A labeled run as EleutherAI delphi results (``labeler export --format delphi``).

delphi (the ``eai-delphi`` package, 0.1.3) explains and scores sparse-coder latents and
keeps its results as one small JSON file per latent; its analysis
(``delphi.log.result_analysis``) reads them back into a frame and reports accuracy, F1
and AUC. The export writes each judge's explanations and detection scores the way delphi
writes its own, one delphi results folder per judge::

    OUT/
      labels.jsonl              one line per planned feature: its final label (below)
      judges.json               each judge: its folder and how many features it holds
      JUDGE/                    one delphi results folder per judge ("openai:gpt-5-mini"
                                is "openai_gpt-5-mini": characters other than letters,
                                digits, ".", "_" and "-" become "_")
        run_config.json         {name, sparse_model, hookpoints, scorers, explainer_model,
                                constructor_cfg}: what delphi's analysis reads of a run
        log/hookpoint_firing_counts.pt
                                torch file: {module: int64 tensor of each latent's number
                                of active corpus tokens}, every latent of the layer
        explanations/MODULE_latentI.txt
                                the judge's explanation as a JSON string
        scores/detection/MODULE_latentI.txt
                                the judge's detection answers: a JSON array of
                                {str_tokens, activations, distance, activating,
                                 prediction, probability, correct}
        scores/fuzz/MODULE_latentI.txt
                                the judge's fuzzing answers, records of the same
                                layout (``labeler.formats.delphi_fuzz``), where it was
                                scored by fuzzing

A layer's module is ``layers.{layer}.mlp`` (the adapter sits on each MLP, as delphi names
its transcoder hookpoints); no module name is part of another's, so delphi's glob
``*{module}*`` finds a module's files only. The latent is the feature's index in its
layer: feature ``L{layer}F{index}`` is ``layers.{layer}.mlp_latent{index}``.

A scores file holds every snippet the judge was asked about, in the order it saw them:
the top set's, then the random set's. ``str_tokens`` are the snippet's tokens,
``activations`` the feature's activation on each (zeros on the corpus windows checked not
to activate it), ``activating`` the truth, ``prediction`` the judge's answer,
``probability`` its probability of "activating" where the backend gives one (else null),
``correct`` whether the answer is right; ``distance`` is 0 on a positive of the top set,
1 on one of the random set and -1 on a negative (delphi writes the example's quantile and
-1 there; its analysis only carries it along). So a latent's share of ``correct``
records is the judgment's detection accuracy.

The answers are the judges' own. An LLM judge (``openai:``, ``anthropic:``, ``hf:``)
keeps each detection call's answers in the label store (``stages``); the snippets they
answer are rebuilt from the run as the judge built them, with the labeling's seed. The
heuristic judge keeps none, but it is deterministic: its answers are recomputed from the
run. A judge's scores files in a layer are written only when every feature of the layer
it has answers for rebuilds to what is stored (each snippet's truth; for the heuristic,
each set's scores), and the heuristic's only when the LLM judges' rebuild too (its
negatives are drawn with the same seed); otherwise the seed or the run is not the
labeling's, and the layer gets explanations only. A heuristic-only run labeled with
another seed is not always caught (its answers on other negatives can give the same
scores). Other judges get explanations only.

Intruder scores are not written: delphi 0.1.3's pipeline neither runs nor writes its
intruder scorer, whose results (one pick among a trial's windows) are not per-example
records, and its analysis reads every folder under ``scores/`` as such records. They
are in the catalog (docs/delphi.md).
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import sqlite3
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from collectors.run_format import EXAMPLES, FEATURES, publish
from labeler.formats.catalog import LayerReader
from labeler.formats.circuit_tracer import staging_folder
from labeler.formats.delphi_fuzz import FUZZ, FUZZ_SCORES, LayerFuzz, layer_fuzz
from labeler.judges.heuristic import N_POSITIVES as HEURISTIC_POSITIVES
from labeler.judges.heuristic import PATTERN_COVERAGE, PATTERN_MAX
from labeler.judges.llm_judge import DETECTION_SETS, JudgeSettings
from labeler.judges.prompting import SNIPPET_AFTER, SNIPPET_BEFORE
from labeler.judges.stages import is_staged
from labeler.labeling.plan import N_NEGATIVES
from labeler.labeling.store import LabelStore
from labeler.reporting.disputes import DisputeRules
from labeler.reporting.label_table import HEURISTIC, layer_range
from labeler.reporting.summarize import no_labels
from labeler.run.data import RunData
from prompts import normalize_token

log = logging.getLogger(__name__)

PREPARING = 1  # layers prepared ahead, on as many threads, while one is written
SCORER = "detection"
LABELS = "labels.jsonl"
JUDGES = "judges.json"
RUN_CONFIG = "run_config.json"
FIRING_COUNTS = "log/hookpoint_firing_counts.pt"
EXPLANATIONS = "explanations"
SCORES = f"scores/{SCORER}"
LLM_POSITIVES = JudgeSettings().n_positives
N_POSITIVES = max(HEURISTIC_POSITIVES, LLM_POSITIVES)
SET_OFFSET = {kind: i for i, kind in enumerate(DETECTION_SETS)}  # seeds, and file order
NEGATIVE_DISTANCE = -1.0
_RESERVED = {LABELS, JUDGES}
_SCORE_FIELDS = ("accuracy", "precision", "recall", "n_positive", "n_negative")
_SET_ORDER = pl.col("set").replace_strict(SET_OFFSET, return_dtype=pl.Int32)
_WRITE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)


def module_name(layer: int) -> str:
    """The delphi module (hookpoint) of a layer's features."""
    return f"layers.{layer}.mlp"


def latent_file(layer: int, index: int) -> str:
    """The file name of a feature's explanation and scores in a delphi folder."""
    return f"{module_name(layer)}_latent{index}.txt"


def folder_names(judges: Iterable[str]) -> dict[str, str]:
    """Each judge's folder: its name with anything but letters, digits, '.', '_' and '-'
    made '_', a suffix where two would meet."""
    out: dict[str, str] = {}
    taken = set(_RESERVED)
    for judge in judges:
        base = re.sub(r"[^A-Za-z0-9._-]+", "_", judge).strip("._") or "judge"
        name, n = base, 2
        while name in taken:
            name, n = f"{base}-{n}", n + 1
        taken.add(name)
        out[judge] = name
    return out


def export_delphi(
    run: RunData,
    store: LabelStore,
    out: Path,
    overwrite: bool = False,
    rules: DisputeRules | None = None,
    progress: Callable[[int], None] | None = None,
    seed: int = 0,
) -> int:
    """Write the delphi folders (see the module) to ``out``, whole or not at all; returns
    the number of features with an explanation in at least one of them. ``progress`` is
    told each layer's planned features; ``seed`` is the ``--seed`` the run was labeled
    with (the detection snippets are rebuilt from it)."""
    for table in ("planned", "judgments"):
        if store.conn.execute(f"SELECT 1 FROM {table} LIMIT 1").fetchone() is None:
            raise no_labels(store)
    staging = staging_folder(out, overwrite)
    try:
        written = _write(run, store, staging, rules, progress, seed)
        publish(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return written


# -- the folders ------------------------------------------------------------------------------


@dataclass
class _Judge:
    """One judge's delphi folder and what went into it."""

    name: str
    folder: Path
    explained: int = 0
    scored: int = 0
    fuzz_scored: int = 0

    def __post_init__(self) -> None:
        (self.folder / EXPLANATIONS).mkdir(parents=True)

    @property
    def source(self) -> str:
        """Where its answers come from."""
        if self.name == HEURISTIC:
            return "recomputed"
        return "stages" if is_staged(self.name) else "none"


@dataclass
class _LayerFiles:
    """What one layer adds to the folders, prepared on a worker thread."""

    planned: int
    labels: pl.DataFrame
    explained: int
    explanations: dict[str, pl.DataFrame] = field(default_factory=dict)  # (index, text)
    scores: dict[str, pl.DataFrame] = field(default_factory=dict)  # (index, text)
    mismatched: int = 0
    fuzz: LayerFuzz = field(default_factory=LayerFuzz)


def _write(
    run: RunData,
    store: LabelStore,
    folder: Path,
    rules: DisputeRules | None,
    progress: Callable[[int], None] | None,
    seed: int,
) -> int:
    """Layers are prepared ahead on worker threads (polars, mostly) while the main thread
    writes the files of the one before."""
    layers = sorted(int(r[0]) for r in store.conn.execute("SELECT DISTINCT layer FROM planned"))
    judges = {
        name: _Judge(name, folder / sub) for name, sub in folder_names(store.judges()).items()
    }
    layer_data = _LayerData(run, store, rules or DisputeRules(), seed, set(judges))
    explained = mismatched = fuzz_mismatched = 0
    with (
        (folder / LABELS).open("wb") as labels,
        ThreadPoolExecutor(PREPARING, "delphi-layer") as pool,
    ):
        pending = deque(pool.submit(layer_data.prepare, layer) for layer in layers[:PREPARING])
        for i, layer in enumerate(layers):
            files = pending.popleft().result()
            if i + PREPARING < len(layers):
                pending.append(pool.submit(layer_data.prepare, layers[i + PREPARING]))
            files.labels.write_ndjson(labels)
            for name, judge in judges.items():
                if name in files.explanations:
                    judge.explained += _write_texts(
                        judge.folder / EXPLANATIONS, layer, files.explanations[name]
                    )
                if name in files.scores:
                    judge.scored += _write_texts(judge.folder / SCORES, layer, files.scores[name])
                if name in files.fuzz.texts:
                    judge.fuzz_scored += _write_texts(
                        judge.folder / FUZZ_SCORES, layer, files.fuzz.texts[name]
                    )
            explained += files.explained
            mismatched += files.mismatched
            fuzz_mismatched += files.fuzz.mismatched
            if progress is not None:
                progress(files.planned)
    _write_logs(run, layers, list(judges.values()))
    summary = [
        {
            "judge": j.name,
            "folder": j.folder.name,
            "explanations": j.explained,
            "scores": j.scored,
            "without_scores": j.explained - j.scored,
            "fuzz_scores": j.fuzz_scored,
            "scores_from": j.source,
        }
        for j in judges.values()
    ]
    (folder / JUDGES).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    if mismatched:
        log.warning(
            "%d judgments got no scores file: their layer's detection snippets, rebuilt "
            "with seed %d, do not all match what is stored",
            mismatched,
            seed,
        )
    if fuzz_mismatched:
        log.warning(
            "%d judgments with a fuzzing score got no fuzz file: their layer's fuzzing "
            "items, rebuilt with seed %d, do not all score to what is stored",
            fuzz_mismatched,
            seed,
        )
    return explained


def _write_texts(folder: Path, layer: int, texts: pl.DataFrame) -> int:
    """One file per (index, text) row, named as delphi names it."""
    if texts.is_empty():
        return 0
    folder.mkdir(parents=True, exist_ok=True)
    prefix = f"{folder}{os.sep}{module_name(layer)}_latent"
    for index, text in texts.iter_rows():
        data = memoryview(text.encode("utf-8"))
        fd = os.open(f"{prefix}{index}.txt", _WRITE_FLAGS, 0o644)
        try:
            while data:
                data = data[os.write(fd, data) :]
        finally:
            os.close(fd)
    return texts.height


def _write_logs(run: RunData, layers: list[int], judges: list[_Judge]) -> None:
    """Each folder's run_config.json and firing counts (left out where torch is missing:
    delphi's loader does without them, its summary needs them)."""
    modules = [module_name(layer) for layer in layers]
    counts = _firing_counts(run, layers)
    for judge in judges:
        config = {
            "name": judge.folder.name,
            "sparse_model": run.info.adapter_path,
            "hookpoints": modules,
            "scorers": [n for n, k in ((SCORER, judge.scored), (FUZZ, judge.fuzz_scored)) if k],
            "explainer_model": judge.name,
            "constructor_cfg": {},
        }
        (judge.folder / RUN_CONFIG).write_text(
            json.dumps(config, indent=2) + "\n", encoding="utf-8"
        )
        if counts is not None:
            path = judge.folder / FIRING_COUNTS
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(counts)


def _firing_counts(run: RunData, layers: list[int]) -> bytes | None:
    """``hookpoint_firing_counts.pt`` as delphi saves it: {module: int64 tensor}."""
    try:
        import io

        import torch
    except ImportError:  # pragma: no cover - torch comes with the model extra
        return None
    table = (
        pl.scan_parquet(run.folder / FEATURES)
        .filter(pl.col("layer").is_in(layers))
        .select("layer", "index", "count")
        .collect()
    )
    counts: dict[str, Any] = {}
    for layer in layers:
        part = table.filter(pl.col("layer") == layer)
        values = np.zeros(run.info.n_features_per_layer, dtype=np.int64)
        values[part["index"].to_numpy()] = part["count"].to_numpy()
        counts[module_name(layer)] = torch.from_numpy(values)
    buffer = io.BytesIO()
    torch.save(counts, buffer)
    return buffer.getvalue()


# -- one layer ----------------------------------------------------------------------------------


class _LayerData:
    """Prepares a layer's files: labels, explanations, and each judge's scores where its
    answers are kept (LLM judges) or can be recomputed (the heuristic judge)."""

    def __init__(
        self, run: RunData, store: LabelStore, rules: DisputeRules, seed: int, judges: set[str]
    ) -> None:
        self.reader = LayerReader(run, store, rules, False, {"run": str(run.folder)}, None)
        self.judges = judges
        self.snippets = _Snippets(run, seed)
        self.run, self.seed = run, seed

    def prepare(self, layer: int) -> _LayerFiles:
        lines = self.reader.lines(layer)
        ok = _judgments(lines)
        files = _LayerFiles(
            planned=lines.height,
            labels=_label_lines(lines, layer),
            explained=int(ok.select(pl.col("index").n_unique()).item()),
        )
        for (judge,), part in ok.group_by("judge"):
            files.explanations[str(judge)] = part.sort("index").select(
                "index",
                pl.struct("explanation")
                .struct.json_encode()
                .str.strip_prefix('{"explanation":')
                .str.strip_suffix("}"),
            )
        self._scores(layer, ok, files)
        files.fuzz = layer_fuzz(self.run, self.reader.connection(), layer, self.seed, self.judges)
        return files

    def _scores(self, layer: int, ok: pl.DataFrame, files: _LayerFiles) -> None:
        """Each judge's scores files of the layer, where every feature of the layer it has
        answers for rebuilds to what is stored: one that does not means the snippets are
        not rebuilt as they were (another seed, another run), and the judge gets none in
        the layer; nor does the heuristic judge when an LLM judge's do not fit."""
        stages = _stage_answers(self.reader.connection(), layer, ok)
        heuristic = ok.filter(pl.col("judge") == HEURISTIC) if HEURISTIC in self.judges else None
        needed = set(stages["index"].to_list())
        if heuristic is not None:
            needed |= set(heuristic["index"].to_list())
        if not needed:
            return
        shown, votes = self.snippets.build(layer, sorted(needed))
        found: dict[str, tuple[pl.DataFrame, int, int]] = {}
        if heuristic is not None and heuristic.height:
            found[HEURISTIC] = self.snippets.heuristic_answers(shown, votes, heuristic)
        if stages.height:
            ordered = self.snippets.shown_order(layer, shown)
            for (judge,), part in stages.group_by("judge"):
                mine = ok.filter(pl.col("judge") == judge)
                found[str(judge)] = _kept_answers(ordered, part.drop("judge"), mine)
        # an LLM judge's answers that do not fit mean the seed is not the labeling's, and
        # the heuristic judge's negatives are drawn with the same seed
        seed_wrong = any(a < n for j, (_, n, a) in found.items() if j != HEURISTIC)
        for judge, (answered, n_scored, n_agree) in found.items():
            if n_agree < n_scored or (judge == HEURISTIC and seed_wrong):
                files.mismatched += n_scored
            elif n_scored:
                files.scores[judge] = _score_texts(answered)


def _label_lines(lines: pl.DataFrame, layer: int) -> pl.DataFrame:
    return lines.select(
        "feature_id",
        "layer",
        "index",
        pl.lit(module_name(layer)).alias("module"),
        pl.col("index").alias("latent"),
        "final_label",
        "label_source",
        "label_source_detail",
        "disputed",
        "dispute_reasons",
    )


def _judgments(lines: pl.DataFrame) -> pl.DataFrame:
    """One row per successful judgment of the layer: index, judge, explanation, by_set."""
    return (
        lines.select("feature_id", "index", "judgments")
        .explode("judgments")
        .unnest("judgments")
        .filter(pl.col("status") == "ok", pl.col("explanation").is_not_null())
        .select(
            "feature_id",
            "index",
            "judge",
            "explanation",
            pl.col("detection").struct.field("by_set"),
        )
    )


def _stored_sets(ok: pl.DataFrame) -> pl.DataFrame:
    """Each judgment's stored scores per detection set: (index, set, accuracy, ...)."""
    parts = [
        ok.select(
            "index",
            pl.lit(kind).alias("set"),
            pl.col("by_set").struct.field(kind).alias("score"),
        ).filter(pl.col("score").struct.field("n_positive").is_not_null())
        for kind in DETECTION_SETS
    ]
    return pl.concat(parts).unnest("score").select("index", "set", *_SCORE_FIELDS)


def _score_texts(answered: pl.DataFrame) -> pl.DataFrame:
    """(index, JSON text) of each feature's scores file: its records in delphi's
    ``ClassifierOutput`` field order, in the order ``answered`` has them."""
    record = pl.struct(
        pl.col("tokens").alias("str_tokens"),
        pl.col("acts").alias("activations"),
        "distance",
        "activating",
        "prediction",
        "probability",
        (pl.col("prediction") == pl.col("activating")).alias("correct"),
    ).struct.json_encode()
    return (
        answered.with_columns(record.alias("record"))
        .group_by("index", maintain_order=True)
        .agg(pl.col("record").str.join(","))
        .select("index", pl.concat_str(pl.lit("["), "record", pl.lit("]")))
    )


# -- detection snippets, rebuilt ----------------------------------------------------------------


class _Snippets:
    """The snippets judges were shown: the same positives (``FeatureRecord.of_kind``), the
    same negatives (``RunData.negative_snippets``), the same order (``detection_snippets``)."""

    def __init__(self, run: RunData, seed: int) -> None:
        self.run, self.seed = run, seed
        self.npl = run.info.n_features_per_layer
        self.normal: dict[str, str] = {}
        negatives = run.negatives
        tokens = negatives["tokens"]
        zeros = pl.Series([[0.0] * len(t) for t in tokens.to_list()], dtype=pl.List(pl.Float32))
        rows = pl.int_range(negatives.height, eager=True, dtype=pl.Int64)
        self.windows = pl.DataFrame({"row": rows, "tokens": tokens, "acts": zeros})
        exploded = self.windows.select("row", pl.col("tokens").alias("tok")).explode("tok")
        self.window_tokens = (
            exploded.join(self.normalized(exploded["tok"]), on="tok").select("row", "norm").unique()
        )
        active = (
            negatives.select(rows.alias("row"), "active_features")
            .explode("active_features")
            .drop_nulls()
            .group_by("active_features")
            .agg(pl.col("row").sort())
        )
        self.excluded: dict[int, np.ndarray[Any, np.dtype[np.int64]]] = {
            int(f): np.asarray(r, dtype=np.int64)
            for f, r in zip(
                active["active_features"].to_list(), active["row"].to_list(), strict=True
            )
        }

    def normalized(self, tokens: pl.Series) -> pl.DataFrame:
        """(tok, norm) for each distinct token: how the heuristic judge compares tokens."""
        distinct = tokens.unique().drop_nulls().to_list()
        normal = self.normal
        for t in distinct:
            if t not in normal:
                normal[t] = normalize_token(t) or t
        return pl.DataFrame(
            {"tok": distinct, "norm": [normal[t] for t in distinct]},
            schema={"tok": pl.String, "norm": pl.String},
        )

    def build(self, layer: int, indices: list[int]) -> tuple[pl.DataFrame, pl.DataFrame]:
        """The snippets of the features ``indices`` of one layer (index, set, part: 0 for a
        positive, 1 for a negative, slot, row: the negative's window, tokens, acts,
        activating, distance), and every example's activating token (index, row, tok) in
        the run's order."""
        wanted = pl.Series(indices, dtype=pl.Int32).implode()
        examples = (
            pl.scan_parquet(self.run.folder / EXAMPLES)
            .filter(pl.col("layer") == layer, pl.col("index").is_in(wanted))
            .select("index", "kind", "rank", "quantile", "tokens", "acts", "highlight")
            .collect()
        )
        votes = examples.select(
            "index", pl.col("tokens").list.get(pl.col("highlight")).alias("tok")
        ).with_row_index("row")
        first = (  # of_kind order: the highest quantile first, then by rank
            examples.select(
                pl.int_range(pl.len(), dtype=pl.UInt32).alias("at"),
                "index",
                pl.col("kind").alias("set"),
                (-pl.col("quantile").fill_null(0)).alias("q"),
                "rank",
            )
            .filter(pl.col("set").is_in(DETECTION_SETS))
            .sort("index", "set", "q", "rank", maintain_order=True)
            .with_columns(pl.int_range(pl.len()).over("index", "set").alias("slot"))
            .filter(pl.col("slot") < N_POSITIVES)
        )
        lo = (pl.col("highlight") - SNIPPET_BEFORE).clip(lower_bound=0)
        width = pl.col("highlight") + SNIPPET_AFTER + 1 - lo
        picked = examples[first["at"]]
        positives = pl.DataFrame(
            {
                "index": first["index"],
                "set": first["set"],
                "part": pl.Series([0] * first.height, dtype=pl.Int32),
                "slot": first["slot"],
                "row": pl.Series([None] * first.height, dtype=pl.Int64),
            }
        ).with_columns(
            picked.select(
                pl.col("tokens").list.slice(lo, width),
                pl.col("acts").list.slice(lo, width).cast(pl.List(pl.Float32)),
            )
        )
        sets = positives.select("index", "set").unique().sort("index", "set").rows()
        snippets = pl.concat([positives, self._negatives(layer, sets)]).with_columns(
            (pl.col("part") == 0).alias("activating"),
            pl.when(pl.col("part") == 0)
            .then(_SET_ORDER.cast(pl.Float64))
            .otherwise(NEGATIVE_DISTANCE)
            .alias("distance"),
        )
        return snippets, votes

    def _negatives(self, layer: int, sets: list[tuple[int, str]]) -> pl.DataFrame:
        """``N_NEGATIVES`` windows per (index, set), drawn as ``labeling.plan.negatives_for``
        draws them: from the windows the feature is not active in, in order, with a
        generator seeded by (seed + the set's offset, layer, index)."""
        n_windows = self.windows.height
        every = np.arange(n_windows, dtype=np.int64)
        keys: list[tuple[int, str]] = []
        picks: list[np.ndarray[Any, np.dtype[np.int64]]] = []
        pools: dict[int, np.ndarray[Any, np.dtype[np.int64]]] = {}
        for index, kind in sets:
            pool = pools.get(index)
            if pool is None:
                excluded = self.excluded.get(layer * self.npl + index)
                pool = every if excluded is None else np.delete(every, excluded)
                pools[index] = pool
            if not len(pool):
                continue
            rng = np.random.default_rng([self.seed + SET_OFFSET[kind], layer, index])
            picks.append(
                pool[rng.choice(len(pool), size=min(N_NEGATIVES, len(pool)), replace=False)]
            )
            keys.append((index, kind))
        sizes = [len(p) for p in picks]
        picks_frame = pl.DataFrame(
            {
                "index": pl.Series(np.repeat([k[0] for k in keys], sizes), dtype=pl.Int32),
                "set": pl.Series(np.repeat([k[1] for k in keys], sizes), dtype=pl.String),
                "part": pl.Series(np.ones(sum(sizes), dtype=np.int32), dtype=pl.Int32),
                "slot": pl.Series(
                    np.concatenate([np.arange(n) for n in sizes] or [every[:0]]), dtype=pl.Int64
                ),
                "row": pl.Series(np.concatenate(picks or [every[:0]]), dtype=pl.Int64),
            }
        )
        return picks_frame.join(self.windows, on="row", how="left", maintain_order="left")

    def heuristic_answers(
        self, shown: pl.DataFrame, votes: pl.DataFrame, ok: pl.DataFrame
    ) -> tuple[pl.DataFrame, int, int]:
        """The heuristic judge's answers recomputed (``labeler.judges.heuristic``): its
        pattern is the most voted activating tokens covering PATTERN_COVERAGE of the votes
        (at most PATTERN_MAX, ties in the order the examples come), and a snippet is
        predicted activating when it holds a pattern token. Snippets in the judge's order:
        each set's positives, then its negatives. Returns the answers of the features
        whose recomputed scores equal the stored ones, how many features were scored and
        how many of them agree."""
        wanted = ok.select("index")
        votes = votes.join(wanted, on="index", how="semi")
        votes = votes.join(self.normalized(votes["tok"]), on="tok", how="left")
        pattern = (
            votes.group_by("index", "norm")
            .agg(pl.len().alias("n"), pl.col("row").min().alias("first"))
            .sort("index", "n", "first", descending=[False, True, False])
            .with_columns(
                pl.int_range(pl.len()).over("index").alias("k"),
                (pl.col("n").cum_sum().over("index") - pl.col("n")).alias("before"),
                pl.col("n").sum().over("index").alias("total"),
            )
            .filter(
                pl.col("k") < PATTERN_MAX, pl.col("before") < PATTERN_COVERAGE * pl.col("total")
            )
            .select("index", "norm")
        )
        mine = (
            shown.join(wanted, on="index", how="semi")
            .filter((pl.col("part") == 1) | (pl.col("slot") < HEURISTIC_POSITIVES))
            .sort(pl.col("index"), _SET_ORDER, pl.col("part"), pl.col("slot"))
            .with_row_index("sid")
        )
        positive = mine.filter(pl.col("part") == 0)
        tokens = positive.select("sid", "index", pl.col("tokens").alias("tok")).explode("tok")
        tokens = tokens.join(self.normalized(tokens["tok"]), on="tok", how="left")
        hit_windows = pattern.join(self.window_tokens, on="norm").select("index", "row")
        hits = pl.concat(
            [
                tokens.join(pattern, on=["index", "norm"], how="semi").select("sid"),
                mine.filter(pl.col("part") == 1)
                .join(hit_windows, on=["index", "row"], how="semi")
                .select("sid"),
            ]
        )["sid"].unique()
        answered = mine.with_columns(
            pl.col("sid").is_in(hits.implode()).alias("prediction"),
            pl.lit(None, dtype=pl.Float64).alias("probability"),
        )
        act, pred = pl.col("activating"), pl.col("prediction")
        tp, fp, fn = (act & pred).sum(), (~act & pred).sum(), (act & ~pred).sum()
        n = pl.len()
        both = (tp + fn > 0) & (n - tp - fn > 0)  # accuracy and precision need both classes
        recomputed = answered.group_by("index", "set").agg(
            pl.when(both).then((n - fp - fn) / n).alias("accuracy"),
            pl.when(~both)
            .then(None)
            .when(tp + fp > 0)
            .then(tp / (tp + fp))
            .otherwise(0.0)
            .alias("precision"),
            pl.when(tp + fn > 0).then(tp / (tp + fn)).alias("recall"),
            (tp + fn).cast(pl.Int64).alias("n_positive"),
            (n - tp - fn).cast(pl.Int64).alias("n_negative"),
        )
        stored = _stored_sets(ok)
        joined = stored.join(
            recomputed, on=["index", "set"], how="full", coalesce=True, suffix="_new"
        )
        same = pl.all_horizontal(
            *(pl.col(f).eq_missing(pl.col(f"{f}_new")) for f in _SCORE_FIELDS)
        ).fill_null(False)
        scored = joined.select("index").unique()
        agree = scored.join(joined.filter(~same), on="index", how="anti")
        return answered.join(agree, on="index", how="semi"), scored.height, agree.height

    def shown_order(self, layer: int, snippets: pl.DataFrame) -> pl.DataFrame:
        """The snippets in the order an LLM judge was shown them: each set's positives
        then negatives, shuffled by ``random.Random(seed * 7919 + layer * 1_000_003 +
        index + offset)`` (``LLMJudge._detect_set``); with ``shown``, the place in it."""
        llm = snippets.filter((pl.col("part") == 1) | (pl.col("slot") < LLM_POSITIVES))
        counts = llm.group_by("index", "set").agg(
            (pl.col("part") == 0).sum().alias("n_pos"), pl.len().alias("n")
        )
        keys: list[tuple[int, str]] = []
        orders: list[list[int]] = []
        for index, kind, n_pos, n in counts.iter_rows():
            order = list(range(n))
            random.Random(self.seed * 7919 + layer * 1_000_003 + index + SET_OFFSET[kind]).shuffle(
                order
            )
            # item i of the list shuffled: positive i, or negative i - n_pos
            keys.append((index, kind))
            orders.append([i if i < n_pos else 1_000_000 + i - n_pos for i in order])
        sizes = [len(o) for o in orders]
        flat = np.asarray([i for o in orders for i in o], dtype=np.int64)
        order_frame = pl.DataFrame(
            {
                "index": pl.Series(np.repeat([k[0] for k in keys], sizes), dtype=pl.Int32),
                "set": pl.Series(np.repeat([k[1] for k in keys], sizes), dtype=pl.String),
                "part": pl.Series((flat >= 1_000_000).astype(np.int32), dtype=pl.Int32),
                "slot": pl.Series(flat % 1_000_000, dtype=pl.Int64),
                "shown": pl.Series(
                    np.concatenate([np.arange(n) for n in sizes] or [flat[:0]]), dtype=pl.Int64
                ),
            }
        )
        return llm.join(order_frame, on=["index", "set", "part", "slot"], how="inner")


# -- kept answers -------------------------------------------------------------------------------


def _stage_answers(conn: sqlite3.Connection, layer: int, ok: pl.DataFrame) -> pl.DataFrame:
    """The detection answers kept for the layer's successful judgments of staged judges,
    one row per answer: judge, index, set, shown (its place), truth, prediction,
    probability."""
    staged = [j for j in ok["judge"].unique().to_list() if is_staged(j)]
    schema = {
        "feature_id": pl.String,
        "judge": pl.String,
        "stage": pl.String,
        "truth": pl.String,
        "predicted": pl.String,
        "probs": pl.String,
    }
    rows: list[tuple[Any, ...]] = []
    if staged:
        rows = conn.execute(
            "SELECT s.feature_id, s.judge, s.stage, s.payload -> '$.detection.truth', "
            "s.payload -> '$.detection.predicted', s.payload -> '$.detection.probs' "
            "FROM stages s JOIN judgments j ON j.feature_id = s.feature_id "
            "AND j.judge = s.judge AND j.prompt_hash = s.prompt_hash "
            "WHERE j.status = 'ok' AND s.stage IN ('detect_top', 'detect_random') "
            "AND s.feature_id >= ? AND s.feature_id < ?",
            layer_range(layer),
        ).fetchall()
    frame = (
        pl.DataFrame(rows, schema=schema, orient="row")
        .filter(pl.col("judge").is_in(staged))
        .join(ok.select("feature_id", "index", "judge"), on=["feature_id", "judge"])
        .select(
            "judge",
            "index",
            pl.col("stage").str.strip_prefix("detect_").alias("set"),
            pl.col("truth").str.json_decode(pl.List(pl.Boolean)),
            pl.col("predicted").str.json_decode(pl.List(pl.Boolean)),
            pl.col("probs").str.json_decode(pl.List(pl.Float64)),
        )
        .with_columns(pl.int_ranges(pl.col("truth").list.len()).alias("shown"))
        .explode("shown")
        .drop_nulls("shown")
    )
    return frame.select(
        "judge",
        "index",
        "set",
        pl.col("shown").cast(pl.Int64),
        pl.col("truth").list.get(pl.col("shown"), null_on_oob=True).alias("truth"),
        pl.col("predicted").list.get(pl.col("shown"), null_on_oob=True).alias("prediction"),
        pl.col("probs").list.get(pl.col("shown"), null_on_oob=True).alias("probability"),
    )


def _kept_answers(
    ordered: pl.DataFrame, answers: pl.DataFrame, ok: pl.DataFrame
) -> tuple[pl.DataFrame, int, int]:
    """One staged judge's kept answers on the rebuilt snippets, for the features it has
    answers for; how many those are, and how many of them agree: each set the judgment
    scored has an answer for every snippet, and every snippet's truth is the stored one."""
    wanted = answers.select("index").unique()
    joined = ordered.join(wanted, on="index", how="semi").join(
        answers, on=["index", "set", "shown"], how="full", coalesce=True
    )
    per_set = joined.group_by("index", "set").agg(
        (pl.col("activating") == pl.col("truth")).fill_null(False).all().alias("same"),
        pl.col("prediction").is_not_null().all().alias("answered"),
    )
    good = per_set.filter(pl.col("same") & pl.col("answered")).select("index", "set")
    stored = _stored_sets(ok).join(wanted, on="index", how="semi").select("index", "set")
    bad = pl.concat(
        [
            stored.join(good, on=["index", "set"], how="anti"),
            per_set.filter(~(pl.col("same") & pl.col("answered"))).select("index", "set"),
            good.join(stored, on=["index", "set"], how="anti"),
        ]
    ).select("index")
    scored = ok.select("index").join(wanted, on="index", how="semi")
    agree = scored.join(bad, on="index", how="anti")
    answered = joined.join(agree, on="index", how="semi").sort(
        pl.col("index"), _SET_ORDER, pl.col("shown")
    )
    return answered, scored.height, agree.height
