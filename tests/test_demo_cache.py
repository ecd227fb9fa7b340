"""The cache of the planted demo's inputs: where it is, what keys an entry, and builds
that race (on a small shape, so that a build takes seconds)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from collectors.demo_cache import (
    BUILD_MODULES,
    CACHE_ENV,
    DEMO_FOLDER,
    MANIFEST,
    cache_root,
    demo_inputs,
    entry_key,
    key_parts,
)
from collectors.demo_model import DemoShape

SMALL = DemoShape(n_traces=60, n_layers=2, d_model=64, intermediate=128, max_length=512)
PROJECT_PACKAGES = ("adapters", "collectors", "labeler", "prompts", "workers")


def test_the_cache_folder_follows_the_environment(tmp_path: Path) -> None:
    home = Path.home()
    assert cache_root({}) == home / ".cache" / "transcoder-labeler"
    assert cache_root({"XDG_CACHE_HOME": str(tmp_path)}) == tmp_path / "transcoder-labeler"
    both = {"XDG_CACHE_HOME": str(tmp_path), CACHE_ENV: str(tmp_path / "mine")}
    assert cache_root(both) == tmp_path / "mine"


def test_the_key_covers_every_module_the_build_imports() -> None:
    code = (
        "import sys\n"
        "import collectors.demo_model\n"
        f"ours = [m for m in sys.modules if m.split('.')[0] in {PROJECT_PACKAGES}]\n"
        "print('\\n'.join(sorted(ours)))\n"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True, timeout=120).stdout.split()  # fmt: skip
    assert "collectors.demo_model" in loaded
    assert sorted(set(loaded) - set(BUILD_MODULES)) == []


def test_the_key_changes_with_the_seed_and_the_shape() -> None:
    keys = {
        entry_key(key_parts(0, DemoShape())),
        entry_key(key_parts(1, DemoShape())),
        entry_key(key_parts(0, SMALL)),
    }
    assert len(keys) == 3
    assert entry_key(key_parts(0, SMALL)) == entry_key(key_parts(0, SMALL))
    parts = key_parts(0, SMALL)
    assert {"torch", "transformers", "tokenizers"} <= set(parts["libraries"])
    assert "collectors.demo_model" in parts["sources"]


BUILD = """
import sys
from pathlib import Path
from collectors.demo_cache import demo_inputs
from tests.test_demo_cache import SMALL
inputs = demo_inputs(Path(sys.argv[1]), seed=0, shape=SMALL, cache=Path(sys.argv[2]))
print("built" if inputs.built else "reused")
"""


def test_concurrent_demos_build_once_and_see_whole_entries(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", BUILD, str(tmp_path / f"out{i}"), str(cache)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    results = [racer.communicate(timeout=600) for racer in racers]
    assert [racer.returncode for racer in racers] == [0, 0], [err for _, err in results]
    assert sorted(out.strip() for out, _ in results) == ["built", "reused"]
    (entry,) = [p for p in (cache / DEMO_FOLDER).iterdir() if p.is_dir()]
    files = json.loads((entry / MANIFEST).read_text())["files"]
    for i in range(2):
        copied = sorted(
            p.relative_to(tmp_path / f"out{i}").as_posix()
            for p in (tmp_path / f"out{i}").rglob("*")
            if p.is_file()
        )
        assert copied == sorted(files)
    # a forced rebuild replaces the entry with an equal one
    again = demo_inputs(tmp_path / "again", seed=0, shape=SMALL, rebuild=True, cache=cache)
    assert again.built and again.problem is None
    rebuilt = json.loads((entry / MANIFEST).read_text())["files"]
    assert rebuilt["ground_truth.json"] == files["ground_truth.json"]
    assert not [p.name for p in (cache / DEMO_FOLDER).iterdir() if p.name.startswith(".")]
