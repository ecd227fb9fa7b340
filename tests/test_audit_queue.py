"""The audit in the review queue and the catalog: the features `labeler audit` drew come
first, in draw order, blind (the judges' answers hidden until asked: an audit measures
the judges), a skip warned about (it stops the audit's estimate there); the catalog
offers them first; a judgment's resampled confidence shows beside its category. Through
the real commands, servers and a real headless Chromium."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from labeler.audit.design import draw_audit
from labeler.audit.estimate import audit_prefixes
from labeler.labeling.store import LabelStore
from labeler.reporting.disputes import DisputeRules
from labeler.review.catalog_index import CatalogIndex, CatalogQuery, open_index
from labeler.review.queue import AUDIT, feature_view, record_decision, review_queue
from labeler.run.data import RunData
from labeler.run.schemas import Resampling
from tests.conftest import Tab
from tests.test_bad_input import LABELER, labeler
from tests.test_browse import shown_rows
from tests.test_review_web import _start, _stop

N = 5


def _draw(run: Path) -> tuple[list[str], list[str]]:
    """An audit of N features drawn on ``run``: the features in draw order, and the
    queue of disputes before it was drawn."""
    store = LabelStore(run / "labels.sqlite")
    try:
        before = [q.feature_id for q in review_queue(store, DisputeRules())]
        drawn = draw_audit(store, n=N, seed=0)
    finally:
        store.close()
    assert len(drawn.feature_ids) == N
    return drawn.feature_ids, before


def _explanation(run: Path, feature_id: str) -> str:
    store = LabelStore(run / "labels.sqlite")
    try:
        judgment = store.ok_judgment(feature_id, "heuristic")
    finally:
        store.close()
    assert judgment is not None and judgment.explanation
    return judgment.explanation


def test_the_audit_comes_first_in_draw_order_then_the_disputes(labeled_copy: Path) -> None:
    drawn, before = _draw(labeled_copy)
    run = RunData.open(labeled_copy)
    store = LabelStore(labeled_copy / "labels.sqlite")
    rules = DisputeRules()
    try:
        queue = review_queue(store, rules)
        ids = [q.feature_id for q in queue]
        assert ids[:N] == drawn
        assert [q.audit for q in queue[:N]] == [f"audit 1, {k} of {N}" for k in range(1, N + 1)]
        assert all(q.reasons[0] == AUDIT for q in queue[:N])
        assert all(q.audit is None and AUDIT not in q.reasons for q in queue[N:])
        # the disputes follow as before, each feature once (a disputed audited one in the audit)
        assert ids[N:] == [f for f in before if f not in drawn]
        assert len(set(ids)) == len(ids)
        disputed_drawn = [f for f in drawn if f in before]
        for item in queue[:N]:
            assert (len(item.reasons) > 1) == (item.feature_id in disputed_drawn)
            assert item.categories and item.categories[0].startswith("heuristic=")

        view = feature_view(run, store, drawn[0], rules)
        assert view.blind and view.audit is not None
        assert (view.audit.audit_id, view.audit.position, view.audit.n_drawn) == (1, 1, N)

        # a skip holds the audit back; a decision moves the queue and the audit on
        record_decision(store, {"feature_id": drawn[0], "reviewer": "ada", "action": "skip"})
        assert review_queue(store, rules)[0].feature_id == drawn[0]
        judged = store.ok_judgment(drawn[0], "heuristic")
        assert judged is not None
        category = judged.classification.category
        record_decision(store, {"feature_id": drawn[0], "reviewer": "ada", "category": category})
        after = review_queue(store, rules)
        assert [q.feature_id for q in after] == ids[1:]
        assert [p.features for p in audit_prefixes(store, {drawn[0]})] == [[drawn[0]]]
        assert not feature_view(run, store, drawn[0], rules).blind
        everything = review_queue(store, rules, include_decided=True)
        assert everything[0].feature_id == drawn[0] and everything[0].decided_by == ["ada"]
        assert [q.feature_id for q in everything][:N] == drawn
    finally:
        store.close()

    listing = labeler("disputes", labeled_copy, "--limit", "0")
    assert listing.returncode == 0, listing.stderr
    assert f"{N} audited features first" in " ".join(listing.stdout.split())
    assert "audit 1," in listing.stdout and "(hidden until" in listing.stdout
    listed = json.loads(labeler("disputes", labeled_copy, "--json").stdout)
    assert [q["feature_id"] for q in listed][:N] == drawn
    assert listed[1]["audit"] == f"audit 1, 2 of {N}"


def test_the_terminal_review_keeps_the_judges_hidden_and_warns_of_a_skip(
    labeled_copy: Path,
) -> None:
    drawn, _ = _draw(labeled_copy)
    explanation = _explanation(labeled_copy, drawn[0])
    result = subprocess.run(
        [*LABELER, "review", str(labeled_copy), "--reviewer", "bo"],
        input="s\nn\nj\nq\n", capture_output=True, text=True,
        timeout=120, check=False, env={**os.environ, "COLUMNS": "100"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    out = " ".join(result.stdout.split())
    shown_at = out.index(" ".join(explanation.split())[:40])
    assert "audit 1, 1 of 5" in out[:shown_at]
    assert "an audit measures the judges; decide before looking" in out[:shown_at]
    assert "stops audit 1's estimate at this feature until someone decides it" in out[:shown_at]
    assert "not skipped" in out


def test_the_review_page_hides_the_judges_of_an_audited_feature(
    labeled_copy: Path, tab: Tab
) -> None:
    drawn, _ = _draw(labeled_copy)
    explanation = _explanation(labeled_copy, drawn[0])
    process, url = _start(labeled_copy, "--port", "0", "--reviewer", "ada",
                          stderr=labeled_copy.parent / "server.log")  # fmt: skip
    try:
        page = tab.page
        tab.open(url)
        rows = page.eval_on_selector_all(
            "#queue tbody tr", "rs => rs.map(r => r.dataset.featureId)"
        )
        assert rows[:N] == drawn
        assert "audit 1, 1 of 5" in (page.text_content("#queue tbody tr") or "")
        page.check("#show-explanations")  # even asked for, an audited one's stays hidden
        assert explanation not in (page.text_content("#queue") or "")
        page.keyboard.press("Enter")
        page.wait_for_selector(f'#feature-panel[data-loaded="{drawn[0]}"]')
        notice = page.text_content("#audit-notice") or ""
        assert page.is_visible("#audit-notice") and "audit 1, position 1 of 5" in notice
        assert "an audit measures the judges; decide before looking" in notice
        assert not page.is_visible("#judges") and explanation not in page.inner_text("body")
        assert page.is_visible("#skip-warning")
        page.click("#toggle-judges")
        assert page.is_visible("#judges") and explanation in page.inner_text("#judges")
        page.keyboard.press("s")
        page.wait_for_function("() => !document.querySelector('#toast').hidden")
        toast = page.text_content("#toast") or ""
        assert "stops audit 1's estimate" in toast
        assert tab.errors == []
    finally:
        _stop(process)


def test_the_catalog_offers_the_audit_first(labeled_copy: Path, tab: Tab) -> None:
    run = RunData.open(labeled_copy)
    rules = DisputeRules()
    store = LabelStore(labeled_copy / "labels.sqlite")
    try:
        open_index(run, store, rules).close()  # built before the audit is drawn
    finally:
        store.close()
    drawn, _ = _draw(labeled_copy)
    process, url = _start(labeled_copy, "--port", "0", "--reviewer", "ada",
                          stderr=labeled_copy.parent / "server.log", command="browse")  # fmt: skip
    try:
        page = tab.page
        tab.open(url)
        entry = page.locator("#audit-entry")
        assert entry.is_visible() and f"Audit: {N} to decide" in (entry.text_content() or "")
        page.click("#audit-todo")
        page.wait_for_selector('#catalog[data-loaded="audit=todo"]')
        assert shown_rows(page) == drawn
        assert explanation_hidden(page, drawn[0])
        page.click(f'tr[data-feature-id="{drawn[2]}"] a')
        page.wait_for_selector(f'#feature-panel[data-loaded="{drawn[2]}"]')
        assert "audit 1, position 3 of 5" in (page.text_content("#audit-notice") or "")
        assert not page.is_visible("#judges")
        page.keyboard.press("l")
        page.keyboard.press("Enter")
        page.wait_for_function("() => !document.querySelector('#toast').hidden")
        page.goto(url + "?audit=todo")
        page.wait_for_selector('#catalog[data-loaded="audit=todo"]')
        assert shown_rows(page) == [f for f in drawn if f != drawn[2]]
        assert f"Audit: {N - 1} to decide" in (page.text_content("#audit-entry") or "")
        assert tab.errors == []
    finally:
        _stop(process)
    index = CatalogIndex(run, labeled_copy / "labels.sqlite", rules,
                         labeled_copy / "browse-index.sqlite")  # fmt: skip
    try:
        every = index.query(CatalogQuery.from_params({"audit": ["all"]}))["features"]
        assert [r["feature_id"] for r in every] == drawn
        assert [r["audit_position"] for r in every] == list(range(1, N + 1))
    finally:
        index.close()


def test_a_running_index_catches_up_with_an_audit_drawn_after_it(labeled_copy: Path) -> None:
    run = RunData.open(labeled_copy)
    store = LabelStore(labeled_copy / "labels.sqlite")
    try:
        index = open_index(run, store, DisputeRules())
    finally:
        store.close()
    try:
        todo = CatalogQuery.from_params({"audit": ["todo"]})
        assert index.query(todo)["total"] == 0
        assert index.facets()["audit"] == [{"value": "todo", "count": 0},
                                           {"value": "all", "count": 0}]  # fmt: skip
        drawn, _ = _draw(labeled_copy)
        assert [r["feature_id"] for r in index.query(todo)["features"]] == drawn
        assert index.facets()["audit"][0] == {"value": "todo", "count": N}
    finally:
        index.close()


def explanation_hidden(page: object, feature_id: str) -> bool:
    from playwright.sync_api import Page

    assert isinstance(page, Page)
    cell = page.text_content(f'tr[data-feature-id="{feature_id}"] td.explanation') or ""
    return "hidden" in cell


def test_the_resampled_confidence_shows_beside_the_category(labeled_copy: Path, tab: Tab) -> None:
    store = LabelStore(labeled_copy / "labels.sqlite")
    try:
        feature = review_queue(store, DisputeRules())[0].feature_id
        judgment = store.ok_judgment(feature, "heuristic")
        assert judgment is not None
        category = judgment.classification.category
        other = "reasoning" if category != "reasoning" else "language"
        resampled = Resampling(categories=[category] * 4 + [other], confidence=0.8,
                               mode=category, mode_share=0.8)  # fmt: skip
        store.put_ok(judgment.model_copy(update={"judge": "resampled", "resamples": resampled}))
    finally:
        store.close()
    process, url = _start(labeled_copy, "--port", "0", "--reviewer", "ada",
                          stderr=labeled_copy.parent / "server.log", command="browse")  # fmt: skip
    try:
        page = tab.page
        tab.open(f"{url}feature/{feature}")
        page.wait_for_selector(f'#feature-panel[data-loaded="{feature}"]')
        page.click("#toggle-judges")
        cards = page.locator("#judges .judge")
        texts = {
            (cards.nth(i).locator(".judge-name").text_content() or ""): cards.nth(i).inner_text()
            for i in range(cards.count())
        }
        assert "agrees in 4 of 5 resamples (0.80)" in texts["resampled"]
        assert "resample" not in texts["heuristic"]
        assert tab.errors == []
    finally:
        _stop(process)
