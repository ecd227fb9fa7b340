"""What `labeler label` and `labeler status` print reads right: each judge of an ensemble
its own spend, the dry run's tokens counted as status counts them, and a labeling stopped
by its budget spread over every layer."""

from __future__ import annotations

import json
import re
import sqlite3
from collections import Counter
from itertools import pairwise
from pathlib import Path

import pytest

from tests.fake_llm import FakeLLMServer
from tests.test_bad_input import labeler

JUDGE = "openai:fake-model"
PRICES = {"prices": {JUDGE: {"input": 1.0, "cached_input": 0.1, "output": 4.0}}}


@pytest.fixture
def fake(fresh_fake: FakeLLMServer, monkeypatch: pytest.MonkeyPatch) -> FakeLLMServer:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-label-readings-test-0001")
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.delenv("LABELER_CACHE_DIR", raising=False)
    return fresh_fake


@pytest.fixture
def prices(tmp_path: Path) -> Path:
    path = tmp_path / "prices.json"
    path.write_text(json.dumps(PRICES))
    return path


def _label(run: Path, fake: FakeLLMServer, prices: Path, *extra: str) -> str:
    result = labeler(
        "label", run, "--judge", JUDGE, "--base-url", f"{fake.base_url}/v1",
        "--openai-api", "chat", "--prices", prices, *extra,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout


def _status(run: Path) -> list[dict[str, object]]:
    result = labeler("status", run, "--json")
    assert result.returncode == 0, result.stderr
    statuses: list[dict[str, object]] = json.loads(result.stdout)
    return statuses


def _spent(out: str, judge: str) -> float:
    line = next(line for line in out.splitlines() if line.startswith(f"{judge}:"))
    found = re.search(r"spent \$([0-9.,]+)", line)
    assert found is not None, line
    return float(found.group(1).replace(",", ""))


def test_each_judge_of_an_ensemble_reports_its_own_spend(
    run_copy: Path, fake: FakeLLMServer, prices: Path
) -> None:
    out = _label(run_copy, fake, prices, "--judge", "heuristic", "--sample-per-layer", "2")
    by_judge = {s["judge"]: s["cost_usd"] for s in _status(run_copy)}
    assert by_judge["heuristic"] == 0.0
    paid = by_judge[JUDGE]
    assert isinstance(paid, float) and paid > 0
    assert _spent(out, "heuristic") == 0.0
    assert _spent(out, JUDGE) == pytest.approx(paid, abs=1e-4)


def _table_row(out: str, title: str, judge: str) -> list[str]:
    """The cells of the judge's row in the table under ``title`` (a long name folds onto
    the next line; its first line holds the numbers)."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(title))
    line = next(line for line in lines[start:] if line.startswith("│ " + judge[:8]))
    return [cell.strip() for cell in line.strip("│ ").split("│")]


def _count(cell: str) -> float:
    """A table's count: 1,234 or compact (12.3k, 1.2M)."""
    scale = {"k": 1e3, "M": 1e6, "B": 1e9}
    cell = cell.rstrip("*").replace(",", "")
    return float(cell[:-1]) * scale[cell[-1]] if cell[-1] in scale else float(cell)


def _columns(out: str, title: str) -> list[str]:
    """The column names of the table under ``title``, each column's header lines joined."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(title))
    header: list[list[str]] = []
    for line in lines[start + 2 :]:
        if not line.startswith("┃"):
            break
        header.append([cell.strip() for cell in line.strip("┃").split("┃")])
    return [" ".join(w for w in words if w) for words in zip(*header, strict=True)]


def test_dry_run_and_status_count_input_tokens_the_same_way(
    run_copy: Path, fake: FakeLLMServer, prices: Path
) -> None:
    dry = _label(run_copy, fake, prices, "--sample-per-layer", "3", "--dry-run")
    assert fake.requests == []
    _label(run_copy, fake, prices, "--sample-per-layer", "3")
    status = labeler("status", run_copy)
    assert status.returncode == 0, status.stderr
    # both tables say what their input column holds, in the same words
    spending = "tokens and cost by judge"
    est_columns, real_columns = _columns(dry, "estimate"), _columns(status.stdout, spending)
    assert est_columns[3:5] == real_columns[2:4] == ["tokens in", "of them cached"]
    est = _table_row(dry, "estimate", JUDGE)
    real = _table_row(status.stdout, spending, JUDGE)
    # estimate: features, calls, tokens in, of them cached; status: calls, tokens in, ...
    est_in, est_cached = _count(est[3]), _count(est[4])
    real_in, real_cached = _count(real[2]), _count(real[3])
    assert _count(est[2]) == _count(real[1]) == 12 * 4
    assert real_cached > 0 and est_cached > 0
    assert real_cached < real_in and est_cached < est_in  # "of them": part of the input
    assert 0.5 < est_in / real_in < 2.0, (est, real)
    assert 0.5 < (est_cached / est_in) / (real_cached / real_in) < 2.0, (est, real)


def _labeled_by_layer(run: Path, judge: str) -> Counter[int]:
    with sqlite3.connect(run / "labels.sqlite") as conn:
        rows = conn.execute(
            "SELECT p.layer FROM judgments j JOIN planned p USING (feature_id) "
            "WHERE j.judge=? AND j.status='ok'",
            (judge,),
        )
        return Counter(layer for (layer,) in rows)


def test_a_budget_stop_leaves_labels_spread_over_every_layer(
    run_copy: Path, fake: FakeLLMServer, prices: Path
) -> None:
    _label(run_copy, fake, prices, "--sample-per-layer", "1")
    (status,) = _status(run_copy)
    per_feature = float(status["cost_usd"]) / 4  # type: ignore[arg-type]
    # 24 features per layer planned, a budget for about 20 more features: about a quarter
    out = _label(run_copy, fake, prices, "--sample-per-layer", "24",
                 "--budget-usd", f"{20 * per_feature:.6f}")  # fmt: skip
    assert "budget of" in out
    labeled = _labeled_by_layer(run_copy, JUDGE)
    total = sum(labeled.values())
    assert 20 <= total <= 48, labeled  # features in flight at the stop finish
    assert sorted(labeled) == [0, 1, 2, 3], labeled
    assert min(labeled.values()) >= total // 4 - 2, labeled  # in proportion, within a few
    # the rest is labeled by a rerun, each feature once
    _label(run_copy, fake, prices, "--sample-per-layer", "24")
    assert _labeled_by_layer(run_copy, JUDGE) == Counter({0: 24, 1: 24, 2: 24, 3: 24})
    assert len(fake.requests) == 96 * 4


def test_the_work_order_spreads_every_prefix_over_the_layers() -> None:
    from labeler.labeling.plan import RECORD_CHUNK, WORK_BLOCK, work_order

    sizes = {0: 8192, 1: 4096, 2: 100, 5: 7}
    features = [(f"L{la}F{i}", la, i) for la, n in sizes.items() for i in range(n)]
    order = work_order(features, seed=3)
    assert sorted(order) == sorted(f for f, _, _ in features)  # each feature once
    assert order == work_order(features, seed=3) != work_order(features, seed=4)
    total = len(features)
    for stop in (50, 1000, 5000, 10_000):
        seen = Counter(int(f[1 : f.index("F")]) for f in order[:stop])
        for layer, n in sizes.items():
            share = stop * n / total
            assert abs(seen[layer] - share) <= WORK_BLOCK + 1, (stop, layer, seen)
    # a chunk of records read together is a few runs of consecutive features
    index = {f: (la, i) for f, la, i in features}
    for start in range(0, total, RECORD_CHUNK):
        chunk = [index[f] for f in order[start : start + RECORD_CHUNK]]
        runs = 1 + sum(1 for a, b in pairwise(chunk) if (b[0], b[1] - 1) != a)
        assert runs <= RECORD_CHUNK // WORK_BLOCK + 8, (start, runs)
