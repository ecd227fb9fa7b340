"""Reports that read right, through the real CLI: every share says what it is a share of,
agreement figures carry the number of features they compare and are flagged when it is
small, counts are pluralised, summary.json says what made it and when, feature ids come
in numeric order, disputes give the judges' votes as a list, the plots say the same as
the headline in percent, and the dry-run estimate fits an 80-column terminal."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest

from labeler.labeling.store import LabelStore
from labeler.run.feature_ids import feature_sort_key
from labeler.run.schemas import ReviewDecision
from tests.conftest import CollectedDemo
from tests.fake_llm import FakeLLMServer, oracle
from tests.test_bad_input import LABELER


def cli(*args: str | Path, columns: int = 200, **env: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [*LABELER, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env=os.environ | {"COLUMNS": str(columns)} | env,
    )
    assert result.returncode == 0, result.stderr
    return result


def flat(text: str) -> str:
    """The words of a terminal's text, table borders and line breaks gone."""
    return " ".join(re.sub(r"[\u2500-\u257f]", " ", text).split())


@dataclass(frozen=True)
class Reviewed:
    run: Path
    text: str  # `labeler summarize` as printed, whitespace collapsed
    summary: dict[str, Any]  # `labeler summarize --json`
    started: dt.datetime


@pytest.fixture(scope="module")
def reviewed(labeled: CollectedDemo, tmp_path_factory: pytest.TempPathFactory) -> Reviewed:
    """The heuristic-labeled run with one person's decision (agreeing with the heuristic,
    on one feature) and one skip, summarized."""
    run = tmp_path_factory.mktemp("wording") / "run"
    shutil.copytree(labeled.run, run)
    store = LabelStore(run / "labels.sqlite")
    judged = store.judgments("heuristic")
    language = sorted(
        (fid for fid, s in judged.items()
         if s.judgment is not None and s.judgment.classification.category == "language"),
        key=feature_sort_key,
    )  # fmt: skip
    store.add_review(ReviewDecision(feature_id=language[1], reviewer="ann", action="skip"))
    store.close()
    cli("decide", run, language[0], "--reviewer", "ann", "--category", "language")
    started = dt.datetime.now(dt.UTC).replace(microsecond=0)
    text = flat(cli("summarize", run).stdout)
    summary = json.loads(cli("summarize", run, "--json").stdout)
    return Reviewed(run, text, summary, started)


def test_the_headline_says_what_each_share_is_of(reviewed: Reviewed) -> None:
    final = reviewed.summary["final"]
    r = final["reasoning"]
    assert r["n"] == final["n_labeled"] > r["count"] > 0
    assert (
        f"Reasoning features: {r['share']:.1%} of {final['n_alive_covered']:,} alive features "
        f"(95% CI {r['ci_low']:.1%} to {r['ci_high']:.1%}), estimated from {r['count']:,} "
        f"reasoning of {r['n']:,} labeled features ({r['sample_share']:.1%} of the labeled)"
    ) in reviewed.text
    assert f"{r['count']:,} of {r['n']:,} labeled" not in reviewed.text  # of what?
    assert "share of alive features by category [95% CI]" in reviewed.text


def test_counts_are_pluralised(reviewed: Reviewed) -> None:
    reviews = reviewed.summary["reviews"]
    assert (reviews["n_decisions"], reviews["n_skips"], reviews["reviewers"]) == (1, 1, ["ann"])
    assert "Reviews by 1 reviewer: 1 decision on 1 feature, 1 skip" in reviewed.text
    for wrong in ("1 skips", "1 reviewers", "1 decisions", "1 features"):
        assert wrong not in reviewed.text


def test_agreement_figures_give_their_n_and_flag_a_small_one(reviewed: Reviewed) -> None:
    report = reviewed.summary["agreement"]
    assert report["n_units"] == reviewed.summary["final"]["n_labeled"]
    assert report["n_compared"] == 1 and report["small_sample"] is True
    pairs = [*report["pairs"], *reviewed.summary["judges_vs_humans"]]
    assert [(p["n"], p["kappa"], p["small_sample"]) for p in pairs] == [(1, 1.0, True)] * 2
    assert (
        "all raters: Krippendorff's alpha (nominal) 1.000, percent agreement 100.0%, over the "
        "1 feature labeled by two raters or more (under 30: too few to rely on)"
    ) in reviewed.text
    assert f"over {report['n_units']:,} features" not in reviewed.text
    assert reviewed.text.count("1.000 * 100.0% *") == 2  # each pair's kappa, flagged
    assert "* fewer than 30 features compared: too few to rely on" in reviewed.text


def test_summary_json_says_its_schema_the_tool_and_when(reviewed: Reviewed) -> None:
    from labeler.reporting.summarize import SUMMARY_SCHEMA_VERSION

    written = json.loads((reviewed.run / "summary.json").read_text())
    assert written["schema_version"] == SUMMARY_SCHEMA_VERSION == 2
    assert written["tool_version"] == version("transcoder-labeler")
    made = dt.datetime.fromisoformat(written["created_at"])
    assert made.utcoffset() == dt.timedelta(0)
    assert reviewed.started <= made <= dt.datetime.now(dt.UTC)
    assert {"schema_version", "tool_version", "created_at"} <= set(reviewed.summary)


def test_disputes_tie_in_numeric_order_with_the_votes_as_a_list(reviewed: Reviewed) -> None:
    # Every labeled feature disputed at the same score: the order is the ids' alone.
    rules = reviewed.run / "every-feature.json"
    rules.write_text(json.dumps({"low_confidence": ["low", "medium", "high"],
                                 "min_detection": None}))  # fmt: skip
    queue = json.loads(cli("disputes", reviewed.run, "--json", "--rules", rules).stdout)
    ids = [q["feature_id"] for q in queue]
    assert len(ids) == reviewed.summary["final"]["n_labeled"]
    assert {q["score"] for q in queue} == {0.25}
    assert ids == sorted(ids, key=feature_sort_key) != sorted(ids)
    assert ids.index("L0F52") < ids.index("L0F144")
    judged = reviewed.summary["judges"][0]["rater"]
    for q in queue:
        (vote,) = q["categories"]
        assert re.fullmatch(rf"{judged}=(reasoning|domain|language|uninterpretable)", vote)
    table = flat(cli("disputes", reviewed.run, "--rules", rules, "--limit", "3").stdout)
    assert f"{ids[0]} 0.25 low_confidence {queue[0]['categories'][0]}" in table


def test_plots_say_the_share_of_what_in_percent(reviewed: Reviewed) -> None:
    import matplotlib.pyplot as plt

    from labeler.reporting.agreement import AgreementReport
    from labeler.reporting.agreement_plot import agreement_figure
    from labeler.reporting.plots import comparison_figure, layers_figure
    from labeler.reporting.summarize import RunSummary

    summary = RunSummary.model_validate_json((reviewed.run / "summary.json").read_text())
    r, alive = summary.final.reasoning, summary.final.n_alive_covered
    layers = layers_figure(summary)
    ax = layers.axes[0]
    title = flat(ax.get_title())
    assert "% of each layer's alive features" in title
    assert f"reasoning: {r.share:.1%} of {alive:,} alive features" in title
    assert f"from {r.count:,} reasoning of {r.n:,} labeled" in title
    assert "% of the layer's alive features" in ax.get_ylabel()
    assert ax.get_ylim() == (0.0, 100.0)
    assert ax.yaxis.get_major_formatter()(50, 0) == "50%"
    heights = [bar.get_height() for container in ax.containers for bar in container]
    assert 1 < max(heights) <= 100  # drawn in percent, not as fractions
    first = summary.final.by_layer["0"]
    assert ax.get_xticklabels()[0].get_text() == (
        f"0\n{sum(first.values()):,}/{summary.n_alive_by_layer['0']:,}"
    )
    compared = comparison_figure(summary, summary).axes[0]
    assert "% of each run's alive features" in compared.get_title()
    assert "% of the run's alive features (95% CI)" in compared.get_ylabel()
    assert compared.yaxis.get_major_formatter()(50, 0).startswith("50")
    assert compared.yaxis.get_major_formatter()(50, 0).endswith("%")
    assert summary.agreement is not None
    kappa = agreement_figure(AgreementReport.model_validate(summary.agreement)).axes[0]
    assert "over the 1 feature labeled by two raters or more" in flat(kappa.get_title())
    assert "too few to rely on" in kappa.get_title()
    assert any("n=1 (few)" in t.get_text() for t in kappa.texts)
    for figure in (layers, compared.figure, kappa.figure):
        plt.close(figure)  # type: ignore[arg-type]
    assert (reviewed.run / "summary.png").read_bytes().startswith(b"\x89PNG")


def test_the_dry_run_table_fits_80_columns_with_the_dollars_whole(
    run_copy: Path, tmp_path: Path
) -> None:
    long_name = "openai:Qwen/Qwen2.5-7B-Instruct"
    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps({"prices": {
        long_name: {"input": 1.0, "cached_input": 0.1, "output": 4.0},
        "openai:gpt-5-mini": {"input": 0.25, "cached_input": 0.025, "output": 2.0},
    }}))  # fmt: skip
    with FakeLLMServer(oracle) as fake:
        result = cli(
            "label", run_copy, "--judge", long_name, "--judge", "openai:gpt-5-mini",
            "--judge", "heuristic", "--base-url", f"{fake.base_url}/v1",
            "--prices", prices, "--dry-run",
            columns=80, OPENAI_API_KEY="sk-test-unused",
        )  # fmt: skip
        assert fake.requests == []
    lines = result.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80, result.stdout
    assert "…" not in result.stdout
    dollars = r"\$\d[\d,]*\.\d{4}"
    rows = [line for line in lines if re.search(rf"{dollars} │ +({dollars}|-) │$", line)]
    assert len(rows) == 3, result.stdout  # each judge's dollars, synchronous and batch, whole
    assert "nothing was sent" in result.stdout
    assert not (run_copy / "labels.sqlite").exists()


@pytest.mark.parametrize(
    ("n", "text"),
    [(0, "0"), (9_999, "9,999"), (10_000, "10.0k"), (99_950, "100k"), (182_400, "182k"),
     (999_500, "1.00M"), (6_263_040, "6.26M"), (1_496_000_000, "1.50B"),
     (123_456_789_012, "123B")],
)  # fmt: skip
def test_token_counts_in_the_estimate_are_compact(n: int, text: str) -> None:
    from labeler.cli.render import compact_count

    assert compact_count(n) == text
