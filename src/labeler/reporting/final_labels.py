"""Each feature's final label: a human decision over the judges' consensus over a
single judge, with where it came from recorded.

- ``human``: the reviewers' decisions. Each reviewer's latest decision counts; when
  reviewers disagree the most common category wins, ties going to the latest decision,
  ``reviewers_disagree`` is set and ``source_detail`` lists the reviewers (every decision
  stays in the store and the export).
- ``consensus``: at least two judges labeled the feature and more than half of them gave
  the same category; subcategory, mechanism and domain type come from the preferred
  judge among those that agree (``source_detail`` names it).
- ``single_judge``: otherwise the preferred judge that labeled it: a model judge before
  the heuristic, then the higher detection accuracy, then the judge's name
  (``source_detail``).
- ``none``: no judge labeled it (every judge failed, or it is not labeled yet).
"""

from __future__ import annotations

import polars as pl

from labeler.reporting.label_table import HEURISTIC

SOURCES = ("human", "consensus", "single_judge", "none")
LABEL_FIELDS = ("category", "subcategory", "mechanism", "domain_type")

FINAL_SCHEMA = pl.Schema(
    {
        "feature_id": pl.String,
        "layer": pl.Int32,
        "index": pl.Int32,
        "category": pl.String,
        "subcategory": pl.String,
        "mechanism": pl.String,
        "domain_type": pl.String,
        "source": pl.String,
        "source_detail": pl.String,
        "reviewers_disagree": pl.Boolean,
    }
)


def human_labels(reviews: pl.DataFrame) -> pl.DataFrame:
    """Per reviewed feature: the decided label, the reviewers who decided it, and whether
    reviewers disagree."""
    decided = reviews.filter(pl.col("action") == "decide")
    latest = decided.sort("review_id").group_by("feature_id", "reviewer").last()
    votes = latest.group_by("feature_id", "category").agg(
        pl.len().alias("votes"), pl.col("review_id").max().alias("last_id")
    )
    winner = (
        votes.sort(["feature_id", "votes", "last_id"], descending=[False, True, True])
        .group_by("feature_id", maintain_order=True)
        .first()
        .select("feature_id", "last_id")
    )
    spread = latest.group_by("feature_id").agg(
        (pl.col("category").n_unique() > 1).alias("reviewers_disagree"),
        pl.col("reviewer").sort().str.join(",").alias("source_detail"),
    )
    chosen = latest.join(
        winner, left_on=["feature_id", "review_id"], right_on=["feature_id", "last_id"]
    )
    return chosen.select("feature_id", *LABEL_FIELDS).join(spread, on="feature_id")


def by_preference(judgments: pl.DataFrame) -> pl.DataFrame:
    """Successful judgments, each feature's most trusted first: a model judge before the
    heuristic, then the higher detection accuracy, then the judge's name."""
    return (
        judgments.filter(pl.col("status") == "ok")
        .with_columns(
            (pl.col("judge") == HEURISTIC).alias("_heuristic"),
            pl.col("detection").fill_null(0.0).alias("_detection"),
        )
        .sort(
            ["feature_id", "_heuristic", "_detection", "judge"],
            descending=[False, False, True, False],
        )
        .drop("_heuristic", "_detection")
    )


def judge_labels(judgments: pl.DataFrame) -> pl.DataFrame:
    """Per feature labeled by at least one judge: the consensus or the preferred judge."""
    ok = by_preference(judgments)
    n_ok = ok.group_by("feature_id").agg(pl.len().alias("n_ok"))
    top = (
        ok.group_by("feature_id", "category")
        .agg(pl.len().alias("votes"))
        .join(n_ok, on="feature_id")
        .sort(["feature_id", "votes"], descending=[False, True])
        .group_by("feature_id", maintain_order=True)
        .first()
        .with_columns(
            ((pl.col("n_ok") >= 2) & (pl.col("votes") * 2 > pl.col("n_ok"))).alias("agreed")
        )
        .select("feature_id", pl.col("category").alias("top_category"), "agreed")
    )
    candidates = ok.join(top, on="feature_id", maintain_order="left").filter(
        ~pl.col("agreed") | (pl.col("category") == pl.col("top_category"))
    )
    best = candidates.group_by("feature_id", maintain_order=True).first()
    return best.select(
        "feature_id",
        *LABEL_FIELDS,
        pl.when(pl.col("agreed"))
        .then(pl.lit("consensus"))
        .otherwise(pl.lit("single_judge"))
        .alias("source"),
        pl.col("judge").alias("source_detail"),
    )


def final_labels(
    planned: pl.DataFrame, judgments: pl.DataFrame, reviews: pl.DataFrame
) -> pl.DataFrame:
    """One row per planned feature (FINAL_SCHEMA), whatever its outcome."""
    human = human_labels(reviews).with_columns(pl.lit("human").alias("source"))
    judged = judge_labels(judgments).with_columns(pl.lit(False).alias("reviewers_disagree"))
    judged = judged.join(human.select("feature_id"), on="feature_id", how="anti")
    labels = pl.concat([human.select(judged.columns), judged])
    out = planned.join(labels, on="feature_id", how="left").with_columns(
        pl.col("source").fill_null("none"), pl.col("reviewers_disagree").fill_null(False)
    )
    return out.select(FINAL_SCHEMA.names()).cast(dict(FINAL_SCHEMA))  # type: ignore[arg-type]
