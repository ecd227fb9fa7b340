"""The package tree keeps its shape: inside ``labeler``, subpackages import only the
ones below them (cli → formats, review, causal → reporting → audit → labeling → judges
→ run)."""

from __future__ import annotations

import ast
from pathlib import Path

import labeler

RANK = {"run": 0, "judges": 1, "labeling": 2, "audit": 3, "reporting": 4, "causal": 5,
        "review": 5, "formats": 5, "cli": 6}  # fmt: skip


def test_labeler_subpackages_import_only_downward() -> None:
    root = Path(labeler.__file__).parent
    upward = []
    for path in sorted(root.rglob("*.py")):
        package = path.relative_to(root).parts[0]
        if package not in RANK:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("labeler."):
                other = str(node.module).split(".")[1]
                if other in RANK and other != package and RANK[other] >= RANK[package]:
                    upward.append(f"{path.relative_to(root)} imports {node.module}")
    assert upward == []
    assert set(RANK) <= {p.name for p in root.iterdir() if (p / "__init__.py").exists()}
