"""The catalog browser: the real `labeler browse RUN --port 0` command, checked against the
exported catalog and the demo's planted features over HTTP, and driven by a real headless
Chromium. Markup planted into an explanation must show as text and never run."""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

import pytest

from labeler.labeling.store import LabelStore
from labeler.reporting.disputes import DisputeRules
from labeler.review.catalog_index import (
    INDEX_FILE,
    MAX_PER_PAGE,
    SHOWN,
    CatalogIndex,
    CatalogQuery,
    build_index,
    open_index,
    query_words,
)
from labeler.review.queue import record_decision
from labeler.run.data import RunData
from tests.conftest import CollectedDemo, Tab
from tests.test_bad_input import labeler
from tests.test_first_hour import _labeler_on_small_disk, one_line_error
from tests.test_review_web import _start, _stop, http

if TYPE_CHECKING:
    from playwright.sync_api import Page

XSS = '<img src=x onerror="window.__pwned=1"> fires on <b>bold</b>'
LABEL_FIELDS = ("category", "subcategory", "mechanism", "domain_type")


@dataclass(frozen=True)
class Browsed:
    url: str
    run: Path
    catalog: dict[str, dict[str, Any]]  # the exported catalog's lines, by feature id
    truth: list[dict[str, Any]]  # the demo's planted features
    planted: str  # the feature whose explanation carries markup

    def api(self, **params: object) -> dict[str, Any]:
        status, _, body = http(f"{self.url}api/catalog?{urlencode(params)}")
        assert status == 200, body
        data: dict[str, Any] = json.loads(body)
        return data

    def every(self, **params: object) -> list[dict[str, Any]]:
        """Every matching feature, page by page, in the order asked for."""
        rows: list[dict[str, Any]] = []
        page = 1
        while True:
            data = self.api(**params, per_page=500, page=page)
            rows += data["features"]
            if len(rows) >= data["total"] or not data["features"]:
                assert len(rows) == data["total"]
                return rows
            page += 1

    def ids(self, **params: object) -> set[str]:
        return {row["feature_id"] for row in self.every(**params)}


@pytest.fixture(scope="module")
def browsed(labeled: CollectedDemo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Browsed]:
    """A copy of the labeled demo with markup in one feature's explanation, its catalog
    exported, served by `labeler browse` with a reviewer."""
    folder = tmp_path_factory.mktemp("browse")
    run = folder / "run"
    shutil.copytree(labeled.run, run)
    with sqlite3.connect(run / "labels.sqlite") as conn:
        planted = conn.execute(
            "SELECT feature_id FROM judgments WHERE status = 'ok' ORDER BY feature_id LIMIT 1"
        ).fetchone()[0]
        conn.execute(
            "UPDATE judgments SET payload = json_set(payload, '$.explanation', ?)"
            " WHERE feature_id = ?",
            (XSS, planted),
        )
    exported = labeler("export", run, "--out", folder / "catalog.jsonl")
    assert exported.returncode == 0, exported.stderr
    catalog = {}
    for text in (folder / "catalog.jsonl").read_text(encoding="utf-8").splitlines():
        line = json.loads(text)
        catalog[line["feature_id"]] = line
    truth = json.loads(labeled.paths.ground_truth.read_text())
    process, url = _start(run, "--port", "0", "--reviewer", "ada", stderr=folder / "server.log",
                          command="browse")  # fmt: skip
    try:
        yield Browsed(url, run, catalog, truth, planted)
    finally:
        _stop(process)


def test_every_feature_once_with_its_final_label(browsed: Browsed) -> None:
    rows = browsed.every()
    assert [r["feature_id"] for r in rows] == sorted(
        browsed.catalog, key=lambda f: (browsed.catalog[f]["layer"], browsed.catalog[f]["index"])
    )
    for row in rows:
        line = browsed.catalog[row["feature_id"]]
        assert {k: row[k] for k in LABEL_FIELDS} == line["final_label"], row["feature_id"]
        assert row["label_source"] == line["label_source"]
        assert bool(row["disputed"]) == line["disputed"]
        assert row["frequency"] == line["activation_freq"]
        ok = [j for j in line["judgments"] if j["status"] == "ok"]
        if ok:
            shown = next(j for j in ok if j["judge"] == row["judge"])
            assert row["explanation"] == shown["explanation"]
            assert row["detection"] == (shown["detection"] or {}).get("accuracy")
    # ground truth: the planted hesitation features are what the filter finds
    planted = {t["feature_id"] for t in browsed.truth if t.get("subcategory") == "hesitation"}
    found = browsed.ids(category="reasoning", subcategory="hesitation")
    assert len(planted) >= 10
    assert len(found & planted) >= 0.9 * len(planted)
    assert len(found - planted) <= 0.1 * len(found)


def test_filters_and_sorting_agree_with_the_catalog(browsed: Browsed) -> None:
    lines = list(browsed.catalog.values())

    def where(**want: Any) -> set[str]:
        def keeps(line: dict[str, Any]) -> bool:
            label = line["final_label"]
            return all((label[k] if k in LABEL_FIELDS else line[k]) == v for k, v in want.items())

        return {line["feature_id"] for line in lines if keeps(line)}

    assert browsed.ids(category="domain", domain_type="math") == where(
        category="domain", domain_type="math"
    )
    assert browsed.ids(layer=1, disputed=1) == where(layer=1, disputed=True)
    assert browsed.ids(label_source="consensus") == where(label_source="consensus")
    assert browsed.ids(category="(none)") == where(category=None)
    frequencies = sorted(line["activation_freq"] for line in lines)
    cut = frequencies[len(frequencies) // 2]
    rows = browsed.every(frequency_min=cut, sort="detection", order="desc")
    assert {r["feature_id"] for r in rows} == {
        line["feature_id"] for line in lines if line["activation_freq"] >= cut
    }
    scores = [r["detection"] for r in rows]
    known = [s for s in scores if s is not None]
    assert known == sorted(known, reverse=True) and len(known) > 10
    assert scores[: len(known)] == known  # no score last
    everything = browsed.every()  # each row's detection is checked against the catalog above
    low = {r["feature_id"] for r in everything if (r["detection"] or 1.0) <= 0.6}
    assert low and browsed.ids(detection_max=0.6) == low


def test_search_by_word_stem_and_prefix(browsed: Browsed) -> None:
    def text(feature_id: str) -> str:
        return _searched_text(browsed.catalog[feature_id])

    cued = {f for f in browsed.catalog if "reasoning" in text(f)}
    assert len(cued) >= 20
    assert browsed.ids(q="reasoning") == cued
    assert browsed.ids(q="reasons") == cued  # by the stem
    assert browsed.ids(q="reas") >= cued  # the last word is a prefix, as one types
    both = browsed.ids(q="reasoning wait")
    assert both == {f for f in cued if "wait" in text(f)} and both
    within = browsed.ids(q="reasoning", layer=2, category="reasoning")
    assert within == {
        f for f in cued
        if browsed.catalog[f]["layer"] == 2
        and browsed.catalog[f]["final_label"]["category"] == "reasoning"
    }  # fmt: skip
    # what a user types is words, never query syntax
    for typed in ('"', "NEAR(", "a OR", "*", "-", "hesitation)", "^x", "col:x", "x_", "_"):
        status, _, body = http(f"{browsed.url}api/catalog?{urlencode({'q': typed})}")
        assert status == 200, (typed, body)
    assert query_words('he said "stop" OR self_correction') == [
        "he", "said", "stop", "OR", "self", "correction",
    ]  # fmt: skip
    assert query_words(" ,; _ ") == []


def _labeled_as(browsed: Browsed, subcategory: str) -> set[str]:
    """The features whose final label (the exported catalog's) has this subcategory."""
    return {
        f for f, line in browsed.catalog.items()
        if line["final_label"]["subcategory"] == subcategory
    }  # fmt: skip


def _searched_text(line: dict[str, Any]) -> str:
    """What search reads of a catalog line: every judge's explanation, rationale and
    label, and the final label (underscores as spaces, as a tokenizer splits them)."""
    parts = [str(v) for v in line["final_label"].values() if v]
    for judgment in line["judgments"]:
        if judgment["status"] == "ok":
            parts += [judgment["explanation"] or "", judgment["rationale"] or ""]
            parts += [str(judgment[k]) for k in LABEL_FIELDS if judgment.get(k)]
    return " ".join(parts).lower().replace("_", " ")


def test_search_matches_the_labels(browsed: Browsed) -> None:
    """A subcategory's name finds every feature with that final label, and what it
    finds says the word (in a label or a text); a prefix of it, as typed, does too."""
    for word, typed, stem in (
        ("planning", "plann", "plan"),
        ("verification", "verifica", "verif"),
        ("self_correction", "correcti", "correct"),
        ("hesitation", "hesitatio", "hesit"),
    ):
        labeled = _labeled_as(browsed, word)
        assert len(labeled) >= 8, word
        for query in (word, typed):
            found = browsed.ids(q=query)
            assert found >= labeled, (query, sorted(labeled - found))
            assert all(stem in _searched_text(browsed.catalog[f]) for f in found), query
    # a label's name and a word of the text, both required
    both = browsed.ids(q="planning thinking")
    assert both and both == {
        f for f in browsed.ids(q="planning") if "think" in _searched_text(browsed.catalog[f])
    }  # fmt: skip
    assert browsed.ids(q="domain math") >= {
        f for f, line in browsed.catalog.items() if line["final_label"]["domain_type"] == "math"
    }  # fmt: skip


def test_search_follows_typing_in_the_browser(browsed: Browsed, tab: Tab) -> None:
    """Every prefix of "hesitation" from four letters up, typed into the page, keeps the
    planted hesitation features among the results."""
    planted = {t["feature_id"] for t in browsed.truth if t.get("subcategory") == "hesitation"}
    labeled = _labeled_as(browsed, "hesitation")
    assert len(planted) >= 10 and len(labeled & planted) >= 0.9 * len(planted)
    page = tab.page
    tab.open(browsed.url)
    word = "hesitation"
    for end in range(4, len(word) + 1):
        typed = word[:end]
        page.fill("#q", typed)
        page.wait_for_selector(f'#catalog[data-loaded="q={typed}"]')
        found = browsed.ids(q=typed)
        assert found >= labeled and len(found & planted) >= 0.9 * len(planted), typed
        assert (page.text_content("#status") or "").startswith(f"{len(found):,} features")
        assert shown_rows(page) == sorted(found, key=_order(browsed))[:50]
    for typed in ("plann", "verifica", "correcti"):
        page.fill("#q", typed)
        page.wait_for_selector(f'#catalog[data-loaded="q={typed}"]')
        assert page.locator("#catalog tbody tr").count() > 0, typed
    assert tab.errors == []


def test_bad_queries_and_other_hosts_get_one_clear_answer(browsed: Browsed) -> None:
    for params, field in (
        ({"detection_min": "high"}, "detection_min"),
        ({"frequency_max": "2"}, "frequency_max"),
        ({"sort": "colour"}, "sort"),
        ({"page": "0"}, "page"),
        ({"layer": "1.5"}, "layer"),
        ({"colour": "red"}, "colour"),
    ):
        status, _, body = http(f"{browsed.url}api/catalog?{urlencode(params)}")
        assert status == 400, (params, body)
        answer = json.loads(body)
        assert answer["field"] == field and answer["error"].startswith(f"{field}: ")
    status, headers, _ = http(f"{browsed.url}api/catalog", headers={"Host": "evil.example:80"})
    assert status == 403
    status, headers, page = http(browsed.url)
    assert (
        status == 200 and "require-trusted-types-for 'script'" in headers["Content-Security-Policy"]
    )
    assert b"Feature catalog" in page


def test_search_filter_sort_open_and_decide_in_the_browser(browsed: Browsed, tab: Tab) -> None:
    page = tab.page
    tab.open(browsed.url)
    total = len(browsed.catalog)
    assert (page.text_content("#status") or "").startswith(f"{total:,} features")
    assert page.locator("#catalog tbody tr").count() == 50
    # markup in an explanation is text
    planted_row = page.locator(f'tr[data-feature-id="{browsed.planted}"] td.explanation')
    assert planted_row.text_content() == XSS
    assert tab.pwned() == "undefined"

    page.fill("#q", "reasoning")
    page.wait_for_selector('#catalog[data-loaded="q=reasoning"]')
    found = browsed.ids(q="reasoning")
    assert len(found) > 50
    shown = shown_rows(page)
    assert set(shown) == set(sorted(found, key=_order(browsed))[:50])

    page.select_option("#category", "reasoning")
    page.wait_for_selector('#catalog[data-loaded="q=reasoning&category=reasoning"]')
    page.click('th button[data-sort="detection"]')
    page.wait_for_selector('#catalog[data-loaded$="sort=detection"]')
    page.click('th button[data-sort="detection"]')
    page.wait_for_selector('#catalog[data-loaded$="sort=detection&order=desc"]')
    rows = browsed.every(q="reasoning", category="reasoning", sort="detection", order="desc")
    shown = shown_rows(page)
    assert shown == [r["feature_id"] for r in rows][:50]
    # the URL keeps the view: a reload shows the same rows
    page.reload()
    page.wait_for_selector("body[data-ready=true]")
    assert page.input_value("#q") == "reasoning" and page.input_value("#category") == "reasoning"
    again = shown_rows(page)
    assert again == shown

    # open a feature: its review page, linked back to the catalog; decide it
    target = shown[0]
    page.click(f'tr[data-feature-id="{target}"] a')
    page.wait_for_selector(f'#feature-panel[data-loaded="{target}"]')
    assert page.url == f"{browsed.url}feature/{target}"
    assert page.is_visible("#catalog-link")
    assert page.locator("#example-list .example").count() > 0
    assert page.locator("#example-list .tok.hl").count() > 0  # heat-highlighted examples
    page.keyboard.press("l")
    page.keyboard.press("Enter")
    page.wait_for_function(
        "() => !document.querySelector('#toast').hidden"
    )  # the save was answered
    page.click("#catalog-link")
    page.wait_for_selector("body[data-ready=true]")
    row = browsed.every(q="reasoning", layer=browsed.catalog[target]["layer"])
    decided = next(r for r in row if r["feature_id"] == target)
    assert decided["category"] == "language" and decided["label_source"] == "human"
    assert decided["reviews"] == 1
    page.fill("#q", "")
    page.select_option("#label_source", "human")
    page.wait_for_selector('#catalog[data-loaded="label_source=human"]')
    assert shown_rows(page) == [target]
    assert tab.errors == [] and tab.pwned() == "undefined"


def shown_rows(page: Page) -> list[str]:
    """The feature ids of the catalog table's rows, top to bottom."""
    ids: list[str] = page.eval_on_selector_all(
        "#catalog tbody tr", "rows => rows.map(r => r.dataset.featureId)"
    )
    return ids


def _order(browsed: Browsed) -> Any:
    return lambda f: (browsed.catalog[f]["layer"], browsed.catalog[f]["index"])


def test_the_index_is_kept_until_the_labels_change(labeled_copy: Path) -> None:
    run = RunData.open(labeled_copy)
    store = LabelStore(labeled_copy / "labels.sqlite")
    builds: list[str] = []
    try:
        rules = DisputeRules()
        open_index(run, store, rules, on_build=builds.append).close()
        open_index(run, store, rules, on_build=builds.append).close()
        assert builds == ["missing"]
        feature = store.conn.execute("SELECT feature_id FROM planned LIMIT 1").fetchone()[0]
        record_decision(store, {"feature_id": feature, "reviewer": "bo", "action": "decide",
                                "category": "domain", "domain_type": "code"})  # fmt: skip
        index = open_index(run, store, rules, on_build=builds.append)
        assert index.conn is not None
        row = index.conn.execute(
            "SELECT category, label_source FROM features WHERE feature_id = ?", (feature,)
        ).fetchone()
        index.close()
        # a decision is caught up with, not rebuilt for
        assert builds == ["missing"] and row == ("domain", "human")
        open_index(run, store, DisputeRules(min_detection=0.99), on_build=builds.append).close()
        assert builds[-1] == "stale"  # other dispute rules: other disputes
        (labeled_copy / INDEX_FILE).write_bytes(b"not a database")
        open_index(run, store, rules, on_build=builds.append).close()
        assert builds[-1] == "stale" and len(builds) == 3
    finally:
        store.close()


def test_a_refreshed_row_is_the_row_a_build_writes(labeled_copy: Path) -> None:
    """Decisions on every kind of feature, then each feature's row recomputed on its own
    equals the row of a full build."""
    run = RunData.open(labeled_copy)
    store = LabelStore(labeled_copy / "labels.sqlite")
    rules = DisputeRules()
    index = open_index(run, store, rules)
    try:
        planned = [r[0] for r in store.conn.execute("SELECT feature_id FROM planned")]
        for i, feature in enumerate(planned[::7]):
            category = ("language", "uninterpretable")[i % 2]
            record_decision(store, {"feature_id": feature, "reviewer": f"r{i % 3}",
                                    "category": category})  # fmt: skip
        assert index.conn is not None
        index.refresh(planned)
        refreshed = index.conn.execute(f"SELECT {', '.join(SHOWN)} FROM features").fetchall()
    finally:
        index.close()
    build_index(run, store, rules, labeled_copy / "rebuilt.sqlite")
    store.close()
    with closing(sqlite3.connect(labeled_copy / "rebuilt.sqlite")) as conn:
        built = conn.execute(f"SELECT {', '.join(SHOWN)} FROM features").fetchall()
    assert sorted(refreshed) == sorted(built)
    assert sum(1 for row in built if row[SHOWN.index("label_source")] == "human") > 100


def _searched(index: CatalogIndex, text: str) -> set[str]:
    """Every feature a search finds, page by page."""
    found: set[str] = set()
    page = 1
    while True:
        answer = index.query(CatalogQuery(text=text, per_page=MAX_PER_PAGE, page=page))
        found |= {row["feature_id"] for row in answer["features"]}
        if len(found) >= answer["total"] or not answer["features"]:
            assert len(found) == answer["total"]
            return found
        page += 1


def test_searches_follow_decisions_as_a_fresh_build_answers_them(labeled_copy: Path) -> None:
    """A decision's label is found by its words at once and its former label's are not;
    after decisions on many features (some decided twice) every search answers what a
    fresh build of the index answers, and the index passes its integrity checks."""
    run = RunData.open(labeled_copy)
    store = LabelStore(labeled_copy / "labels.sqlite")
    rules = DisputeRules()
    queries = ("planning", "plann", "code", "cod", "language", "uninterpretable",
               "domain math", "hesitation", "self correction", "verifica", "reasoning")  # fmt: skip
    index = open_index(run, store, rules)
    try:
        assert index.conn is not None
        language = [r[0] for r in index.conn.execute(
            "SELECT feature_id FROM features WHERE category = 'language' ORDER BY id")]  # fmt: skip
        feature = next(f for f in language if f not in _searched(index, "code"))
        record_decision(store, {"feature_id": feature, "reviewer": "bo", "category": "domain",
                                "domain_type": "code"})  # fmt: skip
        assert feature in _searched(index, "code") and feature in _searched(index, "cod")
        record_decision(store, {"feature_id": feature, "reviewer": "bo", "category": "reasoning",
                                "subcategory": "planning", "mechanism": "output"})  # fmt: skip
        assert feature not in _searched(index, "code")
        assert feature in _searched(index, "plann") and feature in _searched(index, "outp")
        planned = [r[0] for r in store.conn.execute("SELECT feature_id FROM planned")]
        for i, other in enumerate(planned[::5]):
            decision = ({"category": "domain", "domain_type": "code"},
                        {"category": "reasoning", "subcategory": "planning"},
                        {"category": "uninterpretable"})[i % 3]  # fmt: skip
            record_decision(store, {"feature_id": other, "reviewer": f"r{i % 2}", **decision})
            if i % 4 == 0:  # decided again: a label replaced twice
                record_decision(store, {"feature_id": other, "reviewer": "cy",
                                        "category": "language"})  # fmt: skip
        refreshed = {q: _searched(index, q) for q in queries}
        for table in ("search", "words"):
            index.conn.execute(f"INSERT INTO {table} ({table}) VALUES ('integrity-check')")
    finally:
        index.close()
    (labeled_copy / INDEX_FILE).unlink()
    fresh = open_index(run, store, rules)
    try:
        assert {q: _searched(fresh, q) for q in queries} == refreshed
        assert refreshed["code"] and refreshed["planning"] and refreshed["language"]
    finally:
        fresh.close()
        store.close()


def test_an_index_of_the_older_schema_is_rebuilt(labeled_copy: Path) -> None:
    """An index written by the schema before labels were searched (version 2: one text
    table, no words of labels) is rebuilt on start, and then finds labels by prefix."""
    run = RunData.open(labeled_copy)
    store = LabelStore(labeled_copy / "labels.sqlite")
    rules = DisputeRules()
    path = labeled_copy / INDEX_FILE
    builds: list[str] = []
    try:
        open_index(run, store, rules).close()
        with closing(sqlite3.connect(path)) as conn, conn:
            conn.execute("UPDATE meta SET value = '2' WHERE key = 'version'")
            conn.execute("DROP TABLE words")
        index = open_index(run, store, rules, on_build=builds.append)
        try:
            assert builds == ["stale"]
            assert _searched(index, "plann")
        finally:
            index.close()
    finally:
        store.close()


def _served_copy(run: Path, *args: str) -> tuple[subprocess.Popen[str], Browsed]:
    process, url = _start(run, "--port", "0", *args, stderr=run.parent / "server.log",
                          command="browse")  # fmt: skip
    return process, Browsed(url, run, {}, [], "")


def _post(url: str, feature_id: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    status, _, raw = http(f"{url}api/feature/{feature_id}/decision", "POST", body)
    answer: dict[str, Any] = json.loads(raw)
    return status, answer


def _stored(run: Path) -> list[tuple[str, str, str | None]]:
    store = LabelStore(run / "labels.sqlite")
    try:
        return [(r.feature_id, r.reviewer, r.category) for r in store.reviews()]
    finally:
        store.close()


def _features_by_layer(run: Path) -> dict[int, list[str]]:
    with closing(sqlite3.connect(run / "labels.sqlite")) as conn:
        rows = conn.execute("SELECT feature_id, layer FROM planned ORDER BY layer, idx")
        out: dict[int, list[str]] = {}
        for feature, layer in rows:
            out.setdefault(int(layer), []).append(str(feature))
    return out


def test_a_decision_is_stored_once_whatever_happens_to_the_index(labeled_copy: Path) -> None:
    """The index file replaced (as another `browse --rebuild` does) or deleted under a
    running server: a decision is stored once, answered as stored, and the catalog
    shows it; the page's retry of a decision (same key) stores nothing more."""
    layers = _features_by_layer(labeled_copy)
    first, second, third = layers[0][0], layers[1][0], layers[2][0]
    process, browsed = _served_copy(labeled_copy)
    try:
        index = labeled_copy / INDEX_FILE
        copy = labeled_copy / "copy.sqlite"
        shutil.copyfile(index, copy)
        copy.replace(index)
        status, answer = _post(browsed.url, first, {"category": "language", "reviewer": "ada"})
        assert status == 201, answer
        assert _stored(labeled_copy) == [(first, "ada", "language")]
        index.unlink()
        status, answer = _post(browsed.url, second, {"category": "uninterpretable",
                                                     "reviewer": "bo"})  # fmt: skip
        assert status == 201, answer
        retried = {"category": "domain", "domain_type": "code", "reviewer": "cy",
                   "decision_key": "a1b2"}  # fmt: skip
        assert _post(browsed.url, third, retried)[0] == 201
        status, answer = _post(browsed.url, third, retried)  # the answer was lost: sent again
        assert status == 200 and answer["decision"]["category"] == "domain"
        assert len(_stored(labeled_copy)) == 3
        human = {r["feature_id"]: r["category"] for r in browsed.every(label_source="human")}
        assert human == {first: "language", second: "uninterpretable", third: "domain"}
        assert index.exists()
    finally:
        _stop(process)
    # the server stopped after storing it: the page's retry reaches a new server
    process, browsed = _served_copy(labeled_copy)
    try:
        status, answer = _post(browsed.url, third, retried)
        assert status == 200 and answer["decision"]["reviewer"] == "cy", answer
        assert len(_stored(labeled_copy)) == 3
    finally:
        _stop(process)


def test_decisions_by_any_writer_show_in_the_catalog(labeled_copy: Path) -> None:
    """`labeler decide` (another process, any layer) while browse runs and while it is
    stopped, and a decision in browse itself: the catalog shows all, after a restart
    too."""
    layers = _features_by_layer(labeled_copy)
    by_decide = [layers[0][1], layers[2][3]]
    in_browse, while_stopped = layers[1][2], layers[3][4]

    def decide(feature: str) -> None:
        done = labeler("decide", labeled_copy, feature, "--reviewer", "cy", "--category",
                       "language")  # fmt: skip
        assert done.returncode == 0, done.stderr

    process, browsed = _served_copy(labeled_copy)
    try:
        for feature in by_decide:
            decide(feature)
        assert _post(browsed.url, in_browse, {"category": "language", "reviewer": "ada"})[0] == 201
        assert browsed.ids(label_source="human") == {*by_decide, in_browse}
    finally:
        _stop(process)
    decide(while_stopped)
    process, browsed = _served_copy(labeled_copy)
    try:
        assert browsed.ids(label_source="human") == {*by_decide, in_browse, while_stopped}
        assert browsed.ids(category="language") >= {*by_decide, in_browse, while_stopped}
    finally:
        _stop(process)


def test_an_index_with_damaged_pages_is_rebuilt(labeled_copy: Path) -> None:
    process, browsed = _served_copy(labeled_copy)
    expected = browsed.every()
    _stop(process)
    index = labeled_copy / INDEX_FILE
    data = bytearray(index.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 16384] = b"\xa5" * 16384
    index.write_bytes(bytes(data))
    with closing(sqlite3.connect(index)) as conn:  # the meta row still reads
        assert conn.execute("SELECT count(*) FROM meta").fetchone()[0] > 0
    process, browsed = _served_copy(labeled_copy)
    try:
        assert browsed.every() == expected
        assert browsed.ids(q="reasoning")
    finally:
        _stop(process)


def test_fifty_clients_deciding_at_once_are_all_stored(labeled_copy: Path) -> None:
    features = [f for layer in _features_by_layer(labeled_copy).values() for f in layer][:50]
    process, browsed = _served_copy(labeled_copy)
    try:
        start = threading.Barrier(len(features))

        def send(feature: str) -> int:
            start.wait()
            try:
                return _post(browsed.url, feature, {"category": "language", "reviewer": "ada"})[0]
            except OSError:  # a connection reset or refused
                return -1

        with ThreadPoolExecutor(len(features)) as pool:
            statuses = list(pool.map(send, features))
        searched = browsed.every(label_source="human")
    finally:
        _stop(process)
    assert statuses == [201] * len(features)
    assert sorted(f for f, _, _ in _stored(labeled_copy)) == sorted(features)
    assert {r["feature_id"] for r in searched} == set(features)


SPECIAL_TOKENS = ["<｜Assistant｜>", "｜", "<｜", "▁the", XSS]


def test_special_tokens_read_in_the_output_score_chips(labeled_copy: Path, tab: Tab) -> None:
    """DeepSeek's markers (U+FF5C, which Chromium without CJK fonts draws as empty
    boxes) read as text in the output score's chips, the stored token on hover; markup
    stays text."""
    feature = _features_by_layer(labeled_copy)[1][0]
    score = {"feature_id": feature, "layer": 1, "size": 2.0, "tokens": ["wait"],
             "logprob_change": 0.5, "lens_change": 0.5, "mass_change": 0.1, "kl": 0.01,
             "null_high": 0.1, "p_value": 0.01, "significant": True,
             "promoted": SPECIAL_TOKENS, "settings": "test"}  # fmt: skip
    store = LabelStore(labeled_copy / "labels.sqlite")
    try:
        store.put_output_scores([(feature, 1, json.dumps(score), True)])
    finally:
        store.close()
    process, browsed = _served_copy(labeled_copy)
    try:
        page = tab.page
        tab.open(f"{browsed.url}feature/{feature}")
        page.wait_for_selector(f'#feature-panel[data-loaded="{feature}"]')
        chips = page.locator("#output-score .logit")
        shown = chips.evaluate_all("spans => spans.map(s => s.innerText)")
        titles = chips.evaluate_all("spans => spans.map(s => s.title)")
    finally:
        _stop(process)
    assert shown == ["‹Assistant›", "|", "<|", "▁the", XSS]
    assert not any("\uff5c" in text for text in shown)
    for raw, title in zip(SPECIAL_TOKENS[:3], titles[:3], strict=True):
        assert json.dumps(raw, ensure_ascii=False) in title
    assert tab.errors == [] and tab.pwned() == "undefined"


def test_a_full_disk_names_the_index(labeled_copy: Path) -> None:
    index = labeled_copy / INDEX_FILE
    line = one_line_error(
        _labeler_on_small_disk(64_000, "browse", labeled_copy, "--port", "0"),
        str(index), "free some disk space",
    )  # fmt: skip
    assert "labels.sqlite" not in line
    assert not index.exists()
    assert not [p for p in labeled_copy.iterdir() if ".partial" in p.name]


def test_browse_without_labels_is_one_line(run_copy: Path) -> None:
    one_line_error(labeler("browse", run_copy, "--port", "0"), "no labels yet", code=2)
    assert not (run_copy / INDEX_FILE).exists()


def test_browse_of_a_missing_run_is_one_line(tmp_path: Path) -> None:
    one_line_error(labeler("browse", tmp_path / "nowhere", "--port", "0"), "nowhere")
