"""What a labeling asks for is what it labels and what its dry run counts: a sample per
layer is drawn from the run's stored plan (whatever earlier labelings planned) or extends
it, never the union of every plan ever made."""

from __future__ import annotations

import re
import sqlite3
from collections import Counter
from pathlib import Path

import pytest
from click.testing import CliRunner

from labeler.cli import cli
from labeler.labeling.plan import plan_features, select_features
from labeler.run.data import RunData
from tests.fake_llm import FakeLLMServer

JUDGE = "openai:gpt-5-mini"
CALLS = 4


@pytest.fixture
def fake(fresh_fake: FakeLLMServer, monkeypatch: pytest.MonkeyPatch) -> FakeLLMServer:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-plan-selection-test-0001")
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.delenv("LABELER_CACHE_DIR", raising=False)
    return fresh_fake


def _label(run: Path, fake: FakeLLMServer, *extra: str) -> str:
    result = CliRunner().invoke(cli, [
        "label", str(run), "--judge", JUDGE, "--base-url", f"{fake.base_url}/v1",
        "--openai-api", "chat", *extra,
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    return result.output


def _planned(run: Path) -> Counter[int]:
    with sqlite3.connect(run / "labels.sqlite") as conn:
        return Counter(layer for (layer,) in conn.execute("SELECT layer FROM planned"))


def test_a_sample_on_a_fully_planned_run_labels_and_prices_only_the_sample(
    labeled_copy: Path, fake: FakeLLMServer
) -> None:
    everything = _planned(labeled_copy)  # the heuristic judge labeled every alive feature
    assert sum(everything.values()) == 960
    dry = _label(labeled_copy, fake, "--sample-per-layer", "2", "--dry-run")
    row = next(line for line in dry.splitlines() if "openai:" in line)  # the name may fold
    assert re.search(r"│\s*8\s*│\s*32\s*│", row), dry
    assert fake.requests == []
    out = _label(labeled_copy, fake, "--sample-per-layer", "2")
    assert f"{JUDGE}: 8 planned, 0 already labeled, 8 labeled now" in out
    assert len(fake.requests) == 8 * CALLS  # not 960 features' worth
    assert _planned(labeled_copy) == everything
    # the sample of a fully planned run is the sample a fresh run would have drawn
    run = RunData.open(labeled_copy)
    assert select_features(run, plan_features(run, None, 0), 2, 0).features == plan_features(
        run, 2, 0
    )


def test_a_larger_sample_extends_the_plan_and_a_smaller_one_selects_from_it(
    run_copy: Path, fake: FakeLLMServer
) -> None:
    _label(run_copy, fake, "--sample-per-layer", "2")
    assert _planned(run_copy) == Counter({0: 2, 1: 2, 2: 2, 3: 2})
    out = _label(run_copy, fake, "--sample-per-layer", "3")
    assert f"{JUDGE}: 12 planned, 8 already labeled, 4 labeled now" in out
    assert _planned(run_copy) == Counter({0: 3, 1: 3, 2: 3, 3: 3})
    before = len(fake.requests)
    out = _label(run_copy, fake, "--sample-per-layer", "1")
    assert f"{JUDGE}: 4 planned, 4 already labeled, 0 labeled now" in out
    assert len(fake.requests) == before
    assert _planned(run_copy) == Counter({0: 3, 1: 3, 2: 3, 3: 3})
