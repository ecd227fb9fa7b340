"""A gold set that travels: people decide an audit of one labeled run from the planted
truth, ``export --format gold`` writes their decisions, and ``import-gold`` stores them
in another run of the same adapter, where the audit is used as drawn."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from collectors.run_format import read_run_info
from labeler.audit.design import draw_audit, frame_hash
from labeler.audit.estimate import audit_sample, labeled_population
from labeler.cli import cli
from labeler.errors import UserError
from labeler.labeling.store import LabelStore
from labeler.reporting.disputes import DisputeRules
from labeler.reporting.summarize import summarize
from labeler.run.schemas import ReviewDecision
from tests.conftest import CollectedDemo

AUDIT_N = 12
SAMPLE_PER_LAYER = 5
BIN = Path(sys.executable).parent


@dataclass(frozen=True)
class Exported:
    run: Path
    gold: Path
    drawn: list[str]
    extra: str
    decisions: list[ReviewDecision]
    sampled: Path


def _truth(demo: CollectedDemo) -> dict[str, dict[str, Any]]:
    return {t["feature_id"]: t for t in json.loads(demo.paths.ground_truth.read_text())}


def _decision(planted: dict[str, Any], reviewer: str, at: str) -> ReviewDecision:
    fields = ("category", "subcategory", "mechanism", "domain_type")
    return ReviewDecision(feature_id=planted["feature_id"], reviewer=reviewer,
                          decided_at=at, **{f: planted[f] for f in fields})  # fmt: skip


def _label_sampled(collected: CollectedDemo, folder: Path) -> Path:
    """A run of the same adapter whose heuristic labels cover a few features per layer."""
    from labeler.judges import make_judge
    from labeler.labeling import label_run
    from labeler.run.data import RunData

    shutil.copytree(collected.run, folder)
    store = LabelStore(folder / "labels.sqlite")
    label_run(RunData.open(folder), store, make_judge("heuristic"),
              sample_per_layer=SAMPLE_PER_LAYER)  # fmt: skip
    store.close()
    return folder


def _invoke(*args: str | Path) -> Any:
    return CliRunner().invoke(cli, [str(a) for a in args], terminal_width=200)


def _refused(*args: str | Path) -> str:
    """Run ``labeler`` as a user does; what it says on stderr, after checking that it
    was refused as the user's to fix (exit 2)."""
    done = subprocess.run([str(BIN / "labeler"), *map(str, args)], capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert done.returncode == 2, done.stdout + done.stderr
    return done.stderr


@pytest.fixture(scope="module")
def exported(
    labeled: CollectedDemo, collected: CollectedDemo, tmp_path_factory: pytest.TempPathFactory
) -> Exported:
    """A labeled run with an audit that "ann" decided from the planted truth, one more
    decision by "bob" on a feature outside it (and planned in the sampled run), a skip,
    and its gold file."""
    base = tmp_path_factory.mktemp("gold")
    sampled = _label_sampled(collected, base / "sampled")
    run = base / "source"
    shutil.copytree(labeled.run, run)
    truth = _truth(labeled)
    store = LabelStore(run / "labels.sqlite")
    drawn = draw_audit(store, AUDIT_N, seed=7).feature_ids
    small = LabelStore(sampled / "labels.sqlite")
    extra = next(f for f, _, _ in small.planned() if f not in drawn)
    small.close()
    decisions = [_decision(truth[f], "ann", f"2026-01-02T10:{k:02d}:00.000+00:00")
                 for k, f in enumerate(drawn)]  # fmt: skip
    decisions.insert(3, _decision(truth[extra], "bob", "2026-01-02T09:00:00.000+00:00"))
    for decision in decisions:
        store.add_review(decision)
    store.add_review(ReviewDecision(feature_id=drawn[0], reviewer="bob", action="skip"))
    store.close()
    result = _invoke("export", run, "--format", "gold")
    assert result.exit_code == 0, result.output
    return Exported(run, run / "gold.jsonl", drawn, extra, decisions, sampled)


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _counts(run: Path) -> tuple[int, int]:
    store = LabelStore(run / "labels.sqlite")
    try:
        return len(store.reviews()), len(store.audits.all())
    finally:
        store.close()


def _audited(run: Path) -> dict[str, float]:
    """The features the run's estimate uses, with their inclusion probabilities."""
    store = LabelStore(run / "labels.sqlite")
    try:
        population = labeled_population(store)
        decided = {r.feature_id for r in store.reviews() if r.action == "decide"}
        sample, _ = audit_sample(store, population, decided)
    finally:
        store.close()
    return {
        population[i]: p for i, p in zip(sample.index.tolist(), sample.pi.tolist(), strict=True)
    }


def test_export_writes_each_decision_with_its_audit(exported: Exported) -> None:
    lines = _lines(exported.gold)
    info = json.loads((exported.run / "run.json").read_text())
    assert [(g["feature_id"], g["reviewer"], g["decided_at"]) for g in lines] == [
        (d.feature_id, d.reviewer, d.decided_at) for d in exported.decisions
    ]  # in the order made, the skip left out
    assert {(g["adapter_hash"], g["unit"], g["corpus_hash"], g["run"], g["schema_version"])
            for g in lines} == {(info["adapter_hash"], info["unit"], info["corpus_hash"],
                                 "source", 1)}  # fmt: skip
    by_feature = {g["feature_id"]: g for g in lines}
    assert by_feature[exported.extra]["audits"] == []
    pi = _audited(exported.run)
    assert sorted(pi) == sorted(exported.drawn)  # every drawn feature was decided
    for fid in exported.drawn:
        (audit,) = by_feature[fid]["audits"]
        assert audit["source"] == "drawn" and audit["weighting"] == "uncertainty"
        assert audit["probability"] == pytest.approx(pi[fid])
        layer, index = fid[1:].split("F")
        assert (by_feature[fid]["layer"], by_feature[fid]["index"]) == (int(layer), int(index))
    assert "already exists" in _refused("export", exported.run, "--format", "gold")


def test_import_brings_decisions_and_the_audit(exported: Exported, labeled_copy: Path) -> None:
    before = len(LabelStore(labeled_copy / "labels.sqlite").reviews())
    result = _invoke("import-gold", labeled_copy, exported.gold)
    assert result.exit_code == 0, result.output
    n = len(exported.decisions)
    assert f"{n} decisions imported, 0 already there" in result.output
    assert "added as audit 1" in result.output
    store = LabelStore(labeled_copy / "labels.sqlite")
    try:
        reviews = store.reviews()[before:]
        (audit,) = store.audits.all()
    finally:
        store.close()
    assert [r.model_dump() for r in reviews] == [d.model_dump() for d in exported.decisions]
    assert audit.source == "gold:gold.jsonl#1"  # the source run's audit 1
    assert audit.n_drawn == AUDIT_N
    here, there = _audited(labeled_copy), _audited(exported.run)
    assert sorted(here) == sorted(there) == sorted(exported.drawn)
    assert here == pytest.approx(there)

    store = LabelStore(labeled_copy / "labels.sqlite")
    try:
        summary = summarize(store, read_run_info(labeled_copy), str(labeled_copy), DisputeRules())
    finally:
        store.close()
    (versus,) = summary.judges_vs_humans  # the run's judge against the imported people
    assert {versus.rater_a, versus.rater_b} == {"heuristic", "human"} and versus.n == n

    again = _invoke("import-gold", labeled_copy, exported.gold)
    assert again.exit_code == 0, again.output
    assert f"0 decisions imported, {n} already there" in again.output
    assert "imported before, as audit 1" in again.output
    assert _counts(labeled_copy) == (before + n, 1)


def test_import_into_its_own_run_stores_nothing(exported: Exported, tmp_path: Path) -> None:
    run = tmp_path / "source"
    shutil.copytree(exported.run, run)
    before = _counts(run)
    result = _invoke("import-gold", run, exported.gold)
    assert result.exit_code == 0, result.output
    assert f"0 decisions imported, {len(exported.decisions)} already there" in result.output
    assert "were all here already, under audit 1" in result.output
    assert _counts(run) == before
    assert _audited(run) == _audited(exported.run)


def test_another_adapter_is_refused(exported: Exported, labeled_copy: Path) -> None:
    other = labeled_copy.parent / "other.jsonl"
    lines = _lines(exported.gold)
    theirs = "0" * 16
    other.write_text("".join(json.dumps(g | {"adapter_hash": theirs}) + "\n" for g in lines))
    ours = json.loads((labeled_copy / "run.json").read_text())["adapter_hash"]
    before = _counts(labeled_copy)
    said = _refused("import-gold", labeled_copy, other)
    assert theirs in said and ours in said
    assert _counts(labeled_copy) == before


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (lambda g: g | {"category": "reasonning"}, "category"),
        (lambda g: {k: v for k, v in g.items() if k != "reviewer"}, "reviewer"),
        (lambda g: g | {"audits": [{**g["audits"][0], "probability": 0}]}, "audits.0.probability"),
        (lambda g: g | {"category": "language", "mechanism": "output"}, "mechanism"),
    ],
    ids=["category", "reviewer", "probability", "mechanism"],
)
def test_a_bad_line_names_its_place_and_field(
    exported: Exported, labeled_copy: Path, change: Any, named: str
) -> None:
    lines = _lines(exported.gold)
    lines[4] = change(lines[4])
    bad = labeled_copy.parent / "bad.jsonl"
    bad.write_text("".join(json.dumps(g) + "\n" for g in lines))
    before = _counts(labeled_copy)
    result = _invoke("import-gold", labeled_copy, bad)
    assert isinstance(result.exception, UserError)  # exit 2 (labeler.cli.guard)
    said = str(result.exception)
    assert said.startswith(f"{bad}:5: ") and named in said
    assert _counts(labeled_copy) == before  # the good lines before it are not stored either


def test_not_json_names_its_line(exported: Exported, labeled_copy: Path) -> None:
    text = exported.gold.read_text().splitlines()
    bad = labeled_copy.parent / "cut.jsonl"
    before = _counts(labeled_copy)
    bad.write_text("\n".join([*text[:2], text[2][:40], *text[3:]]) + "\n")
    assert f"{bad}:3: not a JSON object" in _refused("import-gold", labeled_copy, bad)
    assert _counts(labeled_copy) == before


def test_other_plan_keeps_planned_decisions_only(exported: Exported) -> None:
    """The sampled run plans a few features per layer: the decisions on others are
    counted, and the audit (drawn from every labeled feature) is not used there."""
    run = exported.sampled
    store = LabelStore(run / "labels.sqlite")
    planned = {f for f, _, _ in store.planned()}
    current = frame_hash(labeled_population(store))
    store.close()
    unplanned = [d.feature_id for d in exported.decisions if d.feature_id not in planned]
    kept = len(exported.decisions) - len(unplanned)
    assert kept >= 1 and unplanned  # bob's decision is on a planned feature
    result = _invoke("import-gold", run, exported.gold)
    assert result.exit_code == 0, result.output
    assert f"{kept} decisions imported, 0 already there" in result.output
    assert f"{len(unplanned)} decisions on features {run} did not plan" in result.output
    assert ", ".join(unplanned[:5]) in result.output
    assert f"not usable here: {run} labels a different set of features" in result.output
    assert current in result.output
    reviews, audits = _counts(run)
    assert (reviews, audits) == (kept, 0)
    assert _audited(run) == {}
