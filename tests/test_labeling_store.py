"""The label store: resumable labeling, failures recorded with their reason, exports."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import polars as pl
import pytest

from labeler.errors import JudgeFailure
from labeler.judges.heuristic import HeuristicJudge
from labeler.labeling import label_run, plan_features
from labeler.labeling.store import STORE_SCHEMA_VERSION, LabelStore
from labeler.reporting.summarize import summarize
from labeler.run.data import RunData
from labeler.run.schemas import FeatureRecord, Judgment, Snippet
from tests.conftest import CollectedDemo
from tests.test_bad_input import labeler


class FailingOnLayer(HeuristicJudge):
    """The heuristic judge, except that every feature of one layer fails."""

    def __init__(self, layer: int) -> None:
        super().__init__("heuristic")
        self.failing_layer = layer

    def judge(self, feature: FeatureRecord, negatives: dict[str, list[Snippet]]) -> Judgment:
        if feature.layer == self.failing_layer:
            raise JudgeFailure("the backend returned an invalid reply twice")
        return super().judge(feature, negatives)


def test_sample_per_layer_is_seeded_and_stratified(run_copy: Path) -> None:
    run = RunData.open(run_copy)
    first = plan_features(run, 25, seed=3)
    assert plan_features(run, 25, seed=3) == first
    assert plan_features(run, 25, seed=4) != first
    assert [sum(1 for _, la, _ in first if la == layer) for layer in range(4)] == [25] * 4


def test_failures_are_recorded_and_a_rerun_labels_only_what_is_missing(run_copy: Path) -> None:
    run = RunData.open(run_copy)
    store = LabelStore(run_copy / "labels.sqlite")
    report = label_run(run, store, FailingOnLayer(2), sample_per_layer=30)
    assert (report.planned, report.labeled, report.failed) == (120, 90, 30)
    summary = summarize(store, run.info, "run").final
    assert (summary.n_labeled, summary.n_failed, summary.n_unlabeled) == (90, 30, 0)
    assert summary.failures_by_reason == {"the backend returned an invalid reply twice": 30}
    assert summary.reasoning.n == 90
    lo, hi = summary.reasoning_if_missing_counted
    assert lo == summary.reasoning.count / 120 and hi == (summary.reasoning.count + 30) / 120

    again = label_run(run, store, HeuristicJudge(), sample_per_layer=30)
    assert (again.skipped, again.labeled, again.failed) == (90, 30, 0)
    third = label_run(run, store, HeuristicJudge(), sample_per_layer=30)
    assert (third.skipped, third.labeled) == (120, 0)
    retried = [s for s in store.judgments("heuristic").values() if s.attempts == 2]
    assert len(retried) == 30 and all(s.status == "ok" for s in retried)
    store.close()


def test_cli_label_summarize_export(run_copy: Path, tmp_path: Path) -> None:
    result = labeler("label", run_copy, "--judge", "heuristic", "--sample-per-layer", "20")
    assert result.returncode == 0, result.stderr
    assert "80 labeled now, 0 failed" in result.stdout
    result = labeler("summarize", run_copy, "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["final"]["n_labeled"] == 80 and summary["judges"][0]["rater"] == "heuristic"
    assert 0 <= summary["final"]["reasoning"]["ci_low"] <= summary["final"]["reasoning"]["share"]
    png = (run_copy / "summary.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000

    out = tmp_path / "catalog.jsonl.gz"
    result = labeler("export", run_copy, "--format", "jsonl", "--out", out, "--with-examples")
    assert result.returncode == 0, result.stderr
    with gzip.open(out, "rt") as fh:
        lines = [json.loads(x) for x in fh]
    assert len(lines) == 80
    # One gzip member per layer; readers see one stream.
    assert gzip.decompress(out.read_bytes()).count(b"\n") == 80
    assert pl.read_ndjson(out).height == 80
    assert out.read_bytes().count(b"\x1f\x8b\x08") >= 4  # the members' headers
    first = lines[0]
    expected_keys = (
        "schema_version", "feature_id", "layer", "index", "activation_freq", "final_label",
        "label_source", "judgments", "reviews", "disputed", "top_logits", "examples",
        "provenance",
    )  # fmt: skip
    for key in expected_keys:
        assert key in first, key
    assert first["schema_version"] == 2
    assert first["feature_id"] == f"L{first['layer']}F{first['index']}"
    assert [(f["feature_id"]) for f in lines] == sorted(
        (f["feature_id"] for f in lines), key=lambda fid: tuple(map(int, fid[1:].split("F")))
    )
    (judgment,) = first["judgments"]
    assert judgment["judge"] == "heuristic" and judgment["status"] == "ok"
    assert first["label_source"] == "single_judge" and first["label_source_detail"] == "heuristic"
    assert first["final_label"]["category"] == judgment["category"]
    assert set(judgment["detection"]) >= {"accuracy", "precision", "recall", "by_set"}
    assert judgment["detection"]["by_set"]["top"]["n_positive"] > 0
    assert len(first["top_logits"]) == 10
    assert first["provenance"]["adapter_hash"] and first["provenance"]["corpus_hash"]
    assert {e["kind"] for e in first["examples"]} == {"top", "random", "quantile"}
    example = first["examples"][0]
    assert (
        len(example["tokens"]) == len(example["acts"]) and example["acts"][example["highlight"]] > 0
    )


def test_a_version_1_store_is_migrated_keeping_its_judgments(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "labels.sqlite"
    conn = sqlite3.connect(path)
    conn.executescript(
        """CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        INSERT INTO meta VALUES ('schema_version', '1');
        CREATE TABLE planned (feature_id TEXT PRIMARY KEY, layer INTEGER NOT NULL,
                              idx INTEGER NOT NULL);
        CREATE TABLE judgments (feature_id TEXT NOT NULL, judge TEXT NOT NULL,
            status TEXT NOT NULL CHECK (status IN ('ok', 'failed')), payload TEXT,
            reason TEXT, prompt_hash TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 1,
            created_at TEXT NOT NULL, PRIMARY KEY (feature_id, judge));
        INSERT INTO judgments VALUES ('L0F1', 'heuristic', 'failed', NULL, 'boom', 'h', 1,
                                      '2026-01-01T00:00:00');"""
    )
    conn.commit()
    conn.close()
    store = LabelStore(path)
    rows = store.judgments("heuristic")
    assert rows["L0F1"].reason == "boom"
    assert store.accounting("heuristic") == [("failed", "boom", {}, None)]
    store.put_failure("L0F1", "heuristic", "again", "h")
    assert store.judgments("heuristic")["L0F1"].attempts == 2
    version = store.conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
    assert version == (str(STORE_SCHEMA_VERSION),)
    store.close()


def test_a_copied_store_gets_its_own_identity_so_a_fleet_never_mixes_the_two(
    tmp_path: Path,
) -> None:
    import shutil
    import sqlite3

    original = tmp_path / "a" / "labels.sqlite"
    original.parent.mkdir()
    store = LabelStore(original)
    made = store.store_id()
    assert store.store_id() == made  # stable where it was made
    store.close()
    assert LabelStore(original).store_id() == made  # and when opened again

    copy = tmp_path / "b" / "labels.sqlite"
    copy.parent.mkdir()
    shutil.copy(original, copy)
    copied = LabelStore(copy)
    assert copied.store_id() != made
    assert copied.store_id() == copied.store_id()
    copied.close()

    # a store made before stores recorded their path keeps the identity it has
    legacy = tmp_path / "c" / "labels.sqlite"
    legacy.parent.mkdir()
    shutil.copy(original, legacy)
    with sqlite3.connect(legacy) as conn:
        conn.execute("DELETE FROM meta WHERE key='store_path'")
    assert LabelStore(legacy).store_id() == made


def test_keys_are_redacted_by_value_and_by_shape(monkeypatch: pytest.MonkeyPatch) -> None:
    import logging

    from labeler.redaction import MARK, RedactingFilter, redact

    monkeypatch.setenv("MY_SERVICE_API_KEY", "plain-looking-value-77")
    text = ("got plain-looking-value-77, sk-ant-api03-" + "x" * 30 + " and Bearer "
            "abcdefghijklmnop; sk-short stays")  # fmt: skip
    assert redact(text) == f"got {MARK}, {MARK} and Bearer {MARK}; sk-short stays"
    try:
        raise ValueError("echoed plain-looking-value-77")
    except ValueError as exc:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "key %s", ("sk-" + "a" * 20,),
                                   (type(exc), exc, exc.__traceback__))  # fmt: skip
    assert RedactingFilter().filter(record)
    formatted = logging.Formatter().format(record)
    assert "plain-looking-value-77" not in formatted and "a" * 20 not in formatted
    assert formatted.startswith(f"key {MARK}") and "ValueError: echoed [REDACTED]" in formatted


def test_a_stored_judgment_is_never_rewritten_and_a_late_failure_only_adds_its_cost(
    labeled: CollectedDemo, tmp_path: Path
) -> None:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(labeled.run, run)
    store = LabelStore(run / "labels.sqlite")
    (fid, row), *_ = store.judgments("heuristic").items()
    assert row.judgment is not None
    before = store.conn.execute(
        "SELECT payload, created_at, attempts FROM judgments WHERE feature_id=?", (fid,)
    ).fetchone()
    other = row.judgment.model_copy(update={"explanation": "something else entirely"})
    store.put_ok(other)
    store.put_failure(fid, "heuristic", "timeout: label: late", row.judgment.prompt_hash,
                      cost_usd=0.5)  # fmt: skip
    after = store.conn.execute(
        "SELECT payload, created_at, attempts, status, cost_usd FROM judgments "
        "WHERE feature_id=?", (fid,)
    ).fetchone()  # fmt: skip
    assert after[:3] == before and after[3] == "ok" and after[4] == pytest.approx(0.5)
    store.close()


def test_an_unexpected_error_fails_its_feature_with_the_reason_logged_once(
    run_copy: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    class Broken(HeuristicJudge):
        async def judge(
            self, feature: FeatureRecord, negatives: dict[str, list[Snippet]]
        ) -> Judgment:
            raise RuntimeError("the judge's own bug")

    store = LabelStore(run_copy / "labels.sqlite")
    with caplog.at_level(logging.INFO, logger="labeler.labeling.stages"):
        report = label_run(RunData.open(run_copy), store, Broken("heuristic"), sample_per_layer=3)
    assert report.failed == 12 and report.labeled == 0
    reasons = {s.reason for s in store.judgments("heuristic").values()}
    assert reasons == {"error: label: RuntimeError: the judge's own bug"}
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    # a traceback is on the record, or already formatted into it by the key-redacting
    # filter an earlier CLI command in this process put on the handlers
    tracebacks = [r for r in caplog.records if r.exc_info or r.exc_text]
    assert len(warnings) == 1 and len(tracebacks) == 1 and tracebacks[0].levelno == logging.INFO
    store.close()
