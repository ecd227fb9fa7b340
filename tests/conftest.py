"""Shared fixtures: one planted demo model, collected and labeled once per test session."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from collectors.demo_model import DemoPaths, build_demo
from tests.fleet import reap
from tests.redis_server import RedisServer


@dataclass(frozen=True)
class CollectedDemo:
    paths: DemoPaths
    run: Path


@pytest.fixture(scope="session")
def demo_paths(tmp_path_factory: pytest.TempPathFactory) -> DemoPaths:
    return build_demo(tmp_path_factory.mktemp("demo") / "inputs", seed=0)


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
