"""Shared fixtures: one planted demo model, collected and labeled once per test session."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from collectors.demo_cache import CACHE_ENV, demo_inputs
from collectors.demo_model import DemoPaths
from tests.fake_llm import FakeLLMServer, oracle
from tests.fleet import reap
from tests.redis_server import RedisServer

if TYPE_CHECKING:
    from playwright.sync_api import Browser, ConsoleMessage, Page


@dataclass(frozen=True)
class CollectedDemo:
    paths: DemoPaths
    run: Path


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The labeler's cache folder for this test session (the planted model's cache),
    shared by the test processes of one ``pytest -n`` run: the cache's lock makes them
    build the model once. A developer's ``LABELER_DEMO_CACHE`` is used (the cache checks
    itself), to keep it across runs."""
    kept = os.environ.get(CACHE_ENV)
    if kept:
        return Path(kept)
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    return shared / "labeler-cache"


@pytest.fixture(scope="session")
def demo_paths(tmp_path_factory: pytest.TempPathFactory, demo_cache: Path) -> DemoPaths:
    """The planted demo's inputs as `labeler demo` uses them: from the session's cache."""
    inputs = tmp_path_factory.mktemp("demo") / "inputs"
    return demo_inputs(inputs, seed=0, cache=demo_cache).paths


@pytest.fixture(scope="session")
def collected(demo_paths: DemoPaths, tmp_path_factory: pytest.TempPathFactory) -> CollectedDemo:
    from adapters.branch import load_adapter
    from collectors.collect import CollectJob, collect_run
    from collectors.corpus import read_traces, tokenize_traces
    from collectors.run_format import CollectParams

    adapter, tokenizer, folder = load_adapter(str(demo_paths.checkpoint), "cpu", "float32")
    corpus = tokenize_traces(list(read_traces(demo_paths.corpus)), tokenizer, 1024)
    run = tmp_path_factory.mktemp("collected") / "run"
    params = CollectParams(n_quantiles=10, per_quantile=3)
    collect_run(CollectJob(adapter, tokenizer, corpus, params, folder, demo_paths.corpus), run)
    return CollectedDemo(demo_paths, run)


@pytest.fixture(scope="session")
def labeled(collected: CollectedDemo, tmp_path_factory: pytest.TempPathFactory) -> CollectedDemo:
    """A copy of the collected run labeled by the heuristic judge."""
    from labeler.judges import make_judge
    from labeler.labeling import label_run
    from labeler.labeling.store import LabelStore
    from labeler.run.data import RunData

    run = tmp_path_factory.mktemp("labeled") / "run"
    shutil.copytree(collected.run, run)
    store = LabelStore(run / "labels.sqlite")
    label_run(RunData.open(run), store, make_judge("heuristic"))
    store.close()
    return CollectedDemo(collected.paths, run)


@pytest.fixture
def run_copy(collected: CollectedDemo, tmp_path: Path) -> Path:
    """A private, unlabeled copy of the collected run."""
    run = tmp_path / "run"
    shutil.copytree(collected.run, run)
    return run


@pytest.fixture
def labeled_copy(labeled: CollectedDemo, tmp_path: Path) -> Path:
    """A private copy of the run the heuristic judge labeled."""
    run = tmp_path / "labeled"
    shutil.copytree(labeled.run, run)
    return run


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A private redis-server; fleet processes a test left running are killed before it
    goes (a leftover driver would wait minutes for it)."""
    with RedisServer(tmp_path / "redis") as server:
        try:
            yield server
        finally:
            reap()


@pytest.fixture(scope="module")
def oracle_server() -> Iterator[FakeLLMServer]:
    """The loopback fake LLM answering by the oracle, one per test module."""
    with FakeLLMServer(oracle) as fake:
        yield fake


@pytest.fixture
def fresh_fake(oracle_server: FakeLLMServer) -> FakeLLMServer:
    """The module's fake with no requests recorded, nothing scripted and no latency."""
    oracle_server.reset()
    oracle_server.latency = 0.0
    return oracle_server


CHROMIUM = Path(os.environ.get("LABELER_CHROMIUM", "/usr/bin/chromium"))


@dataclass
class Tab:
    """A browser tab and the script errors and CSP violations it logged."""

    page: Page
    errors: list[str] = field(default_factory=list)

    def open(self, url: str) -> None:
        self.page.goto(url)
        self.page.wait_for_selector("body[data-ready=true]")

    def pwned(self) -> str:
        return str(self.page.evaluate("typeof window.__pwned"))


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.fail(
            f"{CHROMIUM} is missing: the review page is tested in a real Chromium; "
            "apt-get install chromium (or point LABELER_CHROMIUM at one)"
        )
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail(
            "the playwright package is missing: pip install playwright (the dev extra); "
            "no `playwright install` needed, the tests use the system Chromium"
        )
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        yield chromium
        chromium.close()


@pytest.fixture
def tab(browser: Browser) -> Iterator[Tab]:
    """A fresh browser profile (empty localStorage) collecting script errors and CSP
    violations (failed requests are expected: the tests make some)."""
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(10_000)
    opened = Tab(page)

    def on_console(message: ConsoleMessage) -> None:
        if message.type == "error" and not message.text.startswith("Failed to load resource"):
            opened.errors.append(message.text)

    page.on("console", on_console)
    page.on("pageerror", lambda exc: opened.errors.append(str(exc)))
    yield opened
    context.close()
