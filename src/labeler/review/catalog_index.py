"""The catalog browser's index (``labeler browse``): one row per planned feature with its
final label and what the catalog page filters and sorts by, and a full-text index over
every judge's explanation and rationale, kept in ``RUN/browse-index.sqlite``.

It is built once, from the same catalog lines ``labeler export`` writes, and kept while
the run's labels stay the same: a fingerprint of the label store (judgments, reviews,
output scores, planned features), the features table and the dispute rules is stored
with it and compared at start-up, which takes milliseconds; a stale index is rebuilt in a
temporary file and swapped in, so a killed build leaves the old one or none. A decision
made in the browser refreshes its layer's rows at once.

Full-text search uses SQLite's FTS5 with the ``porter`` stemmer ("hesitating" finds
"hesitation"); a query's words are quoted (no FTS syntax leaks through), all must match,
and the last one matches as a prefix, so results follow the typing.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sqlite3
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from collectors.run_format import FEATURES
from labeler.labeling.store import LabelStore
from labeler.reporting.catalog_lines import LayerReader
from labeler.reporting.disputes import DisputeRules
from labeler.run.data import RunData

log = logging.getLogger(__name__)

INDEX_FILE = "browse-index.sqlite"
INDEX_VERSION = "1"
PER_PAGE = 50
MAX_PER_PAGE = 500
MAX_QUERY_WORDS = 16

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE features (
    id INTEGER PRIMARY KEY,         -- the rowid of the feature's text in `search`
    feature_id TEXT NOT NULL UNIQUE,
    layer INTEGER NOT NULL,
    idx INTEGER NOT NULL,
    category TEXT,
    subcategory TEXT,
    mechanism TEXT,
    domain_type TEXT,
    label_source TEXT NOT NULL,     -- human, consensus, single_judge or none
    judge TEXT,                     -- whose explanation and detection score are shown
    explanation TEXT,
    detection REAL,
    frequency REAL,
    count INTEGER,
    disputed INTEGER NOT NULL,
    reviews INTEGER NOT NULL,
    output_significant INTEGER      -- null: no output score
);
CREATE INDEX features_layer ON features (layer, idx);
CREATE INDEX features_category ON features (category, layer, idx);
CREATE INDEX features_detection ON features (detection);
CREATE INDEX features_frequency ON features (frequency);
CREATE VIRTUAL TABLE search USING fts5(
    explanation, rationale, content='', tokenize='porter unicode61'
);
"""
_COLUMNS = ("id", "feature_id", "layer", "idx", "category", "subcategory", "mechanism",
            "domain_type", "label_source", "judge", "explanation", "detection", "frequency",
            "count", "disputed", "reviews", "output_significant")  # fmt: skip
SHOWN = _COLUMNS[1:]
FACETS = ("category", "subcategory", "mechanism", "domain_type", "label_source", "layer")
SORTS = {
    "feature": ("layer", "idx"),
    "layer": ("layer", "idx"),
    "category": ("category", "layer", "idx"),
    "detection": ("detection", "layer", "idx"),
    "frequency": ("frequency", "layer", "idx"),
    "count": ("count", "layer", "idx"),
    "reviews": ("reviews", "layer", "idx"),
}
_WORD = re.compile(r"\w+", re.UNICODE)


class BadQuery(ValueError):
    """A catalog query parameter that cannot be used; ``field`` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


def index_rows(lines: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """From one layer's catalog lines (``LayerReader.lines``, without examples): the rows
    of ``features`` (without ``id``) and each feature's searchable text.

    The shown judge is the final label's judge for a judges' label, else the first judge
    (by name) with an answer; its explanation and detection accuracy are shown."""
    judged = (
        lines.select("feature_id", "label_source", "label_source_detail", "judgments")
        .explode("judgments")
        .unnest("judgments")
        .filter(pl.col("status") == "ok")
    )
    chosen = pl.when(pl.col("label_source").is_in(["consensus", "single_judge"])).then(
        pl.col("label_source_detail")
    )
    shown = (
        judged.with_columns((pl.col("judge") != chosen).fill_null(True).alias("_later"))
        .sort("feature_id", "_later", "judge")
        .group_by("feature_id", maintain_order=True)
        .agg(
            pl.col("judge").first(),
            pl.col("explanation").first(),
            pl.col("detection").first().struct.field("accuracy").alias("detection"),
        )
    )
    text = judged.group_by("feature_id").agg(
        pl.col("explanation").drop_nulls().str.join(" \n "),
        pl.col("rationale").drop_nulls().str.join(" \n "),
    )
    rows = (
        lines.select(
            "feature_id",
            "layer",
            pl.col("index").alias("idx"),
            pl.col("final_label").struct.unnest(),
            "label_source",
            pl.col("activation_freq").alias("frequency"),
            pl.col("activation_count").alias("count"),
            pl.col("disputed").cast(pl.Int64),
            pl.col("reviews").list.len().cast(pl.Int64).alias("reviews"),
            pl.col("output_score")
            .struct.field("significant")
            .cast(pl.Int64)
            .alias("output_significant"),
        )
        .join(shown, on="feature_id", how="left", maintain_order="left")
        .select(SHOWN)
    )
    texts = rows.select("feature_id").join(text, on="feature_id", how="left", maintain_order="left")
    return rows, texts


def fingerprint(run: RunData, store: LabelStore, rules: DisputeRules) -> dict[str, str]:
    """What the index was built from, cheaply: counts and latest times of the store's
    tables (all indexed), the features table's size and time, the dispute rules."""
    conn = store.conn

    def one(query: str) -> str:
        return json.dumps(list(conn.execute(query).fetchone()))

    features = (run.folder / FEATURES).stat()
    return {
        "version": INDEX_VERSION,
        "planned": one("SELECT count(*), max(feature_id) FROM planned"),
        "judgments": one("SELECT count(*), max(created_at) FROM judgments"),
        "reviews": one("SELECT count(*), max(id) FROM reviews"),
        "output_scores": one("SELECT count(*), max(rowid) FROM output_scores"),
        "features": json.dumps([features.st_size, features.st_mtime_ns]),
        "rules": rules.model_dump_json(),
    }


def build_index(
    run: RunData,
    store: LabelStore,
    rules: DisputeRules,
    path: Path,
    progress: Callable[[int], None] | None = None,
) -> None:
    """Write the index of every planned feature to ``path``, replacing it only once it is
    whole. ``progress`` is told each layer's features."""
    stamp = fingerprint(run, store, rules)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        with closing(sqlite3.connect(tmp)) as conn:
            conn.executescript("PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF;" + _SCHEMA)
            reader = LayerReader(run, store, rules, False, {"run": str(run.folder)}, None)
            layers = [int(r[0]) for r in store.conn.execute(
                "SELECT DISTINCT layer FROM planned ORDER BY layer")]  # fmt: skip
            next_id = 1
            for layer in layers:
                rows, texts = index_rows(reader.lines(layer))
                ids = range(next_id, next_id + rows.height)
                next_id += rows.height
                with conn:
                    conn.executemany(
                        f"INSERT INTO features VALUES ({', '.join('?' * len(_COLUMNS))})",
                        ((i, *row) for i, row in zip(ids, rows.iter_rows(), strict=True)),
                    )
                    conn.executemany(
                        "INSERT INTO search (rowid, explanation, rationale) VALUES (?, ?, ?)",
                        (
                            (i, explanation or "", rationale or "")
                            for i, (_, explanation, rationale) in zip(
                                ids, texts.iter_rows(), strict=True
                            )
                        ),
                    )
                if progress is not None:
                    progress(rows.height)
            with conn:
                conn.executemany("INSERT INTO meta VALUES (?, ?)", stamp.items())
            conn.execute("INSERT INTO search (search) VALUES ('optimize')")
            conn.commit()
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def index_is_current(run: RunData, store: LabelStore, rules: DisputeRules, path: Path) -> bool:
    """Whether ``path`` holds a whole index built from the run as it is now."""
    if not path.exists():
        return False
    try:
        with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
            stored = dict(conn.execute("SELECT key, value FROM meta").fetchall())
    except sqlite3.DatabaseError:
        return False
    return stored == fingerprint(run, store, rules)


def fts_query(text: str) -> str | None:
    """An FTS5 query for what a user typed: its words quoted, all required, the last one
    a prefix; None when it holds no word."""
    words = _WORD.findall(text)[:MAX_QUERY_WORDS]
    if not words:
        return None
    quoted = [f'"{w}"' for w in words]
    quoted[-1] += "*"
    return " ".join(quoted)


@dataclass(frozen=True)
class CatalogQuery:
    """What the catalog page asks for; every field optional."""

    text: str = ""
    category: str | None = None
    subcategory: str | None = None
    mechanism: str | None = None
    domain_type: str | None = None
    label_source: str | None = None
    layer: int | None = None
    detection_min: float | None = None
    detection_max: float | None = None
    frequency_min: float | None = None
    frequency_max: float | None = None
    disputed: bool | None = None
    sort: str = "feature"
    descending: bool = False
    page: int = 1
    per_page: int = PER_PAGE

    @classmethod
    def from_params(cls, params: dict[str, list[str]]) -> CatalogQuery:
        """From URL query parameters; BadQuery names the first unusable one."""
        known = {"q", "category", "subcategory", "mechanism", "domain_type", "label_source",
                 "layer", "detection_min", "detection_max", "frequency_min", "frequency_max",
                 "disputed", "sort", "order", "page", "per_page"}  # fmt: skip
        for name in params:
            if name not in known:
                raise BadQuery(name, f"unknown parameter; use {', '.join(sorted(known))}")
        last = {k: v[-1].strip() for k, v in params.items() if v and v[-1].strip()}

        def number(name: str, low: float, high: float) -> float | None:
            if name not in last:
                return None
            try:
                value = float(last[name])
            except ValueError:
                raise BadQuery(name, f"{last[name]!r} is not a number") from None
            if not low <= value <= high:
                raise BadQuery(name, f"must be between {low:g} and {high:g}")
            return value

        def whole(name: str, low: int, high: int) -> int | None:
            value = number(name, low, high)
            if value is not None and value != int(value):
                raise BadQuery(name, f"{last[name]!r} is not a whole number")
            return None if value is None else int(value)

        sort = last.get("sort", "feature")
        if sort not in SORTS:
            raise BadQuery("sort", f"use one of {', '.join(SORTS)}")
        order = last.get("order", "asc")
        if order not in ("asc", "desc"):
            raise BadQuery("order", "use asc or desc")
        disputed = last.get("disputed")
        if disputed not in (None, "0", "1"):
            raise BadQuery("disputed", "use 1 (disputed only) or 0 (undisputed only)")
        return cls(
            text=last.get("q", "")[:500],
            category=last.get("category"),
            subcategory=last.get("subcategory"),
            mechanism=last.get("mechanism"),
            domain_type=last.get("domain_type"),
            label_source=last.get("label_source"),
            layer=whole("layer", 0, 10_000),
            detection_min=number("detection_min", 0, 1),
            detection_max=number("detection_max", 0, 1),
            frequency_min=number("frequency_min", 0, 1),
            frequency_max=number("frequency_max", 0, 1),
            disputed=None if disputed is None else disputed == "1",
            sort=sort,
            descending=order == "desc",
            page=whole("page", 1, 10_000_000) or 1,
            per_page=whole("per_page", 1, MAX_PER_PAGE) or PER_PAGE,
        )

    def where(self) -> tuple[str, list[Any]]:
        """The SQL condition on ``features`` and its arguments."""
        parts: list[str] = []
        args: list[Any] = []
        for name in ("category", "subcategory", "mechanism", "domain_type", "label_source"):
            value = getattr(self, name)
            if value == "(none)":
                parts.append(f"{name} IS NULL")
            elif value is not None:
                parts.append(f"{name} = ?")
                args.append(value)
        for name, column, op in (
            ("layer", "layer", "="),
            ("detection_min", "detection", ">="),
            ("detection_max", "detection", "<="),
            ("frequency_min", "frequency", ">="),
            ("frequency_max", "frequency", "<="),
        ):
            value = getattr(self, name)
            if value is not None:
                parts.append(f"{column} {op} ?")
                args.append(value)
        if self.disputed is not None:
            parts.append("disputed = ?")
            args.append(int(self.disputed))
        match = fts_query(self.text)
        if match is not None:
            parts.append("id IN (SELECT rowid FROM search WHERE search MATCH ?)")
            args.append(match)
        return (" AND ".join(parts) or "1"), args


class CatalogIndex:
    """The index of one run, open for queries (on the thread that opened it)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.conn = sqlite3.connect(path)
        self._facets: dict[str, list[dict[str, Any]]] | None = None

    def close(self) -> None:
        self.conn.close()

    def query(self, q: CatalogQuery) -> dict[str, Any]:
        """One page of features matching ``q``, and how many match in all."""
        where, args = q.where()
        total = self.conn.execute(f"SELECT count(*) FROM features WHERE {where}", args).fetchone()
        direction = "DESC" if q.descending else "ASC"
        order = ", ".join(
            f"{c} IS NULL, {c} {direction}" if c in ("detection", "frequency", "category")
            else f"{c} {direction}"
            for c in SORTS[q.sort]
        )  # fmt: skip
        rows = self.conn.execute(
            f"SELECT {', '.join(SHOWN)} FROM features WHERE {where} ORDER BY {order} "
            "LIMIT ? OFFSET ?",
            [*args, q.per_page, (q.page - 1) * q.per_page],
        ).fetchall()
        return {
            "total": int(total[0]),
            "page": q.page,
            "per_page": q.per_page,
            "features": [dict(zip(SHOWN, row, strict=True)) for row in rows],
        }

    def facets(self) -> dict[str, list[dict[str, Any]]]:
        """Each filterable field's values with their feature counts."""
        if self._facets is None:
            self._facets = {
                name: [
                    {"value": value, "count": count}
                    for value, count in self.conn.execute(
                        f"SELECT {name}, count(*) FROM features GROUP BY {name} ORDER BY {name}"
                    )
                ]
                for name in FACETS
            }
            total = self.conn.execute("SELECT count(*) FROM features").fetchone()[0]
            self._facets["total"] = [{"value": None, "count": int(total)}]
        return self._facets

    def refresh_layer(
        self, run: RunData, store: LabelStore, rules: DisputeRules, layer: int
    ) -> None:
        """Rebuild one layer's rows from the store (after a decision); their text (the
        judges' answers) does not change. The stored fingerprint takes the new reviews."""
        reader = LayerReader(run, store, rules, False, {"run": str(run.folder)}, None)
        rows, _ = index_rows(reader.lines(layer))
        names = [c for c in SHOWN if c != "feature_id"]
        assignments = ", ".join(f"{c} = ?" for c in names)
        with self.conn:
            self.conn.executemany(
                f"UPDATE features SET {assignments} WHERE feature_id = ?",
                ((*row[1:], row[0]) for row in rows.select("feature_id", *names).iter_rows()),
            )
            stamp = fingerprint(run, store, rules)
            self.conn.execute(
                "UPDATE meta SET value = ? WHERE key = 'reviews'", (stamp["reviews"],)
            )
        self._facets = None


def open_index(
    run: RunData,
    store: LabelStore,
    rules: DisputeRules,
    rebuild: bool = False,
    progress: Callable[[int], None] | None = None,
    on_build: Callable[[str], object] | None = None,
) -> CatalogIndex:
    """The run's index, built first when missing, stale or asked for (``on_build`` is told
    why before it starts)."""
    path = run.folder / INDEX_FILE
    if rebuild or not index_is_current(run, store, rules, path):
        why = "asked to" if rebuild else ("stale" if path.exists() else "missing")
        log.info("building %s (%s)", path, why)
        if on_build is not None:
            on_build(why)
        build_index(run, store, rules, path, progress)
    return CatalogIndex(path)
