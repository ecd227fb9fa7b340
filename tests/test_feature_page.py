"""A feature's page as researchers read features on Neuronpedia and SAEDashboard: the
histogram of its activations with its density, the logit lens with values, the example
groups (top, each quantile, random) and its neighbours, served by the real `labeler
browse` command over the planted demo and drawn in a real headless Chromium."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from labeler.run.data import RunData
from labeler.run.spread import HISTOGRAM_BINS
from tests.conftest import CollectedDemo, Tab
from tests.test_review_web import _start, _stop, http


@dataclass(frozen=True)
class Paged:
    url: str
    run: Path

    def feature(self, feature_id: str) -> dict[str, Any]:
        status, _, body = http(f"{self.url}api/feature/{feature_id}")
        assert status == 200, body
        data: dict[str, Any] = json.loads(body)
        return data


@pytest.fixture(scope="module")
def paged(labeled: CollectedDemo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Paged]:
    folder = tmp_path_factory.mktemp("feature-page")
    run = folder / "run"
    shutil.copytree(labeled.run, run)
    process, url = _start(run, "--port", "0", "--reviewer", "ada", stderr=folder / "server.log",
                          command="browse")  # fmt: skip
    try:
        yield Paged(url, run)
    finally:
        _stop(process)


def _alive(run: Path, n: int) -> list[dict[str, Any]]:
    """``n`` alive features spread over the run's layers, with their features.parquet rows."""
    features = RunData.open(run).alive().sort("layer", "index")
    step = max(1, features.height // n)
    return list(features[::step].head(n).iter_rows(named=True))


def test_histogram_estimates_the_tokens_where_it_fires(paged: Paged) -> None:
    info = RunData.open(paged.run).info
    for row in _alive(paged.run, 12):
        data = paged.feature(row["feature_id"])
        hist = data["activation"]
        sample = [e["activation"] for e in data["examples"] if e["kind"] == "quantile"]
        # the quantile examples partition the uniform sample the histogram rests on
        assert hist["sample"] == "uniform" and hist["n_sample"] == len(sample) > 0
        assert len(hist["bins"]) == hist["n_bins"] == HISTOGRAM_BINS
        assert hist["lo"] <= min(sample) and max(sample) <= hist["hi"]
        assert hist["lo"] == pytest.approx(row["act_min"]) and hist["hi"] >= row["act_max"]
        # each bin is an estimated number of tokens: together they are the feature's count
        assert sum(hist["bins"]) == pytest.approx(row["count"], abs=0.001 * HISTOGRAM_BINS)
        assert data["density"] == pytest.approx(row["count"] / info.n_tokens)
        assert data["log10_density"] == pytest.approx(math.log10(row["count"] / info.n_tokens))


def test_logit_lens_values_on_both_sides(paged: Paged) -> None:
    features = RunData.open(paged.run).features
    for row in _alive(paged.run, 6):
        data = paged.feature(row["feature_id"])
        stored = features.filter(pl.col("feature_id") == row["feature_id"]).row(0, named=True)
        assert data["top_logit_values"] == pytest.approx(stored["top_logit_values"])
        assert data["bottom_logit_values"] == pytest.approx(stored["bottom_logit_values"])
        assert len(data["bottom_logit_values"]) == len(data["bottom_logits"]) > 0
        # promoted most first, demoted most first
        assert data["top_logit_values"] == sorted(data["top_logit_values"], reverse=True)
        assert data["bottom_logit_values"] == sorted(data["bottom_logit_values"])


def test_every_tokens_logit_is_counted_once(paged: Paged) -> None:
    """The collector's logit histogram counts every row of the unembedding, from the
    lowest logit (the lens's most demoted token) to the highest (its most promoted)."""
    info = RunData.open(paged.run).info
    config = json.loads((Path(info.adapter_path) / "config.json").read_text())
    vocab_rows = config["vocab_size"]  # the unembedding's rows
    for row in _alive(paged.run, 8):
        data = paged.feature(row["feature_id"])
        spread = data["logit_histogram"]
        assert spread is not None and len(spread["bins"]) == 32
        assert sum(spread["bins"]) == vocab_rows
        assert spread["lo"] == data["bottom_logit_values"][0]
        assert spread["hi"] == data["top_logit_values"][0]
        # the lowest and the highest logit fall in the end bins
        assert spread["bins"][0] >= 1 and spread["bins"][-1] >= 1


def test_the_page_draws_histogram_lens_and_example_groups(paged: Paged, tab: Tab) -> None:
    row = _alive(paged.run, 3)[1]
    data = paged.feature(row["feature_id"])
    tab.open(f"{paged.url}feature/{row['feature_id']}")
    page = tab.page
    page.wait_for_selector(f'#feature-panel[data-loaded="{row["feature_id"]}"]')
    bars = page.locator("#histogram .bar")
    assert bars.count() == HISTOGRAM_BINS
    heights = [
        float(h.rstrip("%") or 0) for h in bars.evaluate_all("bs => bs.map(b => b.style.height)")
    ]
    tallest = max(range(HISTOGRAM_BINS), key=lambda i: data["activation"]["bins"][i])
    assert heights[tallest] == 100.0  # the fullest bin is drawn full height
    assert sum(1 for h in heights if h > 0) == sum(1 for b in data["activation"]["bins"] if b > 0)
    assert "of tokens" in page.inner_text("#density")
    # the lens as a table of tokens and values: a header row and one row per promoted token
    assert page.locator("#lens-values tr").count() == 1 + len(data["top_logits"])
    assert page.locator("#logit-histogram .bar").count() == len(data["logit_histogram"]["bins"])
    shown = page.locator("#lens-values td.num").all_inner_texts()
    assert shown[0] == f"{data['top_logit_values'][0]:.3f}"
    assert shown[1] == f"{data['bottom_logit_values'][0]:.3f}"
    # examples: top, then one group per quantile (highest first), then random
    groups = page.locator("#example-list h4.example-group").all_inner_texts()
    quantiles = sorted({e["quantile"] for e in data["examples"] if e["kind"] == "quantile"},
                       reverse=True)  # fmt: skip
    assert groups[0].startswith("Top activations")
    assert [g.split(":")[0] for g in groups[1:-1]] == [f"Quantile {q}" for q in quantiles]
    assert groups[-1].startswith("Random activating samples")
    assert tab.errors == []


def _planted_pairs(labeled: CollectedDemo) -> list[tuple[str, str]]:
    """Output features planted in one layer to promote the same words: their decoder
    columns are one reserved direction plus small noise, so nearly parallel."""
    truth = json.loads(labeled.paths.ground_truth.read_text())
    groups: dict[tuple[int, tuple[str, ...]], list[str]] = {}
    for feature in truth:
        if feature.get("promotes"):
            key = (feature["layer"], tuple(feature["promotes"]))
            groups.setdefault(key, []).append(feature["feature_id"])
    return [(a, b) for ids in groups.values() if len(ids) == 2 for a, b in [ids]]


def test_planted_close_decoders_are_each_others_neighbours(
    paged: Paged, labeled: CollectedDemo
) -> None:
    pairs = _planted_pairs(labeled)
    assert len(pairs) >= 2
    others: list[float] = []
    for a, b in pairs:
        for one, other in ((a, b), (b, a)):
            data = paged.feature(one)
            decoder = data["neighbours"]["decoder"]
            assert decoder[0]["feature_id"] == other and decoder[0]["value"] > 0.9
            others += [n["value"] for n in decoder[1:]]
            # planted on the same trigger words, they fire in the same corpus windows
            assert other in [n["feature_id"] for n in data["neighbours"]["coactivation"]]
            assert data["neighbours"]["encoder"], data["neighbour_notes"]["encoder"]
            # the page names what each kind rests on
            assert "adapter_hash" in data["neighbour_notes"]["decoder"]
    assert max(others) < 0.5  # the rest of the layer points elsewhere


def test_neighbours_are_links_on_the_page(paged: Paged, labeled: CollectedDemo, tab: Tab) -> None:
    a, b = _planted_pairs(labeled)[0]
    tab.open(f"{paged.url}feature/{a}")
    page = tab.page
    page.wait_for_selector(f'#feature-panel[data-loaded="{a}"]')
    first = page.locator('#neighbours [data-kind="decoder"] li').first
    assert first.get_attribute("data-feature") == b
    link = first.locator("a.neighbour")
    assert link.inner_text() == b and link.get_attribute("href") == f"/feature/{b}"
    assert page.locator('#neighbours [data-kind="coactivation"] li').count() > 0
    link.click()
    page.wait_for_selector(f'#feature-panel[data-loaded="{b}"]')
    assert page.url == f"{paged.url}feature/{b}"
    back = page.locator('#neighbours [data-kind="decoder"] li').first
    assert back.get_attribute("data-feature") == a
    assert tab.errors == []
