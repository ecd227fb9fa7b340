"""The LLM judge's fuzzing and intruder stages (``labeler label --scorers``) through the
real OpenAI and Anthropic SDKs against the loopback fake and its oracle: the prompts
pinned, planted features scoring above random ones, the batch transport, a killed and
resumed labeling paying each stage once, a scorer added later asking only its calls,
and the dry run counting them."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from labeler.cli import cli
from labeler.judges import make_judge
from labeler.judges.base import JudgeOptions
from labeler.judges.prompting import (
    fuzz_prompt,
    intruder_prompt,
    likelihood_fuzz_prompt,
    likelihood_intruder_prompt,
)
from labeler.judges.replies import check_intruders
from labeler.judges.scorers import fuzz_items, intruder_trials
from labeler.labeling import label_run
from labeler.labeling.store import LabelStore
from labeler.labeling.transports.batch import BatchSettings as Polling
from labeler.labeling.transports.batch import label_in_batches
from labeler.run.data import RunData
from labeler.run.schemas import Judgment, Snippet
from prompts import TEMPLATES, prompt_hash
from tests.fake_llm import FakeLLMServer, Hang
from tests.fleet import BIN
from tests.test_hf_judge import tiny_judge_model  # noqa: F401  (a fixture)
from tests.test_prompts_golden import feature

GOLDEN = Path(__file__).parent / "golden"
SECRET = "sk-scorers-test-7311"
SCORERS = "detection,fuzz,intruder"
ALL = ("detection", "fuzz", "intruder")
WIRES = {"chat": "openai:fake-model", "anthropic": "anthropic:fake-claude"}
_TASK = re.compile(r"TASK: (\w+)")


@pytest.fixture
def fake(fresh_fake: FakeLLMServer, monkeypatch: pytest.MonkeyPatch) -> FakeLLMServer:
    """The conftest's oracle server, with this module's key and no reply cache folder."""
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    monkeypatch.setenv("ANTHROPIC_API_KEY", SECRET)
    monkeypatch.setenv("ANTHROPIC_BASE_URL", fresh_fake.base_url)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.delenv("LABELER_CACHE_DIR", raising=False)
    return fresh_fake


def _options(fake: FakeLLMServer, wire: str, scorers: tuple[str, ...] = ALL) -> JudgeOptions:
    base = None if wire == "anthropic" else f"{fake.base_url}/v1"
    return JudgeOptions(base_url=base, openai_api="chat", scorers=scorers)  # type: ignore[arg-type]


def _tasks(fake: FakeLLMServer) -> Counter[str]:
    """Successful calls the fake answered, by the task their prompt names."""
    counts: Counter[str] = Counter()
    for r in fake.requests:
        if r.status == 200 and (m := _TASK.search(json.dumps(r.body))):
            counts[m.group(1)] += 1
    return counts


def _auroc(positives: list[float], negatives: list[float]) -> float:
    """P(a planted feature's score > a random one's), ties counting half."""
    pairs = [(p > n) + 0.5 * (p == n) for p in positives for n in negatives]
    return sum(pairs) / len(pairs)


def _separation(judgments: list[Judgment], truth: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Per scorer, the AUROC of its headline score between planted and random features."""
    planted = {"token_set", "hesitation_output", "template"}
    values = {"detection": lambda j: j.detection.f1, "fuzz": lambda j: j.fuzz.f1,
              "intruder": lambda j: j.intruder.accuracy}  # fmt: skip
    out: dict[str, float] = {}
    for scorer, read in values.items():
        pos = [read(j) or 0.0 for j in judgments if truth[j.feature_id]["kind"] in planted]
        neg = [read(j) or 0.0 for j in judgments
               if truth[j.feature_id]["category"] == "uninterpretable"]  # fmt: skip
        assert pos and neg, (len(pos), len(neg))
        out[scorer] = _auroc(pos, neg)
    return out


# -- prompts ---------------------------------------------------------------------------------


def _rendered() -> dict[str, str]:
    f = feature()
    items = fuzz_items(f, seed=0)
    intruders = [Snippet(tokens=["We", " add", " 3", " to", " both", " sides", "."],
                         activating=False)]  # fmt: skip
    trials = intruder_trials(f, intruders, seed=0)
    explanation = "'Wait' and 'Hmm' at the start of a self-check."
    return {
        "fuzz": fuzz_prompt(explanation, items).user,
        "intruder": intruder_prompt(trials).user,
        "likelihood_fuzz": likelihood_fuzz_prompt(explanation, items[0]).user,
        "likelihood_intruder": likelihood_intruder_prompt(trials[0]).user,
    }


@pytest.mark.parametrize("name", ["fuzz", "intruder", "likelihood_fuzz", "likelihood_intruder"])
def test_scorer_prompts_match_golden(name: str) -> None:
    text = _rendered()[name]
    path = GOLDEN / f"{name}.txt"
    if os.environ.get("UPDATE_GOLDEN"):
        path.write_text(text, encoding="utf-8")
    assert text == path.read_text(encoding="utf-8")
    assert name in TEMPLATES and len(prompt_hash()) == 16


def test_fuzz_marks_and_intruder_numbers_as_the_oracle_reads_them() -> None:
    f = feature()
    items = fuzz_items(f, seed=0)
    text = _rendered()["fuzz"]
    assert text.startswith("TASK: FUZZ") and 'A feature is described as: "' in text
    for n, it in enumerate(items, start=1):
        line = next(x for x in text.split("\n") if x.startswith(f"Example {n}: "))
        assert line.count("<<") == len(it.marked)
    text = _rendered()["intruder"]
    assert "described" not in text and "<<" not in text
    assert "Trial 1:\nWindow 1: " in text and "Window 5: " in text and "Window 6" not in text
    assert check_intruders([1, 5], [5, 5]) == [0, 4]
    for bad in ([0], [6], [1, 2]):
        with pytest.raises(ValueError):
            check_intruders(bad, [5])


# -- through each SDK ------------------------------------------------------------------------


@pytest.mark.parametrize("wire", sorted(WIRES))
def test_scorers_are_stored_and_planted_features_beat_random_ones(
    wire: str, run_copy: Path, fake: FakeLLMServer, collected: Any
) -> None:
    name = WIRES[wire]
    judge = make_judge(name, _options(fake, wire))
    assert judge.calls_per_feature == 6
    store = LabelStore(run_copy / "labels.sqlite")
    report = label_run(RunData.open(run_copy), store, judge, sample_per_layer=8,
                       concurrency=8)  # fmt: skip
    rows = store.judgments(name)
    assert report.labeled == len(rows) == 32 and report.failed == 0
    judgments = [s.judgment for s in rows.values() if s.judgment is not None]
    for j in judgments:
        assert j.fuzz is not None and j.fuzz.n_positive + j.fuzz.n_negative == 10
        assert j.intruder is not None and j.intruder.n_trials >= 1
        assert j.usage["fuzz"].calls == 1 and j.usage["intruder"].calls == 1
    assert _tasks(fake) == {"EXPLAIN": 32, "DETECT": 64, "CLASSIFY": 32, "FUZZ": 32,
                            "INTRUDER": 32}  # fmt: skip
    truth = {f["feature_id"]: f for f in json.loads(collected.paths.ground_truth.read_text())}
    separation = _separation(judgments, truth)
    # measured (20 planted, 12 random features): detection 0.825, fuzz 0.873, intruder
    # 0.912; the oracle's detection misses one planted feature entirely
    assert separation["intruder"] >= 0.9
    assert separation["detection"] >= 0.8 and separation["fuzz"] >= 0.85
    store.close()


# -- other transports ------------------------------------------------------------------------


def test_batch_transport_asks_the_scorers_in_the_second_round(
    run_copy: Path, fake: FakeLLMServer
) -> None:
    name = WIRES["chat"]
    store = LabelStore(run_copy / "labels.sqlite")
    judge = make_judge(name, _options(fake, "chat"))
    reports, _ = label_in_batches(RunData.open(run_copy), store, [judge], Polling(poll_s=0.05),
                                  sample_per_layer=2)  # fmt: skip
    assert (reports[name].labeled, reports[name].failed) == (8, 0)
    # the explanations with the intruder trials (which need none), then detection,
    # fuzzing and classification
    assert [b.n_requests for b in fake.batches.created] == [8 * 2, 8 * 4]
    assert fake.requests == []  # nothing synchronous
    for row in store.judgments(name).values():
        j = row.judgment
        assert j is not None and j.fuzz is not None and j.intruder is not None
        assert j.usage["fuzz"].calls == j.usage["intruder"].calls == 1
    store.close()


@pytest.mark.slow
def test_a_fleet_routes_the_scorers_to_the_score_queue(
    run_copy: Path, fake: FakeLLMServer, redis_server: Any, tmp_path: Path
) -> None:
    from tests.fleet import Worker, fleet_env, run_driver

    env = fleet_env(redis_server.url, OPENAI_API_KEY=SECRET)
    with (
        Worker("w1", env, tmp_path / "w1.log", "explain.openai,classify.openai", concurrency=2),
        Worker("w2", env, tmp_path / "w2.log", "score.openai", concurrency=2),
    ):
        run_driver([str(run_copy), "--judge", WIRES["chat"], "--base-url",
                    f"{fake.base_url}/v1", "--sample-per-layer", "1", "--scorers", SCORERS],
                   env, tmp_path / "d.log")  # fmt: skip
    store = LabelStore(run_copy / "labels.sqlite")
    rows = store.judgments(WIRES["chat"])
    assert len(rows) == 4
    assert all(r.judgment and r.judgment.fuzz and r.judgment.intruder for r in rows.values())
    store.close()
    assert _tasks(fake) == {"EXPLAIN": 4, "DETECT": 8, "CLASSIFY": 4, "FUZZ": 4, "INTRUDER": 4}
    scored = (tmp_path / "w2.log").read_text()
    assert scored.count("fuzz: ok") == 4 and scored.count("intruder: ok") == 4


# -- resuming and adding a scorer ------------------------------------------------------------


def _cli_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "ANTHROPIC_"))}
    env.update(OPENAI_API_KEY=SECRET, PYTHONUNBUFFERED="1")
    return env


def _label_args(run: Path, fake: FakeLLMServer, scorers: str = SCORERS) -> list[str]:
    return [str(BIN / "labeler"), "label", str(run), "--judge", WIRES["chat"], "--base-url",
            f"{fake.base_url}/v1", "--sample-per-layer", "1", "--concurrency", "1",
            "--scorers", scorers]  # fmt: skip


def test_a_killed_labeling_resumed_bills_every_scorer_stage_once(
    run_copy: Path, fake: FakeLLMServer, tmp_path: Path
) -> None:
    # one call at a time, six per feature: the second feature's fifth call hangs
    fake.script(*[Hang(0.0)] * 10, Hang(60.0))
    with (tmp_path / "first.log").open("ab") as out:
        process = subprocess.Popen(_label_args(run_copy, fake), env=_cli_env(), stdout=out,
                                   stderr=out)  # fmt: skip
    deadline = time.monotonic() + 60
    while len(fake.requests) < 11:
        assert process.poll() is None and time.monotonic() < deadline, len(fake.requests)
        time.sleep(0.05)
    time.sleep(1.0)  # the stage before the hanging one is stored by now
    process.send_signal(signal.SIGKILL)
    process.wait(10)
    again = subprocess.run(_label_args(run_copy, fake), env=_cli_env(), capture_output=True,
                           text=True, timeout=120)  # fmt: skip
    assert again.returncode == 0, again.stdout + again.stderr
    # every stage of the four features billed once, but the call in flight at the kill
    # (a scorer's call of the second feature: billed by the provider, never answered)
    bodies = Counter(json.dumps(r.body, sort_keys=True) for r in fake.requests if r.status == 200)
    assert sum(n - 1 for n in bodies.values()) <= 1
    distinct = Counter(m.group(1) for body in bodies if (m := _TASK.search(body)))
    assert distinct == {"EXPLAIN": 4, "DETECT": 8, "CLASSIFY": 4, "FUZZ": 4, "INTRUDER": 4}
    tasks = _tasks(fake)
    assert sum((tasks - distinct).values()) <= 1
    store = LabelStore(run_copy / "labels.sqlite")
    rows = store.judgments(WIRES["chat"])
    assert len(rows) == 4 and all(r.judgment and r.judgment.fuzz for r in rows.values())
    store.close()


def test_a_scorer_added_later_asks_only_its_calls_and_the_dry_run_counts_them(
    run_copy: Path, fake: FakeLLMServer
) -> None:
    first = subprocess.run(_label_args(run_copy, fake, "detection"), env=_cli_env(),
                           capture_output=True, text=True, timeout=120)  # fmt: skip
    assert first.returncode == 0, first.stdout + first.stderr
    assert _tasks(fake) == {"EXPLAIN": 4, "DETECT": 8, "CLASSIFY": 4}
    runner = CliRunner()
    dry = runner.invoke(cli, [*_label_args(run_copy, fake, "detection,fuzz")[1:], "--dry-run"],
                        env=_cli_env())  # fmt: skip
    assert dry.exit_code == 0, dry.output
    # the four features judged already: one fuzzing call each, nothing else
    assert re.search(r"│\s+4 │\s+4 │", dry.output), dry.output
    fake.reset()
    later = subprocess.run(_label_args(run_copy, fake, "detection,fuzz"), env=_cli_env(),
                           capture_output=True, text=True, timeout=120)  # fmt: skip
    assert later.returncode == 0, later.stdout + later.stderr
    assert _tasks(fake) == {"FUZZ": 4}
    store = LabelStore(run_copy / "labels.sqlite")
    rows = store.judgments(WIRES["chat"])
    assert all(r.judgment and r.judgment.fuzz and not r.judgment.intruder for r in rows.values())
    store.close()


def test_the_dry_run_estimate_counts_the_scorer_calls_and_their_prompts(run_copy: Path) -> None:
    from labeler.judges.pricing import load_prices
    from labeler.labeling.accounting import estimate

    run = RunData.open(run_copy)
    ids = run.alive()["feature_id"].to_list()[:8]
    plain = estimate(run, make_judge("openai:gpt-5-mini"), ids, load_prices())
    scored = estimate(run, make_judge("openai:gpt-5-mini", JudgeOptions(scorers=ALL)), ids,
                      load_prices())  # fmt: skip
    assert (plain.calls, scored.calls) == (8 * 4, 8 * 6)
    assert scored.input_tokens > plain.input_tokens + 8 * 200  # the two prompts' text
    assert scored.output_tokens == plain.output_tokens + 8 * (40 + 20)
    assert scored.cost_usd is not None and plain.cost_usd is not None
    assert scored.cost_usd > plain.cost_usd


# -- a likelihood backend --------------------------------------------------------------------


def test_an_in_process_model_fuzzes_by_yes_no_and_picks_intruders_by_number(
    run_copy: Path,
    tiny_judge_model: Path,  # noqa: F811  (the fixture)
) -> None:
    """The two scorer stages of an hf: judge on two features (the other stages have
    their own tests in test_hf_judge.py)."""
    import asyncio

    from labeler.judges.hf_backend import HFBackend
    from labeler.judges.llm_judge import JudgeSettings, LLMJudge
    from labeler.labeling.plan import negatives_for

    name = f"hf:{tiny_judge_model}"
    backend = HFBackend(name, str(tiny_judge_model), "cpu", "float32", batch_size=8)
    judge = LLMJudge(name, backend, JudgeSettings(n_examples=3, scorers=ALL))
    run = RunData.open(run_copy)

    async def score(fid: str) -> dict[str, Any]:
        record = run.records([fid])[0]
        negatives = negatives_for(run, record, 0, ALL)
        fuzz = await judge.run_stage("fuzz", record, negatives, "Fires on 'a'.")
        intruder = await judge.run_stage("intruder", record, negatives)
        return {"fuzz": fuzz, "intruder": intruder}

    for fid in ("L0F1", "L1F11"):
        outcomes = asyncio.run(score(fid))
        fuzz, intruder = outcomes["fuzz"], outcomes["intruder"]
        assert fuzz.ok and intruder.ok, (fuzz.reason, intruder.reason)
        assert fuzz.detection is not None and len(fuzz.detection.truth) == 10
        assert fuzz.detection.probs is not None and len(fuzz.detection.probs) == 10
        assert intruder.intrusion is not None and len(intruder.intrusion.truth) >= 1
        assert all(0 <= p < 5 for p in intruder.intrusion.picked)
        assert fuzz.usage["fuzz"].calls >= 1 and intruder.usage["intruder"].calls >= 1
