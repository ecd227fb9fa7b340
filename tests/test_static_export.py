"""`labeler export RUN --format html`: a self-contained folder of the catalog and the
selected feature pages, opened from disk in a real headless Chromium with every request
recorded: only files of the folder are read, nothing leaves it. Markup planted into an
explanation (with a ``</script>`` that would close the embedded data) shows as text."""

from __future__ import annotations

import json
import re
import shutil
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from collectors.run_format import read_run_info
from tests.conftest import CollectedDemo, Tab
from tests.test_bad_input import labeler
from tests.test_first_hour import one_line_error

if TYPE_CHECKING:
    from playwright.sync_api import Page, Route

XSS = (
    '<img src=x onerror="window.__pwned=1"> fires on <b>bold</b> '
    "</script><script>window.__pwned=2</script> <!-- \u2028 & &amp; done"
)


@dataclass(frozen=True)
class Exported:
    site: Path
    run: Path
    catalog: dict[str, dict[str, Any]]  # the jsonl catalog's lines, by feature id
    reasoning: set[str]  # the features whose final label is reasoning
    planted: str  # the reasoning feature whose explanation carries markup
    stdout: str


@pytest.fixture(scope="module")
def exported(labeled: CollectedDemo, tmp_path_factory: pytest.TempPathFactory) -> Exported:
    """A copy of the labeled demo with markup in a reasoning feature's explanation, its
    reasoning features exported as HTML (and the whole catalog as JSONL, to compare)."""
    folder = tmp_path_factory.mktemp("static")
    run = folder / "run"
    shutil.copytree(labeled.run, run)
    with sqlite3.connect(run / "labels.sqlite") as conn:
        planted = conn.execute(
            "SELECT feature_id FROM judgments WHERE status = 'ok' AND category = 'reasoning' "
            "ORDER BY feature_id LIMIT 1"
        ).fetchone()[0]
        conn.execute(
            "UPDATE judgments SET payload = json_set(payload, '$.explanation', ?)"
            " WHERE feature_id = ?",
            (XSS, planted),
        )
    done = labeler("export", run, "--out", folder / "catalog.jsonl")
    assert done.returncode == 0, done.stderr
    catalog = {}
    # (split at newlines only: str.splitlines also splits at the planted U+2028)
    for text in filter(None, (folder / "catalog.jsonl").read_text(encoding="utf-8").split("\n")):
        line = json.loads(text)
        catalog[line["feature_id"]] = line
    reasoning = {f for f, line in catalog.items() if line["final_label"]["category"] == "reasoning"}
    assert planted in reasoning and 10 < len(reasoning) < len(catalog)
    from labeler.review.neighbours import ensure_neighbours
    from labeler.run.data import RunData

    ensure_neighbours(RunData.open(run), device="cpu").close()  # as labeler browse builds it
    site = folder / "site"
    done = labeler("export", run, "--format", "html", "--select", "category=reasoning",
                   "--out", site, "--jobs", "1")  # fmt: skip
    assert done.returncode == 0, done.stderr
    return Exported(site, run, catalog, reasoning, planted, done.stdout)


def _files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if not p.is_dir()}


def test_the_folder_holds_the_catalog_and_one_page_per_selected_feature(
    exported: Exported,
) -> None:
    assert _files(exported.site) == {
        "index.html",
        *(f"features/{f}.html" for f in exported.reasoning),
    }
    sizes = [p.stat().st_size for p in (exported.site / "features").iterdir()]
    total = sum(sizes) + (exported.site / "index.html").stat().st_size
    said = " ".join(exported.stdout.split())
    assert f"{len(exported.reasoning):,} feature pages" in said, said
    assert str(exported.site) in said
    for needle in ("total", "catalog", "mean", "largest"):
        assert needle in said, said
    # the sizes said are the files' sizes (in KiB or MiB, as written)
    assert f"{total / 2**20:.1f} MiB total" in said or f"{total / 2**10:.0f} KiB total" in said


def test_a_page_embeds_its_data_with_nothing_that_closes_the_script(exported: Exported) -> None:
    page = (exported.site / "features" / f"{exported.planted}.html").read_text(encoding="utf-8")
    data = re.search(r'<script type="application/json" id="static-data">(.*?)</script>', page, re.S)
    assert data is not None
    embedded = data.group(1)
    assert "<" not in embedded and ">" not in embedded and "&" not in embedded
    assert "\u2028" not in embedded and "\u2029" not in embedded
    parsed = json.loads(embedded)
    assert parsed["session"]["static"] is True
    assert parsed["feature"]["feature_id"] == exported.planted
    assert XSS in {j["explanation"] for j in parsed["feature"]["judges"]}
    # only the content security policy of the page itself: no network at all
    policy = re.search(r'<meta http-equiv="Content-Security-Policy" content="([^"]+)">', page)
    assert policy is not None
    for rule in ("default-src 'none'", "connect-src 'none'", "img-src 'none'",
                 "base-uri 'none'", "form-action 'none'", "trusted-types 'none'"):  # fmt: skip
        assert rule in policy.group(1)
    assert "http:" not in page and "https:" not in page


class Recorder:
    """Every request the tab makes; those outside the folder are refused."""

    def __init__(self, page: Page, folder: Path) -> None:
        self.urls: list[str] = []
        self.allowed = folder.resolve().as_uri() + "/"

        def on_route(route: Route) -> None:
            url = route.request.url
            self.urls.append(url)
            if url.startswith(self.allowed):
                route.continue_()
            else:
                route.abort()

        page.context.route("**/*", on_route)
        page.on("request", lambda request: self.urls.append(request.url))

    def outside(self) -> list[str]:
        return [u for u in self.urls if not u.startswith(self.allowed)]


def _shown_ids(page: Page) -> list[str]:
    return [
        str(r.get_attribute("data-feature-id")) for r in page.locator("#catalog tbody tr").all()
    ]


def test_opened_from_disk_nothing_leaves_the_folder(exported: Exported, tab: Tab) -> None:
    page = tab.page
    recorder = Recorder(page, exported.site)
    tab.open((exported.site / "index.html").as_uri())
    status = page.locator("#status").text_content() or ""
    assert f"{len(exported.reasoning)} features" in status.replace(",", "")
    shown = _shown_ids(page)
    assert set(shown) <= exported.reasoning and len(shown) == min(200, len(exported.reasoning))
    every = set(shown)
    while page.locator("#next-page").is_enabled():
        page.click("#next-page")
        every |= set(_shown_ids(page))
    assert every == exported.reasoning

    # every typed word must match, case-insensitively: the planted explanation's words
    page.fill("#q", "FIRES on BOLD")
    assert _shown_ids(page) == [exported.planted]
    row = page.locator(f'#catalog tbody tr[data-feature-id="{exported.planted}"]')
    assert row.locator("td.explanation").text_content() == XSS
    page.fill("#q", "fires nowhere-such-word")
    assert _shown_ids(page) == []
    one = sorted(exported.reasoning)[3]
    page.fill("#q", one.lower())
    assert one in _shown_ids(page)

    # sorting by frequency, descending: the catalog's order
    page.fill("#q", "")
    page.click('th button[data-sort="frequency"]')
    page.click('th button[data-sort="frequency"]')
    freq = {f: exported.catalog[f]["activation_freq"] for f in exported.reasoning}
    top = sorted(freq.values(), reverse=True)[: len(_shown_ids(page))]
    assert [freq[f] for f in _shown_ids(page)] == top

    # a click opens the feature's page from disk
    page.fill("#q", "fires bold")
    page.click(f'#catalog tbody tr[data-feature-id="{exported.planted}"] a')
    page.wait_for_selector(f'#feature-panel[data-loaded="{exported.planted}"]')
    assert page.url == (exported.site / "features" / f"{exported.planted}.html").as_uri()
    assert page.locator("#feature-title").text_content() == exported.planted
    line = exported.catalog[exported.planted]
    final = page.locator("#static-final").text_content() or ""
    assert line["final_label"]["category"] in final and line["label_source"] in final
    assert (
        page.locator("#example-list .example").count()
        == len(json.loads(_embedded(exported.site, exported.planted))["feature"]["examples"])
        > 0
    )
    # a neighbour with a page in the copy is a link to it, any other plain text
    neighbours = page.locator("#neighbours li[data-feature]").all()
    assert neighbours
    linked = {str(n.get_attribute("data-feature")) for n in neighbours if n.locator("a").count()}
    listed = {str(n.get_attribute("data-feature")) for n in neighbours}
    assert linked == listed & exported.reasoning and listed - exported.reasoning
    page.click("#toggle-judges")
    assert XSS in page.locator("#judges .judge-explanation").all_text_contents()[0]
    # read-only: no decision form, no queue; a decision key does nothing
    assert not page.locator("#decision").is_visible()
    assert not page.locator("#queue-panel").is_visible()
    assert not page.locator("#change-reviewer").is_visible()
    # the copy names no folder of this machine: the checkpoint by its folder's name only
    notes = page.locator("#neighbours").inner_text()
    adapter = read_run_info(exported.run).adapter_path
    assert Path(adapter).name in notes and adapter not in notes
    page.keyboard.press("r")
    page.keyboard.press("Enter")
    # every link on the page leads to a file of the folder (the catalog, other pages)
    for href in page.eval_on_selector_all("a[href]", "links => links.map(a => a.href)"):
        if href.startswith("file:"):
            target = Path(href.removeprefix("file://").split("#")[0])
            assert target.resolve().is_relative_to(exported.site.resolve()), href
            assert target.is_file(), href
        else:
            pytest.fail(f"a link out of the folder: {href}")
    # nothing can be sent: the page's CSP refuses any connection
    refused = page.evaluate(
        "fetch('http://127.0.0.1:9/x', {method: 'POST', body: 'x'})"
        ".then(() => 'sent', (err) => 'refused')"
    )
    assert refused == "refused"
    page.click("#catalog-link")
    page.wait_for_selector("body[data-ready=true]")
    assert page.url == (exported.site / "index.html").as_uri()

    assert recorder.outside() == []
    assert recorder.urls  # the recorder saw the files read
    assert tab.pwned() == "undefined"
    # the only errors logged are the refused fetch's
    assert tab.errors and all("127.0.0.1:9/x" in e for e in tab.errors), tab.errors


def _embedded(site: Path, feature_id: str) -> str:
    page = (site / "features" / f"{feature_id}.html").read_text(encoding="utf-8")
    match = re.search(r'id="static-data">(.*?)</script>', page, re.S)
    assert match is not None
    return match.group(1)


def test_the_category_filter_and_the_whole_run(labeled: CollectedDemo, exported: Exported,
                                               tmp_path: Path, tab: Tab) -> None:  # fmt: skip
    """Without --select every planned feature is exported, here by two processes, each
    page as one process writes it; the category filter narrows the catalog to one
    category's features."""
    site = tmp_path / "all"
    done = labeler("export", labeled.run, "--format", "html", "--out", site, "--jobs", "2")
    assert done.returncode == 0, done.stderr
    with sqlite3.connect(labeled.run / "labels.sqlite") as conn:
        planned = {r[0] for r in conn.execute("SELECT feature_id FROM planned")}
        language = {
            r[0]
            for r in conn.execute(
                "SELECT feature_id FROM judgments WHERE status = 'ok' AND category = 'language'"
            )
        }
    assert _files(site) == {"index.html", *(f"features/{f}.html" for f in planned)}
    for feature in sorted(exported.reasoning - {exported.planted})[-3:]:
        one, two = (json.loads(_embedded(folder, feature)) for folder in (exported.site, site))
        for data in (one, two):  # (neighbours were built in the first run only)
            del data["feature"]["neighbours"], data["feature"]["neighbour_notes"]
        assert (one["feature"], one["final"]) == (two["feature"], two["final"])
    recorder = Recorder(tab.page, site)
    tab.open((site / "index.html").as_uri())
    tab.page.select_option("#category", "language")
    every: set[str] = set(_shown_ids(tab.page))
    while tab.page.locator("#next-page").is_enabled():
        tab.page.click("#next-page")
        every |= set(_shown_ids(tab.page))
    assert every == language and language
    assert recorder.outside() == [] and tab.errors == []


def test_bad_input_is_one_clear_line(labeled_copy: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    one_line_error(
        labeler("export", labeled_copy, "--format", "html", "--select", "colour=red",
                "--out", site),
        "no label field 'colour'",
    )  # fmt: skip
    ids = tmp_path / "ids.txt"
    ids.write_text("L0F1\n# a comment\nnot-an-id\n", encoding="utf-8")
    one_line_error(
        labeler("export", labeled_copy, "--format", "html", "--features", ids, "--out", site),
        f"{ids}:3",
    )
    ids.write_text("L0F1\n\nL999F0\n", encoding="utf-8")
    one_line_error(
        labeler("export", labeled_copy, "--format", "html", "--features", ids, "--out", site),
        f"{ids}:3",
        "L999F0",
        "not planned",
    )
    assert not site.exists()
    site.mkdir()
    (site / "mine.txt").write_text("keep", encoding="utf-8")
    one_line_error(
        labeler("export", labeled_copy, "--format", "html", "--features", ids.with_name("x"),
                "--out", site),
        "no such file",
    )  # fmt: skip
    ids.write_text("L0F1\n", encoding="utf-8")
    one_line_error(
        labeler("export", labeled_copy, "--format", "html", "--features", ids, "--out", site),
        str(site),
        "already exists",
        "--overwrite",
    )
    assert _files(site) == {"mine.txt"}
    done = labeler("export", labeled_copy, "--format", "html", "--features", ids, "--out", site,
                   "--overwrite")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert _files(site) == {"index.html", "features/L0F1.html"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left


@pytest.fixture
def _no_planned(run_copy: Path) -> Iterator[Path]:
    from labeler.labeling.store import LabelStore

    LabelStore(run_copy / "labels.sqlite").close()
    yield run_copy


def test_a_run_with_no_planned_feature_says_so(_no_planned: Path, tmp_path: Path) -> None:
    one_line_error(
        labeler("export", _no_planned, "--format", "html", "--out", tmp_path / "site"),
        "no planned features",
    )
    assert not (tmp_path / "site").exists()
