"""The whole LLM judge on the in-process backend: a tiny random-weights Qwen2 with the
demo's tokenizer labels real features of the planted demo run, end to end."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from adapters.random_adapter import ModelShape, random_decoder
from labeler.judges import make_judge
from labeler.judges.base import JudgeOptions
from labeler.judges.hf_backend import HFBackend
from labeler.judges.llm_judge import JudgeSettings, LLMJudge
from labeler.labeling import label_run
from labeler.labeling.store import LabelStore
from labeler.run.data import RunData
from prompts import load_taxonomy, prompt_hash
from tests.conftest import CollectedDemo


@pytest.fixture(scope="module")
def tiny_judge_model(collected: CollectedDemo, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(collected.paths.checkpoint)
    shape = ModelShape(
        n_layers=2, d_model=32, intermediate=64, n_heads=4, n_kv_heads=2,
        vocab_size=len(tokenizer), max_positions=8192,
    )  # fmt: skip
    folder = tmp_path_factory.mktemp("judge-model") / "model"
    random_decoder(shape, seed=1).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_hf_judge_labels_or_fails_every_feature_with_valid_answers(
    run_copy: Path, tiny_judge_model: Path
) -> None:
    name = f"hf:{tiny_judge_model}"
    backend = HFBackend(name, str(tiny_judge_model), "cpu", "float32", batch_size=8)
    judge = LLMJudge(name, backend, JudgeSettings(n_examples=3, explanation_tokens=12))
    run = RunData.open(run_copy)
    store = LabelStore(run_copy / "labels.sqlite")
    report = label_run(run, store, judge, sample_per_layer=2, concurrency=2)
    stored = store.judgments(name)
    assert report.planned == 8 and report.labeled + report.failed == 8
    assert len(stored) == 8
    taxonomy = load_taxonomy()
    ok = [s.judgment for s in stored.values() if s.judgment is not None]
    assert ok, [s.reason for s in stored.values()]
    for judgment in ok:
        c = judgment.classification
        assert c.category in taxonomy.categories
        assert c.rationale.startswith("Chosen by answer likelihood")
        assert judgment.prompt_hash == prompt_hash()
        # likelihoods give probabilities, so every detection set has an AUROC
        assert all(d.auroc is not None for d in judgment.detection_by_set.values())
        assert judgment.detection.n_positive == 10 and judgment.detection.n_negative == 10
        assert judgment.usage["explain"].calls >= 1
        assert judgment.usage["classify"].calls >= 1
        assert judgment.usage["detect"].input_tokens > 0
        assert judgment.cost_usd is None  # no price table given to this judge
    for s in stored.values():
        if s.status == "failed":
            assert s.reason and s.reason.startswith("invalid_reply: explain")
    store.close()


def test_hf_judge_is_built_by_name_and_priced_at_zero(tiny_judge_model: Path) -> None:
    judge = make_judge(f"hf:{tiny_judge_model}", JudgeOptions(device="cpu", dtype="float32"))
    assert isinstance(judge, LLMJudge) and isinstance(judge.backend, HFBackend)
    assert judge.cost({}) == 0.0
    asyncio.run(judge.aclose())
