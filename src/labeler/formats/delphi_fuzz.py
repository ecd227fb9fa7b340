"""The fuzzing scorer's answers as delphi's ``scores/fuzz`` files.

delphi's fuzzing scorer (``delphi.scorers.classifier.fuzz``, eai-delphi 0.1.3) writes the
same per-example records as its detection scorer (``ClassifierOutput``: ``str_tokens``,
``activations``, ``distance``, ``activating``, ``prediction``, ``probability``,
``correct``), one JSON array per latent, and its analysis reads every folder under
``scores/`` with the one loader. Here ``activating`` is whether the marks sit on the
activating tokens: delphi's ``fuzz_type="active"`` marks an activating example's
non-activating tokens and records it as not activating (``distance`` -1, its real
activations), which is how ``labeler.judges.scorers.fuzz_items`` builds its fuzzed half.
A rightly marked item has the distance of its set, as in the detection files: 0 for a
top example, 1 for a random one.

The items are the ones the judge saw: ``fuzz_items`` rebuilds them from the run with the
labeling's seed, each with the activations of the example window it was cut from. The
answers are the judges' own: an LLM judge keeps its fuzzing stage's answers in the label
store; the heuristic judge's are recomputed (``labeler.judges.heuristic.fuzz_score``:
marks judged right when every marked token is a pattern token). A judge's fuzz files of
a layer are written only when every feature of the layer it has fuzzing answers for
rebuilds to the score stored (another seed, or another run, does not); answers are never
made up.
"""

from __future__ import annotations

import json
import sqlite3
from collections import defaultdict, deque
from dataclasses import dataclass, field

import polars as pl

from labeler.judges.heuristic import activating_votes, pattern_of
from labeler.judges.metrics import detection_score
from labeler.judges.scorers import FUZZ_PER_SET, FuzzItem, fuzz_items, window
from labeler.judges.stages import is_staged
from labeler.reporting.label_table import HEURISTIC, layer_range
from labeler.run.data import RunData
from labeler.run.schemas import DetectionScore, FeatureRecord
from prompts import normalize_token

FUZZ = "fuzz"
FUZZ_SCORES = f"scores/{FUZZ}"
FUZZED_DISTANCE = -1
_SET_DISTANCE = {"top": 0, "random": 1}


@dataclass(frozen=True)
class _Answers:
    """A judge's answers on a feature's fuzzing items, in the order it saw them."""

    truth: list[bool]
    predicted: list[bool]
    probs: list[float] | None


@dataclass
class LayerFuzz:
    """One layer's fuzz files: (index, JSON text) per judge, and how many judgments with
    a fuzzing score got none."""

    texts: dict[str, pl.DataFrame] = field(default_factory=dict)
    mismatched: int = 0


def layer_fuzz(
    run: RunData, conn: sqlite3.Connection, layer: int, seed: int, judges: set[str]
) -> LayerFuzz:
    """The layer's fuzz files of every judge whose answers are kept (staged judges) or
    recomputed (the heuristic judge), where they rebuild to the stored scores."""
    stored = _stored_scores(conn, layer, judges)
    out = LayerFuzz()
    if not stored:
        return out
    kept = _stage_answers(conn, layer)
    ids = sorted({fid for scores in stored.values() for fid in scores})
    records = {r.feature_id: r for r in run.records(ids)}
    for judge, scores in stored.items():
        if judge != HEURISTIC and not is_staged(judge):
            continue  # other judges keep no answers
        texts: list[tuple[int, str]] = []
        for fid, score in sorted(scores.items(), key=lambda kv: records[kv[0]].index):
            feature = records[fid]
            items = fuzz_items(feature, seed)
            answers = (
                _heuristic_answers(feature, items) if judge == HEURISTIC else kept.get((judge, fid))
            )
            if answers is None or not _rebuilds(answers, items, score):
                texts = []
                out.mismatched += len(scores)
                break
            texts.append((feature.index, json.dumps(_records(feature, items, answers))))
        if texts:
            out.texts[judge] = pl.DataFrame(
                texts, schema={"index": pl.Int64, "text": pl.String}, orient="row"
            )
    return out


def _stored_scores(
    conn: sqlite3.Connection, layer: int, judges: set[str]
) -> dict[str, dict[str, DetectionScore]]:
    """Each judge's stored fuzzing scores of the layer's successful judgments."""
    rows = conn.execute(
        "SELECT judge, feature_id, payload -> '$.fuzz' FROM judgments WHERE status = 'ok' "
        "AND payload ->> '$.fuzz' IS NOT NULL AND feature_id >= ? AND feature_id < ?",
        layer_range(layer),
    ).fetchall()
    out: dict[str, dict[str, DetectionScore]] = defaultdict(dict)
    for judge, fid, payload in rows:
        if judge in judges:
            out[judge][fid] = DetectionScore.model_validate_json(payload)
    return dict(out)


def _stage_answers(conn: sqlite3.Connection, layer: int) -> dict[tuple[str, str], _Answers]:
    """The fuzzing stage's answers kept for the layer's successful judgments, by (judge,
    feature), from the stage of the judgment's own prompt hash."""
    rows = conn.execute(
        "SELECT s.judge, s.feature_id, s.payload -> '$.detection' FROM stages s "
        "JOIN judgments j ON j.feature_id = s.feature_id AND j.judge = s.judge "
        "AND j.prompt_hash = s.prompt_hash WHERE j.status = 'ok' AND s.stage = ? "
        "AND s.payload ->> '$.detection' IS NOT NULL "
        "AND s.feature_id >= ? AND s.feature_id < ?",
        (FUZZ, *layer_range(layer)),
    ).fetchall()
    out: dict[tuple[str, str], _Answers] = {}
    for judge, fid, payload in rows:
        data = json.loads(payload)
        out[(judge, fid)] = _Answers(data["truth"], data["predicted"], data.get("probs"))
    return out


def _heuristic_answers(feature: FeatureRecord, items: list[FuzzItem]) -> _Answers:
    """The heuristic judge's answers: marks are right when every marked token is one of
    its pattern's (``labeler.judges.heuristic.fuzz_score``)."""
    wanted = set(pattern_of(activating_votes(feature)))
    predicted = [
        all((normalize_token(it.tokens[i]) or it.tokens[i]) in wanted for i in it.marked)
        for it in items
    ]
    return _Answers([it.correct for it in items], predicted, None)


def _rebuilds(answers: _Answers, items: list[FuzzItem], stored: DetectionScore) -> bool:
    """Whether the rebuilt items are the ones answered: the same truths, and the answers
    scoring to exactly the stored score."""
    if answers.truth != [it.correct for it in items] or len(answers.predicted) != len(items):
        return False
    return detection_score(answers.truth, answers.predicted, answers.probs) == stored


def _records(
    feature: FeatureRecord, items: list[FuzzItem], answers: _Answers
) -> list[dict[str, object]]:
    """delphi's ``ClassifierOutput`` records, in the order the judge saw the items. Each
    item's activations and set come from the example window it was cut from (windows with
    the same tokens are told apart by their marks, else taken in the examples' order)."""
    windows: dict[tuple[str, ...], deque[tuple[list[float], str]]] = defaultdict(deque)
    for kind in ("top", "random"):
        for example in feature.of_kind(kind)[:FUZZ_PER_SET]:
            tokens, acts = window(example)
            windows[tuple(tokens)].append((acts, kind))
    out: list[dict[str, object]] = []
    for n, item in enumerate(items):
        acts, kind = _take(windows[tuple(item.tokens)], item)
        prediction = answers.predicted[n]
        out.append(
            {
                "str_tokens": item.tokens,
                "activations": acts,
                "distance": _SET_DISTANCE[kind] if item.correct else FUZZED_DISTANCE,
                "activating": item.correct,
                "prediction": prediction,
                "probability": None if answers.probs is None else answers.probs[n],
                "correct": prediction == item.correct,
            }
        )
    return out


def _take(candidates: deque[tuple[list[float], str]], item: FuzzItem) -> tuple[list[float], str]:
    """The window ``item`` was cut from among those with its tokens: one whose active
    tokens are the marks of a rightly marked item, or none of the marks of a fuzzed one."""
    for n, (acts, kind) in enumerate(candidates):
        active = {i for i, a in enumerate(acts) if a > 0}
        if (active == set(item.marked)) if item.correct else not (active & set(item.marked)):
            del candidates[n]
            return acts, kind
    return candidates.popleft()
