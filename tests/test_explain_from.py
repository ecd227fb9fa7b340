"""Explanations from outputs (``--explain-from examples,outputs``): the explainer sees the
feature's logit lens with values and, where ``score-outputs`` ran, the tokens steering
promotes; the planted output features' explanations then name the words they promote,
with the heuristic judge and with an LLM (the fake server's oracle, through the SDK)."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from labeler.judges import make_judge
from labeler.judges.base import JudgeOptions
from labeler.judges.llm_judge import LLMJudge
from labeler.judges.prompting import explain_prompt
from labeler.labeling.plan import negatives_for
from labeler.labeling.store import LabelStore
from labeler.run.data import RunData
from prompts import normalize_token
from tests.conftest import CollectedDemo
from tests.fake_llm import FakeLLMServer
from tests.test_bad_input import assert_fails, labeler

BOTH = ("examples", "outputs")


def _truth(collected: CollectedDemo) -> dict[str, dict[str, Any]]:
    return {t["feature_id"]: t for t in json.loads(collected.paths.ground_truth.read_text())}


def _names(explanation: str, word: str) -> bool:
    return f"'{word}'" in explanation.lower()


@pytest.fixture(scope="module")
def steered(labeled: CollectedDemo, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The labeled demo with the output features scored by `score-outputs`, relabeled
    from outputs in a fresh store (its output scores kept)."""
    run = tmp_path_factory.mktemp("steered") / "run"
    shutil.copytree(labeled.run, run)
    scored = labeler("score-outputs", run, "--select", "mechanism=output", "--null", "5")
    assert scored.returncode == 0, scored.stderr
    store = LabelStore(run / "labels.sqlite")
    try:
        store.conn.execute("DELETE FROM judgments")
        store.conn.execute("DELETE FROM stages")
        store.conn.commit()
    finally:
        store.close()
    result = labeler("label", run, "--explain-from", "examples,outputs")
    assert result.returncode == 0, result.stderr
    return run


def test_the_heuristic_names_the_words_output_features_promote(
    steered: Path, collected: CollectedDemo
) -> None:
    truth = _truth(collected)
    store = LabelStore(steered / "labels.sqlite")
    try:
        stored = store.judgments("heuristic")
        steering = {f: json.loads(p)["promoted"] for f, p in store.output_scores().items()}
    finally:
        store.close()
    outputs = [f for f, t in truth.items() if t["promotes"] and f in stored]
    assert len(outputs) >= 10
    for fid in outputs:
        judgment = stored[fid].judgment
        assert judgment is not None
        assert judgment.prompt_hash.endswith("+examples+outputs")
        words = truth[fid]["promotes"]
        assert all(_names(judgment.explanation, w) for w in words), (fid, judgment.explanation)
        assert "steering it raises" in judgment.explanation
        first = normalize_token(steering[fid][0])
        assert _names(judgment.explanation, first), (fid, judgment.explanation)
    # nothing is said to be promoted by features whose logit lens is a random column's
    others = [
        s.judgment for f, s in stored.items() if not truth[f]["promotes"] and s.judgment is not None
    ]
    assert len(others) > 800
    assert sum("promotes" in j.explanation for j in others) == 0


def test_explaining_from_examples_alone_is_unchanged(labeled: CollectedDemo) -> None:
    """The default prompt and hash are those of labels made before the option existed."""
    run = RunData.open(labeled.run)
    record = run.records(["L2F135"])[0]
    plain = explain_prompt(record, 10)
    assert plain == explain_prompt(record, 10, ("examples",))
    assert "What it does to the model's output" not in plain.user
    both = explain_prompt(record, 10, BOTH)
    assert both.user.startswith(plain.user.split("\n\nReply")[0])
    assert '"Wait" +' in both.user and "Suppressed tokens" in both.user
    alone = explain_prompt(record, 10, ("outputs",))
    assert "Example 1" not in alone.user and '"Hmm" +' in alone.user
    judge = make_judge("heuristic")
    assert "+" not in judge.prompt_hash


def test_explain_from_is_checked(run_copy: Path) -> None:
    assert_fails(labeler("label", run_copy, "--explain-from", "outputs,logits"),
                 "--explain-from", "logits")  # fmt: skip


def test_an_llm_explains_output_features_by_their_words_only_when_shown(
    fresh_fake: FakeLLMServer, collected: CollectedDemo, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the real OpenAI SDK to the fake server's oracle: the explanation of each
    planted output feature names the words it promotes with outputs shown, and none of
    them from its examples alone (they show only the token it fires on)."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-explain-from")
    monkeypatch.delenv("LABELER_CACHE_DIR", raising=False)
    truth = _truth(collected)
    run = RunData.open(collected.run)
    fids = [f for f, t in truth.items() if t["promotes"]]
    records = run.records(fids)
    base = f"{fresh_fake.base_url}/v1"

    async def explain(explain_from: tuple[str, ...]) -> dict[str, str]:
        options = JudgeOptions(base_url=base, openai_api="chat", explain_from=explain_from)  # type: ignore[arg-type]
        judge = make_judge("openai:gpt-5-mini", options)
        assert isinstance(judge, LLMJudge)
        out = {}
        for record in records:
            outcome = await judge.run_stage("explain", record, negatives_for(run, record, 0))
            assert outcome.ok and outcome.explanation is not None, outcome.reason
            out[record.feature_id] = outcome.explanation
        await judge.aclose()
        return out

    plain = asyncio.run(explain(("examples",)))
    both = asyncio.run(explain(BOTH))
    for fid in fids:
        words = truth[fid]["promotes"]
        assert all(_names(both[fid], w) for w in words), (fid, both[fid])
        assert not any(_names(plain[fid], w) for w in words), (fid, plain[fid])


def test_scorers_added_under_other_prompts_ask_nothing_else_and_see_the_stored_explanation(
    run_copy: Path, fresh_fake: FakeLLMServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run labeled by an earlier version (its stages kept under another prompt hash):
    asked for fuzzing and intruder now, the labeler sends one call per scorer and
    feature, and fuzzing is asked about the explanation the label carries."""
    from tests.test_llm_scorers import _cli_env, _label_args, _tasks

    server = fresh_fake
    monkeypatch.delenv("LABELER_CACHE_DIR", raising=False)
    first = subprocess.run(_label_args(run_copy, server, "detection"), env=_cli_env(),
                           capture_output=True, text=True, timeout=120)  # fmt: skip
    assert first.returncode == 0, first.stdout + first.stderr
    store = LabelStore(run_copy / "labels.sqlite")
    try:
        store.conn.execute("UPDATE stages SET prompt_hash='made-by-an-earlier-version'")
        store.conn.execute(
            "UPDATE judgments SET prompt_hash='made-by-an-earlier-version', payload="
            "json_set(payload, '$.explanation', 'Fires on ''zebra''.')"
        )
        store.conn.commit()
        labeled = set(store.done("openai:fake-model"))
    finally:
        store.close()
    assert len(labeled) == 4
    server.reset()
    later = subprocess.run(_label_args(run_copy, server, "detection,fuzz,intruder"),
                           env=_cli_env(), capture_output=True, text=True, timeout=120)  # fmt: skip
    assert later.returncode == 0, later.stdout + later.stderr
    assert _tasks(server) == {"FUZZ": 4, "INTRUDER": 4}
    fuzz_prompts = [
        json.dumps(r.body) for r in server.requests if "TASK: FUZZ" in json.dumps(r.body)
    ]
    assert len(fuzz_prompts) == 4 and all("'zebra'" in body for body in fuzz_prompts)
    store = LabelStore(run_copy / "labels.sqlite")
    try:
        judgments = {f: s.judgment for f, s in store.judgments("openai:fake-model").items()}
    finally:
        store.close()
    for judgment in judgments.values():
        assert judgment is not None and judgment.explanation == "Fires on 'zebra'."
        assert judgment.fuzz is not None and judgment.intruder is not None
