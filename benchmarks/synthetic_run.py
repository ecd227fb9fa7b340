"""Write a large synthetic run folder, labeled by several judges, for benchmarking
``labeler summarize`` and ``labeler export`` at the paper's scale (28 layers x 8192).

.venv/bin/python benchmarks/synthetic_run.py --out /tmp/synthetic-229k [--layers 28]
    [--per-layer 8192] [--examples 30] [--judge heuristic --judge openai:gpt-5-mini ...]
    [--seed 0] [--failure-rate 0.01] [--overwrite]

Every table is written the way the collector writes it (same schemas, column order,
per-layer example parts concatenated by ``sink_parquet``), ``run.json`` through
``RunInfo`` and ``labels.sqlite`` through ``LabelStore``'s schema with rows exactly like
``put_ok`` / ``put_failure`` write. A synthetic corpus (a chat layout per sequence, a
vocabulary of a few thousand strings, some with HTML and quotes) gives the context
windows, regions and token counts, so everything in the folder is mutually consistent.

One layer is generated at a time; peak memory stays around a couple of GB.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import logging
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import polars as pl

from collectors.example_order import sort_examples
from collectors.run_format import (
    EXAMPLE_ROW_GROUP,
    EXAMPLES,
    FEATURES,
    LABELS,
    NEGATIVES,
    REGIONS,
    RUN_SCHEMA_VERSION,
    THINK_BINS,
    CollectParams,
    RunInfo,
    feature_id,
    package_versions,
    publish,
    read_run_info,
    write_run_info,
)
from collectors.tables import EXAMPLE_COLUMNS, EXAMPLES_SCHEMA, token_strings
from labeler.judges.metrics import detection_score
from labeler.judges.pricing import Price, load_prices
from labeler.judges.stages import is_staged
from labeler.labeling.store import LabelStore
from labeler.run.schemas import Classification, DetectionScore, Judgment, Usage
from prompts import (
    CATEGORIES,
    DOMAIN_TYPES,
    MECHANISMS,
    SUBCATEGORIES,
    load_taxonomy,
    prompt_hash,
    taxonomy_hash,
)

log = logging.getLogger("synthetic_run")

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]

DEFAULT_JUDGES = ("heuristic", "openai:gpt-5-mini", "anthropic:claude-haiku-4-5")
DOMAINS = ("code", "math", "science")  # sorted, as the collector lists them
DOMAIN_SHARES = (0.25, 0.60, 0.15)
SPECIAL = ("<｜begin▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<think>", "</think>")
BOS, USER, ASSISTANT, THINK_START, THINK_END = range(len(SPECIAL))
AWKWARD = (  # tokens that exercise escaping in JSON, HTML and terminals
    "<script>", "</script>", '<script>alert("x")</script>', "<b>", "</div>", '"', "'",
    ' "quoted"', " it's", "&amp;", "<img src=x onerror=alert(1)>", "\\", "\n", "\t",
    "{{", "}}", "`code`", "<|im_end|>", " naïve", " ∑", "\\frac", "**",
)  # fmt: skip
PUNCTUATION = (*" ,.;:?!()[]{}=+-*/^<>_|", " =", " +", " -", " *", " (", ").", ".\n\n")
WINDOW_NONZERO = 0.03  # share of context tokens (besides the highlight) with an activation

# Category mix of a layer at relative depth d in [0, 1]; the rest is uninterpretable.
# Averaged over layers: about 8% reasoning, 40% domain, 30% language.
SUBCATEGORY_P = (0.25, 0.15, 0.20, 0.25, 0.10, 0.05)
MECHANISM_P = (0.30, 0.35, 0.35)
DOMAIN_TYPE_P = (0.50, 0.20, 0.30)
CONFIDENCE_P = {"interpretable": (0.50, 0.35, 0.15), "uninterpretable": (0.15, 0.35, 0.50)}
CHECK_EVERY = 97  # one stored judgment in this many is validated against the model
AGREEMENT = 0.80  # wanted share of features on which two judges give the same category


def category_mix(depth: float) -> tuple[float, float, float, float]:
    reasoning = 0.08 * (0.4 + 1.2 * depth)
    domain = 0.40 + 0.06 * np.cos(np.pi * (2 * depth - 1))  # peaks mid-depth
    language = 0.30 - 0.10 * (depth - 0.5)
    return reasoning, float(domain), language, 1.0 - reasoning - float(domain) - language


# -- the synthetic corpus ----------------------------------------------------------------


def make_vocabulary(size: int, seed: int) -> list[str]:
    """Special tokens first, then punctuation, numbers, the taxonomy's cue words, strings
    with HTML and quotes, and made-up words (half with a leading space, as BPE has)."""
    taxonomy = load_taxonomy()
    cues = [w for groups in taxonomy.cue_words.values() for ws in groups.values() for w in ws]
    words: list[str] = [*SPECIAL, *PUNCTUATION, *AWKWARD]
    words += [str(n) for n in range(100)]
    words += [f" {w}" for w in cues] + [w.capitalize() for w in cues if w.isalpha()]
    words += [" Wait", " Hmm", " Let", " me", " the", " So", " Therefore", "Final", " Answer"]
    rng = np.random.default_rng([seed, 1])
    syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"]
    made = [a + b for a in syllables for b in syllables]
    made += [a + b + c for a in syllables[:40] for b in syllables[:40] for c in "nrst"]
    seen = set(words)
    for i in rng.permutation(len(made)):
        if len(seen) >= size:
            break
        word = (" " if i % 2 else "") + made[i]
        if word not in seen:
            seen.add(word)
            words.append(word)
    return list(dict.fromkeys(words))[:size]


@dataclass
class Corpus:
    """Sequences in the deepseek chat layout: bos, user marker, question, assistant
    marker, think start, thinking, think end, answer; a token id per corpus position."""

    question: IntArray
    thinking: IntArray
    answer: IntArray
    domain: IntArray  # index into DOMAINS, per sequence
    token_ids: npt.NDArray[np.int32]

    @classmethod
    def make(cls, n_sequences: int, vocab_size: int, rng: np.random.Generator) -> Corpus:
        question = rng.integers(20, 150, n_sequences)
        thinking = rng.integers(200, 900, n_sequences)
        answer = rng.integers(20, 150, n_sequences)
        domain = rng.choice(len(DOMAINS), n_sequences, p=DOMAIN_SHARES)
        lengths = 5 + question + thinking + answer
        n_tokens = int(lengths.sum())
        ranks = np.arange(vocab_size - len(SPECIAL), dtype=np.float64)
        weights = 1.0 / (ranks + 20.0)  # a Zipf-like token distribution
        ids = rng.choice(ranks.size, size=n_tokens, p=weights / weights.sum()) + len(SPECIAL)
        token_ids = ids.astype(np.int32)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        for offset, special in (
            (0, BOS), (1, USER), (2 + question, ASSISTANT), (3 + question, THINK_START),
            (4 + question + thinking, THINK_END),
        ):  # fmt: skip
            token_ids[starts + offset] = special
        return cls(question, thinking, answer, domain, token_ids)

    @property
    def n_sequences(self) -> int:
        return int(self.domain.size)

    @cached_property
    def lengths(self) -> IntArray:
        return 5 + self.question + self.thinking + self.answer

    @cached_property
    def offsets(self) -> IntArray:
        return np.concatenate([[0], np.cumsum(self.lengths)])

    @property
    def n_tokens(self) -> int:
        return int(self.offsets[-1])

    def tokens_by_domain(self) -> dict[str, int]:
        counts = np.bincount(self.domain, weights=self.lengths, minlength=len(DOMAINS))
        return {name: int(counts[i]) for i, name in enumerate(DOMAINS)}

    def sequences_by_domain(self) -> dict[str, int]:
        counts = np.bincount(self.domain, minlength=len(DOMAINS))
        return {name: int(counts[i]) for i, name in enumerate(DOMAINS)}

    def tokens_by_region(self) -> dict[str, int]:
        n = self.n_sequences
        counts = {
            "bos": n, "user_marker": n, "question": int(self.question.sum()),
            "assistant_marker": n, "think_start": n, "thinking": int(self.thinking.sum()),
            "think_end": n, "answer": int(self.answer.sum()), "text": 0,
        }  # fmt: skip
        return {name: counts[name] for name in REGIONS}

    def tokens_by_think_bin(self) -> dict[str, int]:
        """Thinking token j of T is in tenth ``10 j // T``: tenth b holds
        ceil((b + 1) T / 10) - ceil(b T / 10) tokens."""
        t = self.thinking
        return {
            str(b): int((((b + 1) * t + 9) // 10 - (b * t + 9) // 10).sum())
            for b in range(THINK_BINS)
        }

    def locate(self, p: IntArray) -> tuple[IntArray, IntArray, IntArray, IntArray]:
        """Sequence, position in it, region index and thinking tenth of global positions."""
        seq = np.searchsorted(self.offsets, p, side="right") - 1
        i = p - self.offsets[seq]
        q, t = self.question[seq], self.thinking[seq]
        think_at = 4 + q
        names = {name: k for k, name in enumerate(REGIONS)}
        region = np.select(
            [
                i == 0,
                i == 1,
                i < 2 + q,
                i == 2 + q,
                i == 3 + q,
                i < think_at + t,
                i == think_at + t,
            ],
            [names[r] for r in REGIONS[:7]],
            names["answer"],
        )
        thinking = region == names["thinking"]
        think_bin = np.where(thinking, (i - think_at) * THINK_BINS // np.maximum(t, 1), -1)
        return seq, i, region, think_bin

    def sample_positions(
        self, size: int, before: int, after: int, rng: np.random.Generator
    ) -> IntArray:
        """Uniform global positions whose whole window lies inside their sequence."""
        valid = np.maximum(self.lengths - before - after, 0)
        cum = np.cumsum(valid)
        u = rng.integers(0, int(cum[-1]), size)
        seq = np.searchsorted(cum, u, side="right")
        first = u - (cum[seq] - valid[seq])
        positions: IntArray = self.offsets[seq] + before + first
        return positions


# -- features and examples ---------------------------------------------------------------


@dataclass(frozen=True)
class LayerStats:
    count: IntArray
    act_max: npt.NDArray[np.float32]
    act_min: npt.NDArray[np.float32]


def _split_counts(count: IntArray, shares: FloatArray, rng: np.random.Generator) -> IntArray:
    """Split each count over groups with per-feature tilted shares: rows sum to the count,
    groups with share 0 get 0 (a binomial per group, conditional on the ones before)."""
    p = shares[None, :] * rng.gamma(1.0, size=(count.size, shares.size))
    p /= p.sum(1, keepdims=True)
    last = int(np.nonzero(shares)[0][-1])  # takes what is left
    out = np.zeros(p.shape, dtype=np.int64)
    left = count.copy()
    rest = np.ones(count.size)
    for g in range(shares.size):
        if g == last or shares[g] == 0:
            continue
        q = np.clip(p[:, g] / np.maximum(rest, 1e-300), 0.0, 1.0)
        out[:, g] = rng.binomial(left, q)
        left -= out[:, g]
        rest -= p[:, g]
    out[:, last] = left
    return out


def features_frame(
    layer: int, width: int, corpus: Corpus, vocab: pl.Series, k_lens: int,
    min_count: int, rng: np.random.Generator,
) -> tuple[pl.DataFrame, LayerStats]:  # fmt: skip
    """The collector's features table for one layer, every feature alive."""
    n_tokens = corpus.n_tokens
    count = np.maximum(rng.lognormal(np.log(n_tokens * 2e-4), 1.2, width), min_count)
    count = np.minimum(count, n_tokens).astype(np.int64)
    act_max = rng.lognormal(1.0 + 0.04 * layer, 0.5, width).astype(np.float32)
    act_min = (act_max * rng.uniform(0.001, 0.02, width)).astype(np.float32)
    act_mean = act_max.astype(np.float64) * rng.uniform(0.15, 0.35, width)
    index = np.arange(width, dtype=np.int32)
    data: dict[str, Any] = {
        "feature_id": pl.select(pl.format("L{}F{}", pl.lit(layer), pl.Series(index))).to_series(),
        "layer": np.full(width, layer, dtype=np.int32),
        "index": index,
        "alive": np.ones(width, dtype=bool),
        "count": count,
        "frequency": count / max(n_tokens, 1),
        "act_max": act_max,
        "act_min": act_min,
        "act_mean": act_mean,
    }
    by_region = corpus.tokens_by_region()
    groups = (
        ("domain", corpus.tokens_by_domain(), count),
        ("region", by_region, count),
        ("think_bin", corpus.tokens_by_think_bin(), None),
    )
    region_counts: IntArray | None = None
    for prefix, tokens, total in groups:
        shares = np.array(list(tokens.values()), dtype=np.float64)
        if total is None:  # the thinking tenths split the thinking region's count
            assert region_counts is not None
            total = region_counts[:, REGIONS.index("thinking")]
        counts = _split_counts(total, shares / shares.sum(), rng)
        if prefix == "region":
            region_counts = counts
        for i, name in enumerate(tokens):
            data[f"{prefix}_{name}"] = counts[:, i]
        for i, (name, n) in enumerate(tokens.items()):
            data[f"density_{prefix}_{name}"] = counts[:, i] / n if n else np.zeros(width)
    v = len(vocab) - len(SPECIAL)
    for name, sign in (("top", 1.0), ("bottom", -1.0)):
        steps = rng.integers(1, max(2, v // (4 * k_lens)), (width, k_lens))
        ids = len(SPECIAL) + (rng.integers(0, v, (width, 1)) + np.cumsum(steps, 1)) % v
        values = np.sort(rng.lognormal(-5.5, 0.4, (width, k_lens)), axis=1)[:, ::-1] * sign
        strings = vocab.gather(pl.Series(ids.reshape(-1))).reshape((width, k_lens))
        data[f"{name}_logits"] = strings.cast(pl.List(pl.String))
        data[f"{name}_logit_ids"] = pl.Series(ids.astype(np.int64)).cast(pl.List(pl.Int64))
        data[f"{name}_logit_values"] = pl.Series(values.astype(np.float32)).cast(
            pl.List(pl.Float32)
        )
    return pl.DataFrame(data), LayerStats(count, act_max, act_min)


def examples_frame(
    layer: int, stats: LayerStats, corpus: Corpus, vocab: pl.Series, params: CollectParams,
    rng: np.random.Generator,
) -> pl.DataFrame:  # fmt: skip
    """One layer's examples in the collector's order: every feature's top examples, then
    every feature's random sample."""
    width = stats.count.size
    top_k, n_random = params.top_k, params.n_random
    before, after = params.context_before, params.context_after
    frac = np.sort(rng.uniform(0.35, 1.0, (width, top_k)).astype(np.float32), axis=1)[:, ::-1]
    frac[:, 0] = 1.0  # the first top example is the feature's act_max, exactly
    top_act = stats.act_max[:, None] * frac
    floor = stats.act_min[:, None]
    random_act = floor + (top_act[:, -1:] - floor) * rng.beta(1.0, 3.0, (width, n_random))
    blocks = (
        ("top", top_k, top_act),
        ("random", n_random, random_act.astype(np.float32)),
    )
    frames = []
    for kind, k, act in blocks:
        n = width * k
        unit = np.repeat(np.arange(width, dtype=np.int32), k)
        p = corpus.sample_positions(n, before, after, rng)
        seq, position, region, think_bin = corpus.locate(p)
        window = p[:, None] + np.arange(-before, after + 1)
        token_ids = corpus.token_ids[window].astype(np.int64)
        activation = act.reshape(-1).astype(np.float32)
        acts = np.zeros(window.shape, dtype=np.float32)
        extra = rng.random(window.shape, dtype=np.float32) < WINDOW_NONZERO
        rows = np.nonzero(extra)[0]
        acts[extra] = activation[rows] * rng.uniform(0.02, 0.6, rows.size).astype(np.float32)
        acts[:, before] = activation
        del window, extra, rows
        strings = vocab.gather(pl.Series(token_ids.reshape(-1))).reshape(token_ids.shape)
        frames.append(
            pl.DataFrame(
                {
                    "feature_id": pl.select(
                        pl.format("L{}F{}", pl.lit(layer), pl.Series(unit))
                    ).to_series(),
                    "layer": np.full(n, layer, dtype=np.int32),
                    "index": unit,
                    "kind": pl.repeat(kind, n, eager=True),
                    "rank": np.tile(np.arange(k, dtype=np.int32), width),
                    "quantile": pl.repeat(None, n, dtype=pl.Int32, eager=True),
                    "activation": activation,
                    "sequence": seq.astype(np.int64),
                    "position": position.astype(np.int64),
                    "corpus_position": p.astype(np.int64),
                    "domain": np.asarray(DOMAINS)[corpus.domain[seq]],
                    "region": np.asarray(REGIONS)[region],
                    "think_bin": think_bin.astype(np.int8),
                    "token_ids": pl.Series(token_ids).cast(pl.List(pl.Int64)),
                    "tokens": strings.cast(pl.List(pl.String)),
                    "acts": pl.Series(acts).cast(pl.List(pl.Float32)),
                    "highlight": np.full(n, before, dtype=np.int32),
                }
            )
        )
        del token_ids, acts, strings
    return pl.concat(frames).select(EXAMPLE_COLUMNS).cast(EXAMPLES_SCHEMA)


def negative_windows(
    corpus: Corpus, params: CollectParams, rng: np.random.Generator
) -> tuple[IntArray, IntArray]:
    """(start, width) of the negative windows, within sequences, as the collector draws."""
    seqs = rng.choice(corpus.n_sequences, size=params.n_negatives, replace=True)
    lengths = corpus.lengths[seqs]
    width = np.minimum(lengths, params.negative_window)
    starts = corpus.offsets[seqs] + (rng.random(seqs.size) * (lengths - width + 1)).astype(np.int64)
    return starts, width


def active_in_windows(
    layer: int, stats: LayerStats, n_tokens: int, widths: IntArray, per_layer: int,
    rng: np.random.Generator,
) -> pl.DataFrame:  # fmt: skip
    """(window, global feature index) of the layer's features active in each window, each
    with the chance that a window of that width holds one of its activations."""
    freq = stats.count / n_tokens
    p_active = 1.0 - (1.0 - freq[None, :]) ** widths[:, None]
    window, unit = np.nonzero(rng.random(p_active.shape) < p_active)
    return pl.DataFrame(
        {"window": window.astype(np.int64), "feature": layer * per_layer + unit.astype(np.int64)}
    )


def negatives_frame(
    corpus: Corpus, starts: IntArray, widths: IntArray, active: list[pl.DataFrame],
    vocab: pl.Series,
) -> pl.DataFrame:  # fmt: skip
    seq = np.searchsorted(corpus.offsets, starts, side="right") - 1
    token_ids = pl.Series(
        [
            corpus.token_ids[s : s + w].astype(np.int64).tolist()
            for s, w in zip(starts, widths, strict=True)
        ],
        dtype=pl.List(pl.Int64),
    )
    tokens = token_strings(token_ids, vocab)
    by_window = (
        pl.concat(active)
        .group_by("window")
        .agg(pl.col("feature").sort().alias("active_features"))
        .with_columns(pl.col("window").cast(pl.Int32))
    )
    frame = pl.DataFrame(
        {
            "window": np.arange(starts.size, dtype=np.int32),
            "sequence": seq.astype(np.int64),
            "position": (starts - corpus.offsets[seq]).astype(np.int64),
            "domain": np.asarray(DOMAINS)[corpus.domain[seq]],
            "token_ids": token_ids,
            "tokens": tokens,
        }
    )
    return (
        frame.join(by_window, on="window", how="left")
        .with_columns(pl.col("active_features").fill_null(pl.lit([], dtype=pl.List(pl.Int64))))
        .sort("window")
    )


# -- labels ------------------------------------------------------------------------------

_INSERT = """INSERT INTO judgments
    (feature_id, judge, status, payload, reason, prompt_hash, attempts, created_at, usage,
     cost_usd)
    VALUES (?, ?, ?, ?, ?, ?, 1, ?, ?, ?)"""

_LLM_EXPLANATIONS = {
    "reasoning": (
        "{sub} in the chain of thought, firing on tokens like {tok} where the model pauses.",
        "Marks {sub}: activates on {tok} and on the words that introduce a new step.",
    ),
    "domain": (
        "{sub} content: fires on {tok} and related notation inside worked solutions.",
        "Tokens of {sub} problems such as {tok}, mostly in the thinking.",
    ),
    "language": (
        "The function word {tok} and similar connectives, wherever they appear.",
        "Punctuation and short words such as {tok} at clause boundaries.",
    ),
    "uninterpretable": (
        "No clear pattern; the top examples share little beyond {tok}.",
        "Fires on unrelated tokens ({tok}, numbers, names) without a common theme.",
    ),
}
_LLM_RATIONALES = {
    "reasoning": "The feature tracks {sub}, a behaviour specific to reasoning traces.",
    "domain": "Its activations are {sub} vocabulary and notation.",
    "language": "It responds to general text such as {tok}, not to any domain or behaviour.",
    "uninterpretable": "The examples do not share a coherent pattern.",
}
_LLM_FAILURES = (  # (reason, stages whose calls it had made, calls of the last one)
    ("invalid_reply: classify: invalid reply twice; last: category: Input should be "
     "'reasoning', 'domain', 'language' or 'uninterpretable'", ("explain", "detect", "classify")),
    ("refused: explain: refused: the model declined to answer", ("explain",)),
    ("timeout: detect: no reply within 60 s", ("explain", "detect")),
    ("server_error: explain: HTTP 503: upstream connect error", ()),
    ("invalid_reply: detect: cut off at the output token limit", ("explain", "detect")),
)  # fmt: skip
_HEURISTIC_FAILURES = (
    "error: IndexError: list index out of range",
    "error: ValueError: the feature has no examples",
)
# Tokens per call of each stage: (input, cached, output) means.
_STAGE_TOKENS = {"explain": (1500, 900, 60), "detect": (1100, 900, 40), "classify": (1800, 900, 90)}
_STAGE_CALLS = {"explain": 1, "detect": 2, "classify": 1}
_REASONING_OUTPUT = 6.0  # output multiplier of reasoning models (openai:gpt-5*)


@dataclass(frozen=True)
class JudgeSpec:
    name: str
    prompt_hash: str
    staged: bool
    price: Price | None
    template: dict[str, Any]
    start: np.datetime64
    gap_ms: float

    @classmethod
    def make(cls, name: str, n_features: int, now: np.datetime64) -> JudgeSpec:
        staged = is_staged(name)
        phash = prompt_hash() if staged else taxonomy_hash()
        score = DetectionScore(accuracy=1.0, precision=1.0, recall=1.0, n_positive=10,
                               n_negative=10)  # fmt: skip
        one = Usage(calls=1, input_tokens=1, output_tokens=1)
        template = Judgment(
            feature_id="L0F0",
            judge=name,
            prompt_hash=phash,
            explanation="template",
            detection=score,
            detection_by_set={"top": score, "random": score},
            classification=Classification(category="language", confidence="high", rationale="."),
            usage={"explain": one, "detect": one, "classify": one} if staged else {},
            cost_usd=0.0,
        ).model_dump(mode="json")
        gap_ms = 20.0 if staged else 2.0  # an API judge stores ~50 judgments a second
        # Every judge ran from the start of the labeling, finishing an hour before now.
        start = now - np.timedelta64(int(n_features * gap_ms) + 3_600_000, "ms")
        price = load_prices().lookup(name)
        return cls(name, phash, staged, price, template, start, gap_ms)


ScoreTable = dict[tuple[int, int], dict[str, Any]]


def _detection_tables() -> tuple[ScoreTable, ScoreTable]:
    """Scores of one set (5 positives, 5 negatives) by (true positives, true negatives),
    and of both sets pooled, computed by the project's own scorer."""

    def table(n: int) -> ScoreTable:
        out = {}
        for tp in range(n + 1):
            for tn in range(n + 1):
                truth = [True] * n + [False] * n
                predicted = [i < tp for i in range(n)] + [i >= tn for i in range(n)]
                out[tp, tn] = detection_score(truth, predicted).model_dump(mode="json")
        return out

    return table(5), table(10)


def _draw(p: tuple[float, ...], size: int, rng: np.random.Generator) -> IntArray:
    return rng.choice(len(p), size=size, p=np.asarray(p) / sum(p))


def _relabel(
    base: IntArray, again: npt.NDArray[np.bool_], extra: float, p: tuple[float, ...],
    rng: np.random.Generator,
) -> IntArray:  # fmt: skip
    """``base`` redrawn where ``again``, and on another ``extra`` share of the rows."""
    redo = again | (rng.random(base.size) < extra)
    return np.where(redo, _draw(p, base.size, rng), base)


def _quote(token: str) -> str:
    return "'" + token.strip() + "'" if token.strip() else repr(token)


def judgment_rows(
    layer: int, depth: float, first: int, width: int, judges: list[JudgeSpec],
    vocab: list[str], failure_rate: float, rng: np.random.Generator,
) -> Iterator[tuple[Any, ...]]:  # fmt: skip
    """Every judge's row for each of one layer's features; categories from the layer's mix,
    each judge redrawing some of them so that two judges agree about AGREEMENT of the time
    while every judge keeps the layer's mix."""
    mix = category_mix(depth)
    s = sum(m * m for m in mix)
    redraw = 1.0 - np.sqrt(max(AGREEMENT - s, 0.0) / (1.0 - s))
    base = _draw(mix, width, rng)
    base_sub = _draw(SUBCATEGORY_P, width, rng)
    base_mech = _draw(MECHANISM_P, width, rng)
    base_dom = _draw(DOMAIN_TYPE_P, width, rng)
    per_set, pooled = _detection_tables()
    interesting = [t for t in vocab if t in AWKWARD]
    taxonomy = load_taxonomy()
    for spec in judges:
        again = rng.random(width) < redraw
        cat = np.where(again, _draw(mix, width, rng), base)
        sub = _relabel(base_sub, again, 0.15, SUBCATEGORY_P, rng)
        mech = _relabel(base_mech, again, 0.15, MECHANISM_P, rng)
        dom = _relabel(base_dom, again, 0.10, DOMAIN_TYPE_P, rng)
        failed = rng.random(width) < failure_rate
        unint = cat == CATEGORIES.index("uninterpretable")
        conf = np.where(
            unint,
            _draw(CONFIDENCE_P["uninterpretable"], width, rng),
            _draw(CONFIDENCE_P["interpretable"], width, rng),
        )
        # Detection: k of the 20 snippets right (accuracy 0.4..1.0), spread over the cells.
        k = 8 + rng.binomial(12, np.where(unint, 0.35, 0.75))
        ranks = rng.random((width, 20)).argsort(1).argsort(1)
        right = (ranks < k[:, None]).reshape(width, 4, 5).sum(2)  # tp, tn top; tp, tn random
        token_pick = rng.integers(len(SPECIAL), len(vocab), width)
        awkward = rng.random(width) < 0.1
        awkward_pick = rng.integers(0, len(interesting), width)
        template_pick = rng.integers(0, 2, width)
        share = rng.integers(60, 101, width)
        tokens_in = rng.normal(1.0, 0.15, (width, 3)).clip(0.5)
        reasoning_model = spec.name.startswith("openai:gpt-5")
        out_scale = (_REASONING_OUTPUT if reasoning_model else 1.0) * rng.lognormal(0, 0.3, width)
        cache_hit = rng.random((width, 3)) < 0.9
        cache_write = rng.random(width) < (0.02 if spec.name.startswith("anthropic:") else 0.0)
        fail_pick = rng.integers(0, len(_LLM_FAILURES), width)
        offsets = np.arange(first, first + width) * spec.gap_ms + rng.uniform(0, spec.gap_ms, width)
        stamps = spec.start + offsets.astype(np.int64).astype("timedelta64[ms]")
        created = np.datetime_as_string(stamps, unit="ms")
        for i in range(width):
            fid = feature_id(layer, i)
            at = str(created[i]) + "+00:00"
            usage: dict[str, dict[str, int]] = {}
            if spec.staged:
                stages: tuple[str, ...] = ("explain", "detect", "classify")
                if failed[i]:
                    stages = _LLM_FAILURES[fail_pick[i]][1]
                for j, stage in enumerate(stages):
                    calls = _STAGE_CALLS[stage]
                    n_in, n_cached, n_out = _STAGE_TOKENS[stage]
                    write = n_cached if (j == 0 and cache_write[i]) else 0
                    cached = n_cached * calls if cache_hit[i, j] and not write else 0
                    usage[stage] = {
                        "calls": calls,
                        "input_tokens": int(n_in * calls * tokens_in[i, j])
                        + n_cached * calls
                        - cached
                        - write,
                        "cached_tokens": cached,
                        "cache_write_tokens": write,
                        "output_tokens": int(n_out * calls * out_scale[i]),
                        "cached_replies": 0,
                    }
            total = sum((Usage(**u) for u in usage.values()), Usage())
            cost = spec.price.cost(total) if spec.price is not None else None
            usage_json = json.dumps(usage)  # what _put stores: json.dumps of model_dump()s
            if failed[i]:
                if spec.staged:
                    reason = _LLM_FAILURES[fail_pick[i]][0]
                else:
                    reason, cost = _HEURISTIC_FAILURES[int(fail_pick[i]) % 2], None
                yield (fid, spec.name, "failed", None, reason, spec.prompt_hash, at, usage_json,
                       cost)  # fmt: skip
                continue
            category = CATEGORIES[cat[i]]
            tok = interesting[awkward_pick[i]] if awkward[i] else vocab[token_pick[i]]
            classification: dict[str, Any] = {
                "category": category,
                "subcategory": SUBCATEGORIES[sub[i]] if category == "reasoning" else None,
                "mechanism": MECHANISMS[mech[i]] if category == "reasoning" else None,
                "domain_type": DOMAIN_TYPES[dom[i]] if category == "domain" else None,
                "confidence": ("high", "medium", "low")[conf[i]],
                "rationale": "",
            }
            label = classification["subcategory"] or classification["domain_type"] or category
            if spec.staged:
                words = taxonomy.subcategories.get(label, label).split(":")[0].lower()
                explanation = _LLM_EXPLANATIONS[category][template_pick[i]].format(
                    sub=words.capitalize() if category == "domain" else words, tok=_quote(tok)
                )
                rationale = _LLM_RATIONALES[category].format(sub=words, tok=_quote(tok))
            else:
                explanation = f"Fires on {_quote(tok)}, mostly in the thinking region."
                rationale = (
                    "no category holds 60% of its activating tokens"
                    if category == "uninterpretable"
                    else f"{share[i]}% of its activating tokens are {category} cue words"
                )
            classification["rationale"] = rationale
            tp_top, tn_top, tp_random, tn_random = (int(x) for x in right[i])
            payload = {
                **spec.template,
                "feature_id": fid,
                "explanation": explanation,
                "detection": pooled[tp_top + tp_random, tn_top + tn_random],
                "detection_by_set": {
                    "top": per_set[tp_top, tn_top],
                    "random": per_set[tp_random, tn_random],
                },
                "classification": classification,
                "usage": usage,
                "cost_usd": cost,
            }
            text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
            yield (fid, spec.name, "ok", text, None, spec.prompt_hash, at, usage_json, cost)


def check_rows(rows: list[tuple[Any, ...]]) -> None:
    """Each ok row is a valid Judgment, serialized exactly as ``put_ok`` stores it."""
    for fid, judge, status, payload, reason, phash, _at, usage_json, cost in rows:
        if status == "failed":
            assert reason and payload is None, (fid, judge)
            continue
        judgment = Judgment.model_validate_json(payload)
        assert judgment.model_dump_json() == payload, (fid, judge, payload)
        assert (judgment.feature_id, judgment.judge, judgment.prompt_hash) == (fid, judge, phash)
        assert usage_json == json.dumps({k: u.model_dump() for k, u in judgment.usage.items()})
        assert cost == judgment.cost_usd


# -- the whole folder --------------------------------------------------------------------


def make_synthetic_run(
    folder: Path,
    n_layers: int = 28,
    per_layer: int = 8192,
    n_examples: int = 30,
    judges: tuple[str, ...] = DEFAULT_JUDGES,
    seed: int = 0,
    failure_rate: float = 0.01,
    *,
    n_sequences: int = 10_000,
    vocab_size: int = 4096,
    overwrite: bool = False,
) -> None:
    """Write a complete, labeled run folder at ``folder``: ``n_layers`` x ``per_layer``
    features, all alive and planned, ``n_examples`` examples each (two thirds top, the
    rest random), and one judgment per feature and judge (about ``failure_rate`` of them
    failures). Built beside ``folder`` and renamed into place when complete."""
    if n_examples < 2:
        raise ValueError("n_examples: at least 2 (top and random examples)")
    if folder.exists() and not overwrite:
        raise FileExistsError(f"{folder}: already exists (pass overwrite=True to replace it)")
    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    top_k = max(1, round(n_examples * 2 / 3))
    params = CollectParams(top_k=top_k, n_random=n_examples - top_k, seed=seed,
                           layers=list(range(n_layers)))  # fmt: skip
    words = make_vocabulary(vocab_size, seed)
    vocab = pl.Series("vocab", words, dtype=pl.String)
    corpus = Corpus.make(n_sequences, len(words), rng)
    log.info("corpus: %d sequences, %d tokens; vocabulary %d", corpus.n_sequences,
             corpus.n_tokens, len(words))  # fmt: skip
    staging = folder.with_name(f".{folder.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    starts, widths = negative_windows(corpus, params, rng)
    features, parts, active = [], [], []
    stats: dict[int, LayerStats] = {}
    for layer in range(n_layers):
        t0 = time.perf_counter()
        frame, stats[layer] = features_frame(layer, per_layer, corpus, vocab, params.logit_lens_k,
                                             n_examples, rng)  # fmt: skip
        features.append(frame)
        part = staging / f".examples-{layer}.parquet"
        examples = examples_frame(layer, stats[layer], corpus, vocab, params, rng)
        sort_examples(examples).write_parquet(part)  # in the collector's order
        parts.append(part)
        active.append(
            active_in_windows(layer, stats[layer], corpus.n_tokens, widths, per_layer, rng)
        )
        log.info("layer %d/%d: features and examples in %.1f s", layer + 1, n_layers,
                 time.perf_counter() - t0)  # fmt: skip
    pl.concat(features).write_parquet(staging / FEATURES)
    del features
    t0 = time.perf_counter()
    pl.scan_parquet(parts).sink_parquet(staging / EXAMPLES, row_group_size=EXAMPLE_ROW_GROUP)
    for part in parts:
        part.unlink()
    log.info("examples.parquet concatenated in %.1f s", time.perf_counter() - t0)
    negatives_frame(corpus, starts, widths, active, vocab).write_parquet(staging / NEGATIVES)
    write_labels(staging / LABELS, n_layers, per_layer, judges, words, failure_rate, rng)
    created = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    info = RunInfo(
        schema_version=RUN_SCHEMA_VERSION,
        created_at=created,
        source="collect",
        unit="feature",
        shard=None,
        adapter_path=f"synthetic:layers={n_layers},width={per_layer},seed={seed}",
        adapter_hash=hashlib.sha256(f"adapter {n_layers} {per_layer} {seed}".encode()).hexdigest(),
        corpus_path=f"synthetic:sequences={n_sequences},seed={seed}",
        corpus_hash=hashlib.sha256(corpus.token_ids.tobytes()).hexdigest(),
        params=params,
        layers=list(range(n_layers)),
        n_features_per_layer=per_layer,
        n_alive={str(layer): per_layer for layer in range(n_layers)},
        n_sequences=corpus.n_sequences,
        n_tokens=corpus.n_tokens,
        n_truncated=0,
        n_unterminated_think=0,
        domains=corpus.sequences_by_domain(),
        tokens_by_domain=corpus.tokens_by_domain(),
        tokens_by_region=corpus.tokens_by_region(),
        tokens_by_think_bin=corpus.tokens_by_think_bin(),
        versions=package_versions(("transcoder-labeler", "numpy", "polars")),
    )
    write_run_info(staging, info)  # last: its presence marks a complete folder
    publish(staging, folder)
    read_run_info(folder)
    log.info("wrote %s in %.1f s", folder, time.perf_counter() - started)


def write_labels(
    path: Path, n_layers: int, per_layer: int, judges: tuple[str, ...], vocab: list[str],
    failure_rate: float, rng: np.random.Generator,
) -> None:  # fmt: skip
    """Plan every feature and store one judgment per (feature, judge), in one transaction."""
    t0 = time.perf_counter()
    store = LabelStore(path)
    n_features = n_layers * per_layer
    now = np.datetime64(dt.datetime.now(dt.UTC).replace(tzinfo=None), "ms")
    specs = [JudgeSpec.make(name, n_features, now) for name in judges]
    try:
        with store.transaction():
            store.add_planned(
                (feature_id(layer, i), layer, i)
                for layer in range(n_layers)
                for i in range(per_layer)
            )
            for layer in range(n_layers):
                depth = layer / max(n_layers - 1, 1)
                rows = judgment_rows(layer, depth, layer * per_layer, per_layer, specs, vocab,
                                     failure_rate, rng)  # fmt: skip
                sample: list[tuple[Any, ...]] = []
                store.conn.executemany(_INSERT, _sampled(rows, sample, CHECK_EVERY))
                check_rows(sample)
                log.info("labels: layer %d/%d (%d rows checked)", layer + 1, n_layers,
                         len(sample))  # fmt: skip
    finally:
        store.close()
    log.info("labels.sqlite written in %.1f s", time.perf_counter() - t0)


def _sampled(
    rows: Iterator[tuple[Any, ...]], sample: list[tuple[Any, ...]], every: int
) -> Iterator[tuple[Any, ...]]:
    """``rows`` passed through; the first 50 and every ``every``-th also kept in ``sample``."""
    for n, row in enumerate(rows):
        if n < 50 or n % every == 0:
            sample.append(row)
        yield row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="the run folder to write")
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--per-layer", type=int, default=8192, help="features per layer")
    parser.add_argument("--examples", type=int, default=30, help="examples per feature")
    parser.add_argument("--judge", action="append", dest="judges",
                        help=f"repeatable; default: {', '.join(DEFAULT_JUDGES)}")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--failure-rate", type=float, default=0.01)
    parser.add_argument("--sequences", type=int, default=10_000, help="synthetic corpus size")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%X")
    make_synthetic_run(
        args.out,
        n_layers=args.layers,
        per_layer=args.per_layer,
        n_examples=args.examples,
        judges=tuple(args.judges or DEFAULT_JUDGES),
        seed=args.seed,
        failure_rate=args.failure_rate,
        n_sequences=args.sequences,
        vocab_size=args.vocab_size,
        overwrite=args.overwrite,
    )


if __name__ == "__main__":
    main()
