"""Every scorer's scores where people read them: the catalog export, `summarize`, the
catalog browser (filter, sort, columns, in a real headless Chromium) and the feature's
review page, on the demo labeled by the heuristic judge with detection, fuzzing and
intruder scorers."""

from __future__ import annotations

import json
import shutil
import sqlite3
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest

from labeler.judges import make_judge
from labeler.judges.base import JudgeOptions
from labeler.judges.scorers import INTRUDER_SIZE
from labeler.labeling import label_run
from labeler.labeling.store import LabelStore
from labeler.reporting.disputes import DisputeRules
from labeler.review.catalog_index import INDEX_FILE, open_index
from labeler.run.data import RunData
from labeler.run.schemas import Judgment
from tests.conftest import CollectedDemo, Tab
from tests.test_bad_input import labeler
from tests.test_review_web import _start, _stop, http

ALL = ("detection", "fuzz", "intruder")
FUZZ_FIELDS = ("accuracy", "balanced_accuracy", "f1", "auroc", "auprc", "n_positive", "n_negative")
INTRUDER_FIELDS = ("accuracy", "chance", "interval", "p_value", "n_trials", "n_correct")


@dataclass(frozen=True)
class Scored:
    run: Path
    catalog: dict[str, dict[str, Any]]  # the exported catalog's lines, by feature id
    judgments: dict[str, Judgment]  # the heuristic judge's, as stored
    truth: dict[str, dict[str, Any]]  # the demo's planted features, by feature id


def _catalog(run: Path, out: Path) -> dict[str, dict[str, Any]]:
    exported = labeler("export", run, "--out", out)
    assert exported.returncode == 0, exported.stderr
    lines = (json.loads(t) for t in out.read_text(encoding="utf-8").splitlines())
    return {line["feature_id"]: line for line in lines}


@pytest.fixture(scope="module")
def scored(collected: CollectedDemo, tmp_path_factory: pytest.TempPathFactory) -> Scored:
    folder = tmp_path_factory.mktemp("scores-shown")
    run = folder / "run"
    shutil.copytree(collected.run, run)
    store = LabelStore(run / "labels.sqlite")
    label_run(RunData.open(run), store, make_judge("heuristic", JudgeOptions(scorers=ALL)))
    judgments = {f: o.judgment for f, o in store.judgments("heuristic").items() if o.judgment}
    store.close()
    truth = json.loads(collected.paths.ground_truth.read_text())
    return Scored(
        run, _catalog(run, folder / "catalog.jsonl"), judgments,
        {t["feature_id"]: t for t in truth},
    )  # fmt: skip


def _shown(line: dict[str, Any], scorer: str) -> dict[str, Any] | None:
    [judgment] = [j for j in line["judgments"] if j["status"] == "ok"]
    value: dict[str, Any] | None = judgment[scorer]
    return value


# -- the catalog ----------------------------------------------------------------------------


def test_the_catalog_carries_fuzz_and_intruder_scores(scored: Scored) -> None:
    assert len(scored.catalog) == len(scored.judgments) > 900
    for fid, judgment in scored.judgments.items():
        fuzz, intruder = (
            _shown(scored.catalog[fid], "fuzz"),
            _shown(scored.catalog[fid], "intruder"),
        )
        assert judgment.fuzz is not None and judgment.intruder is not None
        assert fuzz is not None and list(fuzz) == list(FUZZ_FIELDS)
        stored = judgment.fuzz.model_dump()
        if judgment.fuzz.undefined:  # one class only: the scores that need both are null
            assert fuzz["accuracy"] is None and fuzz["f1"] is None
        else:
            assert fuzz == {k: stored[k] for k in FUZZ_FIELDS}, fid
        assert intruder is not None and list(intruder) == list(INTRUDER_FIELDS)
        assert intruder == {k: judgment.intruder.model_dump()[k] for k in INTRUDER_FIELDS}, fid
        assert intruder["chance"] == 1 / INTRUDER_SIZE
        if intruder["n_trials"]:
            low, high = intruder["interval"]
            assert low <= intruder["accuracy"] <= high
        else:  # too few examples for a trial: no accuracy, no interval
            assert intruder["accuracy"] is None and intruder["interval"] is None
    tried = [j for j in scored.judgments.values() if j.intruder and j.intruder.n_trials]
    assert len(tried) > 0.9 * len(scored.judgments)


def test_judgments_without_those_scorers_show_null(labeled: CollectedDemo, tmp_path: Path) -> None:
    catalog = _catalog(labeled.run, tmp_path / "catalog.jsonl")
    judged = [j for line in catalog.values() for j in line["judgments"]]
    assert len(judged) == len(catalog)
    assert all(j["fuzz"] is None and j["intruder"] is None for j in judged)
    assert all(j["detection"] is not None for j in judged if j["status"] == "ok")


# -- summarize --------------------------------------------------------------------------------


def test_summarize_spreads_every_score_present(scored: Scored, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(scored.run, run)
    result = labeler("summarize", run, "--json")
    assert result.returncode == 0, result.stderr
    [heuristic] = [j for j in json.loads(result.stdout)["judges"] if j["rater"] == "heuristic"]
    dist = heuristic["detection_distribution"]
    metrics = dist["by_metric"]
    for name in ("detection.f1", "detection.balanced_accuracy", "fuzz.f1",
                 "fuzz.balanced_accuracy", "intruder.accuracy", "intruder.p_value"):  # fmt: skip
        assert name in metrics, sorted(metrics)
    assert "detection.auroc" not in metrics  # the heuristic gives no probabilities
    # detection's own place is unchanged, and the same numbers as its flat name's
    for group in ("by_category", "by_layer"):
        assert {k: v["f1"] for k, v in dist[group].items()} == metrics["detection.f1"][group]
    # every feature's value counted once per grouping
    scored_f1 = [j.fuzz.f1 for j in scored.judgments.values() if j.fuzz and j.fuzz.f1 is not None]
    assert sum(s["n"] for s in metrics["fuzz.f1"]["by_layer"].values()) == len(scored_f1)
    by_category = metrics["intruder.accuracy"]["by_category"]
    for cell in by_category.values():
        assert cell["n"] == 0 or cell["q1"] <= cell["median"] <= cell["q3"]
    # planted meanings are coherent, random directions are not
    assert (
        min(by_category[c]["median"] for c in ("reasoning", "domain", "language"))
        > (by_category["uninterpretable"]["median"])
    )

    text = labeler("summarize", run)
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("fuzzing F1 and intruder"))
    end = next(i for i in range(start, len(lines)) if lines[i].startswith("└"))
    table = lines[start : end + 1]
    assert max(len(line.rstrip()) for line in table) <= 80, "\n".join(table)
    assert sum("layer " in line for line in table) == len(dist["by_layer"])


# -- browse -----------------------------------------------------------------------------------

SORTED = ("detection_f1", "fuzz_f1", "intruder_accuracy")
PATHS = {"detection_f1": ("detection", "f1"), "fuzz_f1": ("fuzz", "f1"),
         "intruder_accuracy": ("intruder", "accuracy")}  # fmt: skip


@dataclass(frozen=True)
class Browsed:
    url: str
    scored: Scored

    def every(self, **params: object) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        page = 1
        while True:
            status, _, body = http(
                f"{self.url}api/catalog?{urlencode({**params, 'per_page': 500, 'page': page})}"
            )
            assert status == 200, body
            data = json.loads(body)
            rows += data["features"]
            if len(rows) >= data["total"] or not data["features"]:
                assert len(rows) == data["total"]
                return rows
            page += 1

    def value(self, fid: str, column: str) -> float | None:
        scorer, metric = PATHS[column]
        score = _shown(self.scored.catalog[fid], scorer)
        return None if score is None else score[metric]

    def expected(
        self, column: str, low: float | None = None, descending: bool = False
    ) -> list[str]:
        """The catalog's features with a value of ``column`` at least ``low``, in the order
        the browser sorts them: by the value, then layer and index (all in the direction
        asked), nulls last."""
        lines = self.scored.catalog
        keep = [f for f in lines if low is None or (self.value(f, column) or -1.0) >= low]
        sign = -1 if descending else 1

        def key(f: str) -> tuple[bool, float, int, int]:
            v = self.value(f, column)
            line = lines[f]
            return (v is None, sign * (v or 0.0), sign * line["layer"], sign * line["index"])

        return sorted(keep, key=key)


@pytest.fixture(scope="module")
def browsed(scored: Scored, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Browsed]:
    folder = tmp_path_factory.mktemp("scores-browse")
    run = folder / "run"
    shutil.copytree(scored.run, run)
    process, url = _start(run, "--port", "0", "--reviewer", "ada", stderr=folder / "server.log",
                          command="browse")  # fmt: skip
    try:
        yield Browsed(url, scored)
    finally:
        _stop(process)


def test_browse_filters_and_sorts_by_every_scorer(browsed: Browsed) -> None:
    rows = {r["feature_id"]: r for r in browsed.every()}
    assert len(rows) == len(browsed.scored.catalog)
    for fid, row in rows.items():
        for column in SORTED:
            assert row[column] == browsed.value(fid, column), (fid, column)
        intruder = _shown(browsed.scored.catalog[fid], "intruder")
        assert intruder is not None
        assert (row["intruder_chance"], row["intruder_p_value"]) == (
            intruder["chance"], intruder["p_value"],
        )  # fmt: skip
    for column in SORTED:
        for descending in (False, True):
            order = "desc" if descending else "asc"
            got = [r["feature_id"] for r in browsed.every(sort=column, order=order)]
            assert got == browsed.expected(column, descending=descending), (column, order)
        values = sorted({v for f in rows if (v := browsed.value(f, column)) is not None})
        low, high = values[len(values) // 3], values[2 * len(values) // 3]
        kept = browsed.every(**{f"{column}_min": low, f"{column}_max": high, "sort": column})
        assert [r["feature_id"] for r in kept] == [
            f for f in browsed.expected(column, low) if (browsed.value(f, column) or 0) <= high
        ]
        assert 0 < len(kept) < len(rows)
    # fuzz F1 tells the planted features from the random ones
    best = browsed.every(sort="fuzz_f1", order="desc", fuzz_f1_min=0.95)
    truth = browsed.scored.truth
    planted = [r for r in best if truth[r["feature_id"]]["category"] != "uninterpretable"]
    assert len(best) > 100 and len(planted) > 0.8 * len(best)
    status, _, body = http(f"{browsed.url}api/catalog?fuzz_f1_min=2")
    assert status == 400 and json.loads(body)["field"] == "fuzz_f1_min"


def test_the_browser_filters_sorts_and_shows_every_scorer(browsed: Browsed, tab: Tab) -> None:
    page = tab.page
    tab.open(browsed.url)
    page.fill("#fuzz_f1_min", "0.5")
    page.dispatch_event("#fuzz_f1_min", "change")
    page.wait_for_selector('#catalog[data-loaded="fuzz_f1_min=0.5"]')
    page.click('th button[data-sort="fuzz_f1"]')
    page.wait_for_selector('#catalog[data-loaded="fuzz_f1_min=0.5&sort=fuzz_f1"]')
    page.click('th button[data-sort="fuzz_f1"]')
    page.wait_for_selector('#catalog[data-loaded="fuzz_f1_min=0.5&sort=fuzz_f1&order=desc"]')
    expected = browsed.expected("fuzz_f1", 0.5, descending=True)
    shown: list[str] = page.eval_on_selector_all(
        "#catalog tbody tr", "rows => rows.map(r => r.dataset.featureId)"
    )
    assert shown == expected[:50]
    first = expected[0]
    cells = page.locator(f'tr[data-feature-id="{first}"]')
    assert cells.locator("td.fuzz-f1").text_content() == f"{browsed.value(first, 'fuzz_f1'):.2f}"
    assert cells.locator("td.detection-f1").text_content() == (
        f"{browsed.value(first, 'detection_f1'):.2f}"
    )
    intruder = _shown(browsed.scored.catalog[first], "intruder")
    assert intruder is not None
    assert cells.locator("td.intruder").text_content() == (
        f"{intruder['accuracy']:.2f} / {intruder['chance']:.2f}"
    )
    page.click('th button[data-sort="intruder_accuracy"]')
    page.wait_for_selector('#catalog[data-loaded="fuzz_f1_min=0.5&sort=intruder_accuracy"]')
    shown = page.eval_on_selector_all(
        "#catalog tbody tr", "rows => rows.map(r => r.dataset.featureId)"
    )
    in_range = set(expected)
    assert shown == [f for f in browsed.expected("intruder_accuracy") if f in in_range][:50]

    # the feature's page shows every scorer's metrics for its judge
    page.click(f'tr[data-feature-id="{shown[0]}"] a')
    page.wait_for_selector(f'#feature-panel[data-loaded="{shown[0]}"]')
    page.keyboard.press("j")
    card = page.locator("#judges article.judge")
    assert card.count() == 1
    line = browsed.scored.catalog[shown[0]]
    fuzz, detection = _shown(line, "fuzz"), _shown(line, "detection")
    intruder = _shown(line, "intruder")
    assert fuzz is not None and detection is not None and intruder is not None
    assert f"F1 {fuzz['f1']:.2f}" in (card.locator(".score-fuzz").text_content() or "")
    assert f"F1 {detection['f1']:.2f}" in (card.locator(".score-scores").text_content() or "")
    text = card.locator(".score-intruder").text_content() or ""
    low, high = intruder["interval"]
    assert f"accuracy {intruder['accuracy']:.2f} [95% {low:.2f}–{high:.2f}]" in text
    assert f"vs chance {intruder['chance']:.2f}" in text and "p = " in text
    assert f"{intruder['n_correct']}/{intruder['n_trials']} trials" in text
    assert tab.errors == []


def test_an_index_without_the_scores_is_rebuilt(scored: Scored, tmp_path: Path) -> None:
    """An index of version 3 (no scorer columns) is rebuilt when opened."""
    run = tmp_path / "run"
    shutil.copytree(scored.run, run)
    store = LabelStore(run / "labels.sqlite")
    builds: list[str] = []
    try:
        open_index(RunData.open(run), store, DisputeRules()).close()
        with closing(sqlite3.connect(run / INDEX_FILE)) as conn, conn:
            conn.execute("UPDATE meta SET value = '3' WHERE key = 'version'")
            conn.execute("DROP INDEX features_fuzz_f1")
            conn.execute("ALTER TABLE features DROP COLUMN fuzz_f1")
        index = open_index(RunData.open(run), store, DisputeRules(), on_build=builds.append)
        try:
            assert builds == ["stale"]
            with closing(sqlite3.connect(run / INDEX_FILE)) as conn:
                n = conn.execute("SELECT count(fuzz_f1) FROM features").fetchone()[0]
            assert n == len(scored.judgments)
        finally:
            index.close()
    finally:
        store.close()
