"""The delphi export: its files lie where delphi's analysis looks and parse the way it
parses them, giving back each judge's stored detection scores, its explanations and the
final labels; LLM judges' answers are the kept ones, on the snippets they were shown."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
import pytest
import torch

from labeler.formats import delphi
from labeler.formats.catalog import export_catalog
from labeler.formats.delphi import export_delphi, latent_file, module_name
from labeler.judges import make_judge
from labeler.judges.base import JudgeOptions
from labeler.judges.heuristic import _window, activating_votes, pattern_of
from labeler.judges.prompting import snippet_text
from labeler.judges.scorers import fuzz_items, window
from labeler.labeling import label_judges, label_run
from labeler.labeling.plan import negatives_for
from labeler.labeling.store import LabelStore
from labeler.run.data import RunData
from labeler.run.schemas import Judgment
from prompts import normalize_token
from tests.conftest import CollectedDemo
from tests.fake_llm import FakeLLMServer, oracle
from tests.test_bad_input import labeler
from tests.test_first_hour import one_line_error

LLM = "openai:fake-model"
SEED = 3


# -- delphi's reader (delphi/log/result_analysis.py, eai-delphi 0.1.3) -------------------------


def delphi_frame(scores: Path, modules: list[str]) -> pl.DataFrame:
    """``load_data``: each scorer folder under ``scores``, each module's files found by the
    glob ``*{module}*``, the latent from ``stem.split("latent")[-1]``, one row per record
    with the seven fields it reads."""
    rows: list[dict[str, Any]] = []
    for score_type in scores.iterdir():
        if not score_type.is_dir():
            continue
        for module in modules:
            for file in score_type.glob(f"*{module}*"):
                latent = int(file.stem.split("latent")[-1])
                for ex in json.loads(file.read_bytes()):
                    rows.append(
                        {
                            "text": "".join(ex["str_tokens"]),
                            "distance": ex["distance"],
                            "activating": ex["activating"],
                            "prediction": ex["prediction"],
                            "probability": ex["probability"],
                            "correct": ex["correct"],
                            "activations": ex["activations"],
                            "latent_idx": latent,
                            "score_type": score_type.name,
                            "module": module,
                        }
                    )
    return pl.DataFrame(rows, infer_schema_length=None)


def per_latent(frame: pl.DataFrame) -> dict[tuple[str, int], dict[str, float]]:
    """``compute_confusion`` per latent (prediction >= 0.5 is 'activating'), as accuracy,
    precision and recall."""
    act, pred = pl.col("activating"), pl.col("prediction").cast(pl.Float64) >= 0.5
    tp, fp, fn = (act & pred).sum(), (~act & pred).sum(), (act & ~pred).sum()
    n = pl.len()
    stats = frame.group_by("module", "latent_idx").agg(
        ((n - fp - fn) / n).alias("accuracy"),
        pl.when(tp + fp > 0).then(tp / (tp + fp)).otherwise(0.0).alias("precision"),
        pl.when(tp + fn > 0).then(tp / (tp + fn)).otherwise(0.0).alias("recall"),
        pl.col("correct").mean().alias("share_correct"),
    )
    return {
        (m, i): {"accuracy": a, "precision": p, "recall": r, "share_correct": c}
        for m, i, a, p, r, c in stats.iter_rows()
    }


def feature_of(module: str, latent: int) -> str:
    layer = int(module.removeprefix("layers.").removesuffix(".mlp"))
    assert module == module_name(layer)
    return f"L{layer}F{latent}"


def ok_judgments(store: LabelStore, judge: str) -> dict[str, Judgment]:
    return {f: s.judgment for f, s in store.judgments(judge).items() if s.judgment is not None}


def check_folder(folder: Path, judgments: dict[str, Judgment]) -> pl.DataFrame:
    """What every judge's folder must satisfy; returns its scores as delphi reads them."""
    config = json.loads((folder / "run_config.json").read_text())
    modules = config["hookpoints"]
    fuzzed = (folder / "scores/fuzz").exists()
    assert config["scorers"] == ["detection", "fuzz"][: 1 + fuzzed]
    assert config["constructor_cfg"] == {}
    assert not [(a, b) for a in modules for b in modules if a != b and a in b]
    # every file is found by exactly one module's glob
    for sub in ("explanations", "scores/detection", "scores/fuzz")[: 2 + fuzzed]:
        files = sorted(p.name for p in (folder / sub).iterdir())
        found = sorted(p.name for m in modules for p in (folder / sub).glob(f"*{m}*"))
        assert files == found
    explained = {}
    for path in (folder / "explanations").iterdir():
        module, _, latent = path.stem.rpartition("_latent")
        explained[feature_of(module, int(latent))] = json.loads(path.read_bytes())
    assert explained == {f: j.explanation for f, j in judgments.items()}

    frame = delphi_frame(folder / "scores", modules)
    stats = per_latent(frame.filter(pl.col("score_type") == "detection"))
    scored = {feature_of(m, i): s for (m, i), s in stats.items()}
    assert set(scored) == set(judgments)
    for fid, s in scored.items():
        stored = judgments[fid].detection
        if stored.undefined:  # one class only: delphi's accuracy over it says nothing
            assert stored.accuracy is None and stored.precision is None, fid
            assert s["recall"] == pytest.approx(stored.recall, abs=1e-12), fid
            continue
        assert s["accuracy"] == pytest.approx(stored.accuracy, abs=1e-12), fid
        assert s["share_correct"] == pytest.approx(stored.accuracy, abs=1e-12), fid
        assert s["precision"] == pytest.approx(stored.precision, abs=1e-12), fid
        assert s["recall"] == pytest.approx(stored.recall, abs=1e-12), fid
    for path in (folder / "scores/detection").iterdir():
        for r in json.loads(path.read_bytes()):
            assert len(r["activations"]) == len(r["str_tokens"]) > 0
            assert r["correct"] == (r["prediction"] == r["activating"])
            if r["activating"]:
                assert r["distance"] in (0, 1) and max(r["activations"]) > 0
            else:
                assert r["distance"] == -1 and set(r["activations"]) == {0}
    return frame


# -- the heuristic judge ----------------------------------------------------------------------


def test_heuristic_scores_are_recomputed_and_read_back_by_delphi(
    labeled: CollectedDemo, tmp_path: Path
) -> None:
    run, store = RunData.open(labeled.run), LabelStore(labeled.run / "labels.sqlite")
    out = tmp_path / "delphi"
    seen: list[int] = []
    written = export_delphi(run, store, out, progress=seen.append)
    judgments = ok_judgments(store, "heuristic")
    planned = store.planned()
    assert written == len(judgments) and sum(seen) == len(planned)
    assert json.loads((out / "judges.json").read_text()) == [
        {
            "judge": "heuristic",
            "folder": "heuristic",
            "explanations": len(judgments),
            "scores": len(judgments),
            "without_scores": 0,
            "fuzz_scores": 0,
            "scores_from": "recomputed",
        }
    ]
    check_folder(out / "heuristic", judgments)

    # the records are the snippets the heuristic judge scored, and its answers on them
    record = run.records(sorted(judgments)[:12])
    for feature in record:
        negatives = negatives_for(run, feature, 0)
        pattern = set(pattern_of(activating_votes(feature)))
        expected = []
        for kind in ("top", "random"):
            positives = [_window(e) for e in feature.of_kind(kind)[:5]]
            if positives:
                expected += [(t, True) for t in positives]
                expected += [(s.tokens, False) for s in negatives[kind]]
        path = out / "heuristic/scores/detection" / latent_file(feature.layer, feature.index)
        records = json.loads(path.read_bytes())
        assert [(r["str_tokens"], r["activating"]) for r in records] == expected
        for r in records:
            hit = any((normalize_token(t) or t) in pattern for t in r["str_tokens"])
            assert r["prediction"] == hit and r["probability"] is None

    # the final labels, as the catalog has them, keyed back to modules and latents
    catalog = tmp_path / "catalog.jsonl"
    export_catalog(run, store, catalog, with_examples=False)
    expected_labels = {
        line["feature_id"]: (line["final_label"], line["label_source"])
        for line in map(json.loads, catalog.read_text().splitlines())
    }
    labels = [json.loads(line) for line in (out / "labels.jsonl").read_text().splitlines()]
    assert [x["feature_id"] for x in labels] == [f for f, _, _ in planned]
    for x in labels:
        assert feature_of(x["module"], x["latent"]) == x["feature_id"]
        assert (x["final_label"], x["label_source"]) == expected_labels[x["feature_id"]]

    counts = torch.load(out / "heuristic/log/hookpoint_firing_counts.pt", weights_only=True)
    features = pl.read_parquet(labeled.run / "features.parquet")
    assert sorted(counts) == sorted({module_name(layer) for _, layer, _ in planned})
    for row in features.iter_rows(named=True):
        assert counts[module_name(row["layer"])][row["index"]].item() == row["count"]
    store.close()


# -- the fuzzing scorer ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fuzzed(collected: CollectedDemo, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo labeled by the heuristic judge with every scorer."""
    run = tmp_path_factory.mktemp("delphi-fuzz") / "run"
    shutil.copytree(collected.run, run)
    store = LabelStore(run / "labels.sqlite")
    judge = make_judge("heuristic", JudgeOptions(scorers=("detection", "fuzz", "intruder")))
    label_run(RunData.open(run), store, judge)
    store.close()
    return run


def test_fuzz_files_are_the_items_shown_and_read_back_by_delphi(
    fuzzed: Path, tmp_path: Path
) -> None:
    run, store = RunData.open(fuzzed), LabelStore(fuzzed / "labels.sqlite")
    out = tmp_path / "delphi"
    export_delphi(run, store, out)
    judgments = ok_judgments(store, "heuristic")
    assert all(j.fuzz is not None for j in judgments.values())
    [summary] = json.loads((out / "judges.json").read_text())
    assert summary["fuzz_scores"] == summary["scores"] == len(judgments)
    frame = check_folder(out / "heuristic", judgments)  # detection as before, beside fuzz
    fuzz = frame.filter(pl.col("score_type") == "fuzz")
    stats = {feature_of(m, i): s for (m, i), s in per_latent(fuzz).items()}
    assert set(stats) == set(judgments)
    n_compared = 0
    for fid, s in stats.items():
        stored = judgments[fid].fuzz
        assert stored is not None
        assert s["share_correct"] == pytest.approx(stored.accuracy, abs=1e-12), fid
        if stored.precision is not None:  # both kinds of item: delphi's confusion is ours
            assert s["accuracy"] == pytest.approx(stored.accuracy, abs=1e-12), fid
            assert s["precision"] == pytest.approx(stored.precision, abs=1e-12), fid
            assert s["recall"] == pytest.approx(stored.recall, abs=1e-12), fid
            n_compared += 1
    assert n_compared > 0.9 * len(stats)

    # each file holds the fuzzing items the judge saw, in its order, with their windows'
    # activations: rightly marked ones by their set, fuzzed ones as delphi's "active"
    # fuzzing records them (not activating, distance -1, real activations)
    for feature in run.records(sorted(judgments)[:40]):
        items = fuzz_items(feature, 0)
        path = out / "heuristic/scores/fuzz" / latent_file(feature.layer, feature.index)
        records = json.loads(path.read_bytes())
        assert [(r["str_tokens"], r["activating"]) for r in records] == [
            (it.tokens, it.correct) for it in items
        ]
        windows: dict[tuple[str, ...], list[tuple[list[float], int]]] = {}
        for d, kind in enumerate(("top", "random")):
            for e in feature.of_kind(kind)[:5]:
                windows.setdefault(tuple(window(e)[0]), []).append((window(e)[1], d))
        for r, item in zip(records, items, strict=True):
            # the window it was cut from (a top example can be a random one too): its
            # activations, and the marks on its active tokens or off them
            sets = [
                d
                for acts, d in windows[tuple(r["str_tokens"])]
                if r["activations"] == pytest.approx(acts)
            ]
            active = {i for i, a in enumerate(r["activations"]) if a > 0}
            if item.correct:
                assert active == set(item.marked) and r["distance"] in sets
            else:
                assert not active & set(item.marked) and sets and r["distance"] == -1
            assert max(r["activations"]) > 0 and r["probability"] is None
            assert r["correct"] == (r["prediction"] == r["activating"])
    # the intruder scorer has no file: delphi's loader reads every scores folder as
    # per-example classifier records, which an intruder trial is not
    assert sorted(p.name for p in (out / "heuristic/scores").iterdir()) == ["detection", "fuzz"]
    store.close()


def test_fuzz_files_need_the_labeling_seed(fuzzed: Path, tmp_path: Path) -> None:
    run, store = RunData.open(fuzzed), LabelStore(fuzzed / "labels.sqlite")
    export_delphi(run, store, tmp_path / "delphi", seed=5)
    [summary] = json.loads((tmp_path / "delphi/judges.json").read_text())
    assert summary["fuzz_scores"] == 0
    assert not (tmp_path / "delphi/heuristic/scores/fuzz").exists()
    store.close()


# -- an LLM judge: the answers it gave, on what it was shown ----------------------------------


@dataclass(frozen=True)
class LLMLabeled:
    run: Path
    detect_prompts: list[str]


@pytest.fixture(scope="module")
def llm_labeled(
    collected: CollectedDemo, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LLMLabeled]:
    """Two features a layer labeled by the heuristic and by an OpenAI judge on the fake
    server (with log probabilities), with a seed other than the default."""
    run = tmp_path_factory.mktemp("delphi-llm") / "run"
    shutil.copytree(collected.run, run)
    with FakeLLMServer(oracle) as fake, pytest.MonkeyPatch.context() as mp:
        mp.setenv("OPENAI_API_KEY", "sk-test")
        mp.delenv("OPENAI_BASE_URL", raising=False)
        options = JudgeOptions(
            base_url=f"{fake.base_url}/v1", openai_api="chat", logprobs=True, seed=SEED
        )
        store = LabelStore(run / "labels.sqlite")
        judges = [make_judge("heuristic"), make_judge(LLM, options)]
        label_judges(RunData.open(run), store, judges, sample_per_layer=2, seed=SEED)
        store.close()
        prompts = [
            str(r.body["messages"][1]["content"])
            for r in fake.requests
            if r.status == 200 and "TASK: DETECT" in str(r.body["messages"][1]["content"])
        ]
    yield LLMLabeled(run, prompts)


def test_llm_answers_are_the_kept_ones_on_the_snippets_shown(
    llm_labeled: LLMLabeled, tmp_path: Path
) -> None:
    run, store = RunData.open(llm_labeled.run), LabelStore(llm_labeled.run / "labels.sqlite")
    out = tmp_path / "delphi"
    assert export_delphi(run, store, out, seed=SEED) == 8
    folders = {j["judge"]: j for j in json.loads((out / "judges.json").read_text())}
    assert folders[LLM] == {
        "judge": LLM,
        "folder": "openai_fake-model",
        "explanations": 8,
        "scores": 8,
        "without_scores": 0,
        "fuzz_scores": 0,
        "scores_from": "stages",
    }
    assert folders["heuristic"]["scores"] == 8
    check_folder(out / "heuristic", ok_judgments(store, "heuristic"))
    judgments = ok_judgments(store, LLM)
    frame = check_folder(out / "openai_fake-model", judgments)
    assert frame["probability"].is_not_null().all()

    # each set's records, in order, are the snippets of one detection prompt
    for fid, judgment in judgments.items():
        layer, index = (int(x) for x in fid[1:].split("F"))
        path = out / "openai_fake-model/scores/detection" / f"layers.{layer}.mlp_latent{index}.txt"
        records = json.loads(path.read_bytes())
        start = 0
        for kind in ("top", "random"):
            score = judgment.detection_by_set.get(kind)
            if score is None:
                continue
            part = records[start : start + score.n_positive + score.n_negative]
            start += len(part)
            listed = "\n".join(
                f"Snippet {n}: {snippet_text(r['str_tokens'])}" for n, r in enumerate(part, start=1)
            )
            assert sum(listed + "\n" in p for p in llm_labeled.detect_prompts) == 1, fid
        assert start == len(records)
    store.close()


def test_snippets_rebuilt_with_another_seed_give_no_scores(
    llm_labeled: LLMLabeled, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run, store = RunData.open(llm_labeled.run), LabelStore(llm_labeled.run / "labels.sqlite")
    with caplog.at_level(logging.WARNING, logger=delphi.__name__):
        export_delphi(run, store, tmp_path / "delphi")  # labeled with SEED, rebuilt with 0
    folders = {j["judge"]: j for j in json.loads((tmp_path / "delphi/judges.json").read_text())}
    assert folders[LLM]["scores"] == 0 and folders[LLM]["without_scores"] == 8
    assert folders["heuristic"]["scores"] == 0  # its negatives are drawn with the seed too
    assert not (tmp_path / "delphi/openai_fake-model/scores").exists()
    assert len(list((tmp_path / "delphi/openai_fake-model/explanations").iterdir())) == 8
    assert "16 judgments got no scores file" in caplog.text and "seed 0" in caplog.text
    store.close()


def test_an_llm_judges_kept_fuzz_answers_are_its_fuzz_files(
    collected: CollectedDemo, tmp_path: Path
) -> None:
    """An OpenAI judge on the fake server, asked for fuzzing with log probabilities: its
    files hold the answers its fuzzing stage kept, on the items it was shown."""
    run = tmp_path / "run"
    shutil.copytree(collected.run, run)
    scorers = ("detection", "fuzz")
    with FakeLLMServer(oracle) as fake, pytest.MonkeyPatch.context() as mp:
        mp.setenv("OPENAI_API_KEY", "sk-test")
        mp.delenv("OPENAI_BASE_URL", raising=False)
        options = JudgeOptions(base_url=f"{fake.base_url}/v1", openai_api="chat",
                               logprobs=True, seed=SEED, scorers=scorers)  # fmt: skip
        store = LabelStore(run / "labels.sqlite")
        label_judges(RunData.open(run), store, [make_judge(LLM, options)],
                     sample_per_layer=2, seed=SEED)  # fmt: skip
    out = tmp_path / "delphi"
    export_delphi(RunData.open(run), store, out, seed=SEED)
    [summary] = json.loads((out / "judges.json").read_text())
    judgments = ok_judgments(store, LLM)
    assert summary["fuzz_scores"] == len(judgments) == 8
    frame = check_folder(out / "openai_fake-model", judgments)
    fuzz = frame.filter(pl.col("score_type") == "fuzz")
    assert fuzz["probability"].is_not_null().all()
    for (module, latent), s in per_latent(fuzz).items():
        stored = judgments[feature_of(module, latent)].fuzz
        assert stored is not None
        assert s["share_correct"] == pytest.approx(stored.accuracy, abs=1e-12)
    for feature in RunData.open(run).records(sorted(judgments)):
        path = out / "openai_fake-model/scores/fuzz" / latent_file(feature.layer, feature.index)
        records = json.loads(path.read_bytes())
        items = fuzz_items(feature, SEED)
        assert [(r["str_tokens"], r["activating"]) for r in records] == [
            (it.tokens, it.correct) for it in items
        ]
    store.close()


# -- bad input --------------------------------------------------------------------------------


def test_unlabeled_run_existing_output_and_failures(
    run_copy: Path, labeled: CollectedDemo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    unlabeled = labeler("export", run_copy, "--format", "delphi", "--out", tmp_path / "none")
    line = one_line_error(unlabeled, "no labels yet")
    assert line == f"error: {run_copy}: no labels yet; run `labeler label {run_copy}` first"
    assert not (tmp_path / "none").exists()

    run, store = RunData.open(labeled.run), LabelStore(labeled.run / "labels.sqlite")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("mine")
    existing = labeler("export", labeled.run, "--format", "delphi", "--out", out)
    one_line_error(existing, "already exists", "--overwrite")

    def broken(*args: object) -> int:
        raise RuntimeError("disk full")

    monkeypatch.setattr(delphi, "_write_texts", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        export_delphi(run, store, out, overwrite=True)
    assert list(tmp_path.glob(".out.partial-*")) == []  # no staging folder left
    assert (out / "keep").read_text() == "mine"
    store.close()


def test_the_instructions_pin_plotly_below_7() -> None:
    """delphi's ``log_results`` fails with plotly 7, which its ``visualize`` extra installs
    when left to itself: every install line of docs/delphi.md pins it below 7."""
    text = (Path(__file__).parents[1] / "docs" / "delphi.md").read_text(encoding="utf-8")
    installs = [line for line in text.splitlines() if "pip install" in line and "delphi" in line]
    assert installs and all('"plotly<7"' in line for line in installs)
