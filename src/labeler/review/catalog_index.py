"""The catalog browser's index (``labeler browse``): one row per planned feature with its
final label and what the catalog page filters and sorts by, and a full-text index over
every judge's explanation, rationale and label and the final label, kept in
``RUN/browse-index.sqlite``.

It is built once, from the same catalog lines ``labeler export`` writes. What it was
built from is stored with it: a fingerprint of the judgments, output scores, planned
features, the features table and the dispute rules, and the last review it holds
(``reviews_synced``). The label store is append-only for reviews, so decisions made
since, by anyone (this server, ``review --web``, ``labeler decide``, another process),
are found by their id and only those features' rows are recomputed: at start-up and
before every catalog answer. A changed fingerprint, an index that fails SQLite's
``quick_check`` (damaged pages behind an intact meta row) or a store with fewer reviews
than the index has seen means a rebuild, written to a temporary file and swapped in, so
a killed build leaves the old index or none. A file replaced or deleted under a running
server is noticed by its inode and reopened (or rebuilt).

Search. Each feature has two documents in two FTS5 tables (contentless: the texts are
not stored twice): ``search`` stems words with the ``porter`` stemmer, ``words`` keeps
them as written; both fold case and diacritics and split at anything that is not a
letter or digit (``self_correction`` is "self correction"); ``words`` also indexes the
first one and two letters of each word (FTS5's ``prefix``), so that the first letters
typed, which match nearly every feature, read one list instead of merging those of
every word they start. A feature ``id`` has its text at rowid ``2 * id`` (every judge's
explanation, rationale and label) and its final label at rowid ``2 * id + 1``. The text
changes only with the judgments (a rebuild); the label changes with reviews, and the
trigger ``relabeled`` replaces the label document whenever a row's label changes, from
the old row's values (a contentless FTS5 table forgets a document only when given
exactly what it was made of).

A query's words (letters and digits, at most ``MAX_QUERY_WORDS``) must all match a
feature, each in its text or its label: every word but the last by its stem ("reasons"
finds "reasoning"), the last by its stem or as the prefix of a word as written. The
stemmed prefix alone did not follow typing: "hesita" stems to itself, a prefix of no
stem ("hesitation" is indexed as "hesit"), so it found nothing between "hesi" and
"hesitation"; the prefix of the written words finds, for every prefix of a word, the
features that have that word. Words are passed as quoted FTS5 strings, so no query
syntax leaks through.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sqlite3
from collections.abc import Callable, Sequence
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import polars as pl

from adapters.outputs import is_no_room
from collectors.run_format import FEATURES
from labeler.errors import UserError
from labeler.labeling.store import LabelStore
from labeler.reporting.catalog_lines import LayerReader
from labeler.reporting.disputes import DisputeRules, find_disputes
from labeler.reporting.final_labels import final_labels
from labeler.reporting.label_table import PLANNED_SCHEMA, REVIEW_SCHEMA, judgment_frame
from labeler.review.queue import audit_places
from labeler.run.data import RunData

log = logging.getLogger(__name__)

INDEX_FILE = "browse-index.sqlite"
INDEX_VERSION = (
    "5"  # 5: audits; 4: every scorer's headline score; 3: the words table, labels searched
)
SYNCED = "reviews_synced"  # the meta key: the id of the last review the rows include
PER_PAGE = 50
MAX_PER_PAGE = 500
MAX_QUERY_WORDS = 16
BUSY_TIMEOUT_S = 60.0  # another server on the same run may be writing the index
_NO_ROOM = ("database or disk is full", "disk i/o error")
_T = TypeVar("_T")

LABEL_FIELDS = ("category", "subcategory", "mechanism", "domain_type")
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
    detection REAL,                 -- the shown judge's detection accuracy
    detection_f1 REAL,              -- its detection F1, fuzzing F1 and intruder accuracy
    fuzz_f1 REAL,                   --   (null where undefined or not scored), and the
    intruder_accuracy REAL,         --   intruder's chance and p-value against it
    intruder_chance REAL,
    intruder_p_value REAL,
    frequency REAL,
    count INTEGER,
    disputed INTEGER NOT NULL,
    reviews INTEGER NOT NULL,
    output_significant INTEGER,     -- null: no output score
    audit_id INTEGER,               -- the first audit that drew it (null: none), its
    audit_position INTEGER,         --   place in that audit's draw order (1 first) and
    audit_size INTEGER              --   how many that audit drew
);
CREATE INDEX features_audit ON features (audit_id, audit_position) WHERE audit_id IS NOT NULL;
CREATE INDEX features_layer ON features (layer, idx);
CREATE INDEX features_category ON features (category, layer, idx);
CREATE INDEX features_detection ON features (detection);
CREATE INDEX features_detection_f1 ON features (detection_f1);
CREATE INDEX features_fuzz_f1 ON features (fuzz_f1);
CREATE INDEX features_intruder_accuracy ON features (intruder_accuracy);
CREATE INDEX features_frequency ON features (frequency);
CREATE VIRTUAL TABLE search USING fts5(text, content='', tokenize='porter unicode61');
CREATE VIRTUAL TABLE words USING fts5(text, content='', tokenize='unicode61', prefix='1 2');
CREATE TRIGGER relabeled AFTER UPDATE OF category, subcategory, mechanism, domain_type
ON features WHEN old.category IS NOT new.category OR old.subcategory IS NOT new.subcategory
    OR old.mechanism IS NOT new.mechanism OR old.domain_type IS NOT new.domain_type
BEGIN
    INSERT INTO search (search, rowid, text) VALUES ('delete', 2 * old.id + 1, {old});
    INSERT INTO words (words, rowid, text) VALUES ('delete', 2 * old.id + 1, {old});
    INSERT INTO search (rowid, text) VALUES (2 * new.id + 1, {new});
    INSERT INTO words (rowid, text) VALUES (2 * new.id + 1, {new});
END;
"""


def _label_text(row: str) -> str:
    """The SQL expression of a ``features`` row's label document (``row``: its name)."""
    return " || ' ' || ".join(f"coalesce({row}.{f}, '')" for f in LABEL_FIELDS)


_SCHEMA = _SCHEMA.format(old=_label_text("old"), new=_label_text("new"))
_FTS_TABLES = ("search", "words")
_COLUMNS = ("id", "feature_id", "layer", "idx", "category", "subcategory", "mechanism",
            "domain_type", "label_source", "judge", "explanation", "detection", "detection_f1",
            "fuzz_f1", "intruder_accuracy", "intruder_chance", "intruder_p_value", "frequency",
            "count", "disputed", "reviews", "output_significant")  # fmt: skip
AUDIT_COLUMNS = ("audit_id", "audit_position", "audit_size")
"""Where a feature stands in an audit (``labeler audit``): written at build, and the
audits are in the fingerprint, so a new audit rebuilds the index. Whether it is decided
is its ``label_source`` (``human``), kept up to date with the reviews."""
AUDIT_FILTERS = ("todo", "all")
SCORE_COLUMNS = ("detection", "detection_f1", "fuzz_f1", "intruder_accuracy")
"""The scores the catalog filters (``NAME_min``, ``NAME_max``) and sorts by: the shown
judge's detection accuracy, detection F1, fuzzing F1 and intruder accuracy
(``labeler.judges.score_values.HEADLINE``, with accuracy kept for links made before)."""
_SHOWN_SCORES = (*SCORE_COLUMNS, "intruder_chance", "intruder_p_value")
_BOUNDS = tuple(f"{c}_{b}" for c in SCORE_COLUMNS for b in ("min", "max"))
_NULLS_LAST = (*_SHOWN_SCORES, "frequency", "category", "audit_id", "audit_position")
_ROW = _COLUMNS[1:]  # what a feature's labels, reviews and scores decide
SHOWN = (*_ROW, *AUDIT_COLUMNS)
FACETS = ("category", "subcategory", "mechanism", "domain_type", "label_source", "layer")
SORTS = {
    "feature": ("layer", "idx"),
    "layer": ("layer", "idx"),
    "category": ("category", "layer", "idx"),
    **{name: (name, "layer", "idx") for name in SCORE_COLUMNS},
    "frequency": ("frequency", "layer", "idx"),
    "count": ("count", "layer", "idx"),
    "reviews": ("reviews", "layer", "idx"),
    "audit": ("audit_id", "audit_position", "layer", "idx"),
}
_WORD = re.compile(r"[^\W_]+")  # as FTS5's unicode61 splits words


class BadQuery(ValueError):
    """A catalog query parameter that cannot be used; ``field`` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


def _scores(detection: str) -> list[pl.Expr]:
    """The shown scores of a frame of judgments whose detection scores are the struct
    ``detection`` and whose other scorers' are the structs ``fuzz`` and ``intruder``."""
    return [
        pl.col(detection).struct.field("accuracy").alias("detection"),
        pl.col(detection).struct.field("f1").alias("detection_f1"),
        pl.col("fuzz").struct.field("f1").alias("fuzz_f1"),
        *(pl.col("intruder").struct.field(n).alias(f"intruder_{n}")
          for n in ("accuracy", "chance", "p_value")),
    ]  # fmt: skip


def index_rows(lines: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """From one layer's catalog lines (``LayerReader.lines``, without examples): the rows
    of ``features`` (without ``id``) and each feature's searchable text."""
    judged = (
        lines.select("feature_id", "label_source", "label_source_detail", "judgments")
        .explode("judgments")
        .unnest("judgments")
        .filter(pl.col("status") == "ok")
        .select(
            "feature_id", "label_source", "label_source_detail", "judge", "explanation",
            "rationale", *_scores("detection"), *LABEL_FIELDS,
        )
    )  # fmt: skip
    labels = lines.select(
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
    return _shown_rows(labels, judged)


def _shown_rows(labels: pl.DataFrame, judged: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The index rows and texts from each feature's label columns and its successful
    judgments (one row each); a text is every judge's explanation, rationale and label.
    The shown judge is the final label's judge for a judges' label, else the first judge
    (by name) with an answer; its explanation and scores are shown. Both the
    full build and the refresh of a few features come here, so that they cannot differ."""
    chosen = pl.when(pl.col("label_source").is_in(["consensus", "single_judge"])).then(
        pl.col("label_source_detail")
    )
    shown = (
        judged.with_columns((pl.col("judge") != chosen).fill_null(True).alias("_later"))
        .sort("feature_id", "_later", "judge")
        .group_by("feature_id", maintain_order=True)
        .agg(pl.col("judge", "explanation", *_SHOWN_SCORES).first())
    )
    text = (
        judged.sort("feature_id", "judge")
        .group_by("feature_id")
        .agg(
            pl.concat_str("explanation", "rationale", *LABEL_FIELDS, separator=" \n ",
                          ignore_nulls=True).str.join(" \n ").alias("text"),
        )
    )  # fmt: skip
    rows = labels.join(shown, on="feature_id", how="left", maintain_order="left").select(_ROW)
    texts = rows.select("feature_id").join(text, on="feature_id", how="left", maintain_order="left")
    return rows, texts


_IN_IDS = "feature_id IN (SELECT value FROM json_each(?))"


def changed_rows(
    store: LabelStore, rules: DisputeRules, index: sqlite3.Connection, feature_ids: Sequence[str]
) -> pl.DataFrame:
    """The ``features`` rows (without ``id``) of a few features, recomputed from their own
    judgments, reviews and output scores: a feature's label and disputes depend on those
    alone. Frequency and count, from the features table, are kept from the index."""
    ids = json.dumps(list(feature_ids))
    planned = pl.DataFrame(
        store.conn.execute(
            f"SELECT feature_id, layer, idx FROM planned WHERE {_IN_IDS} ORDER BY layer, idx",
            (ids,),
        ).fetchall(),
        schema=PLANNED_SCHEMA,
        orient="row",
    )
    judgments = pl.concat(
        [judgment_frame(store, full=True, feature_id=f) for f in planned["feature_id"]],
        how="vertical_relaxed",
    ) if planned.height else judgment_frame(store, full=True, feature_id="")  # fmt: skip
    reviews = pl.DataFrame(
        store.conn.execute(
            "SELECT id, feature_id, reviewer, action, category, subcategory, mechanism, "
            f"domain_type, note, decided_at FROM reviews WHERE {_IN_IDS} ORDER BY id",
            (ids,),
        ).fetchall(),
        schema=REVIEW_SCHEMA,
        orient="row",
    )
    final = final_labels(planned, judgments, reviews)
    disputed = find_disputes(judgments, rules).select("feature_id", pl.lit(1).alias("disputed"))
    kept = pl.DataFrame(
        index.execute(
            f"SELECT feature_id, frequency, count FROM features WHERE {_IN_IDS}", (ids,)
        ).fetchall(),
        schema={"feature_id": pl.String, "frequency": pl.Float64, "count": pl.Int64},
        orient="row",
    )
    scored = pl.DataFrame(
        store.conn.execute(
            f"SELECT feature_id, significant FROM output_scores WHERE {_IN_IDS}", (ids,)
        ).fetchall(),
        schema={"feature_id": pl.String, "output_significant": pl.Int64},
        orient="row",
    )
    counted = reviews.group_by("feature_id").agg(pl.len().cast(pl.Int64).alias("reviews"))
    labels = (
        final.rename({"index": "idx", "source": "label_source"})
        .join(kept, on="feature_id", how="left")
        .join(disputed, on="feature_id", how="left")
        .join(counted, on="feature_id", how="left")
        .join(scored, on="feature_id", how="left")
        .with_columns(pl.col("disputed", "reviews").fill_null(0).cast(pl.Int64))
    )
    judged = (
        judgments.filter(pl.col("status") == "ok")
        .join(final.select("feature_id", pl.col("source").alias("label_source"),
                           pl.col("source_detail").alias("label_source_detail")),
              on="feature_id")
        .select("feature_id", "label_source", "label_source_detail", "judge", "explanation",
                "rationale", *_scores("scores"), *LABEL_FIELDS)
    )  # fmt: skip
    rows, _ = _shown_rows(labels, judged)
    return rows


def fingerprint(run: RunData, store: LabelStore, rules: DisputeRules) -> dict[str, str]:
    """What the index was built from, cheaply: counts and latest times of the store's
    tables (all indexed; the audits too, so a new one rebuilds it), the features table's
    size and time, the dispute rules. Reviews
    are not in it: they are caught up with by id (``SYNCED``)."""
    conn = store.conn

    def one(query: str) -> str:
        return json.dumps(list(conn.execute(query).fetchone()))

    features = (run.folder / FEATURES).stat()
    return {
        "version": INDEX_VERSION,
        "planned": one("SELECT count(*), max(feature_id) FROM planned"),
        "judgments": one("SELECT count(*), max(created_at) FROM judgments"),
        "output_scores": one("SELECT count(*), max(rowid) FROM output_scores"),
        "audits": one("SELECT count(*), max(audit_id) FROM audits"),
        "features": json.dumps([features.st_size, features.st_mtime_ns]),
        "rules": rules.model_dump_json(),
    }


def last_review(store: LabelStore) -> int:
    """The id of the latest review in the store (0: none)."""
    return int(store.conn.execute("SELECT coalesce(max(id), 0) FROM reviews").fetchone()[0])


def build_index(
    run: RunData,
    store: LabelStore,
    rules: DisputeRules,
    path: Path,
    progress: Callable[[int], None] | None = None,
) -> None:
    """Write the index of every planned feature to ``path``, replacing it only once it is
    whole. ``progress`` is told each layer's features. A full disk is a UserError naming
    ``path`` (SQLite's own message names no file)."""
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        _write_index(run, store, rules, tmp, progress)
        tmp.replace(path)
    except (sqlite3.DatabaseError, OSError) as exc:
        if not (is_no_room(exc) or any(s in str(exc).lower() for s in _NO_ROOM)):
            raise
        raise UserError(
            f"{path}: could not write the catalog index ({exc}); free some disk space and "
            "start labeler browse again (the labels are not changed)"
        ) from None
    finally:
        tmp.unlink(missing_ok=True)


def _write_index(
    run: RunData,
    store: LabelStore,
    rules: DisputeRules,
    tmp: Path,
    progress: Callable[[int], None] | None,
) -> None:
    # taken before the reviews are read: a review made meanwhile is caught up with later
    stamp = fingerprint(run, store, rules) | {SYNCED: str(last_review(store))}
    tmp.unlink(missing_ok=True)
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
                    f"INSERT INTO features ({', '.join(_COLUMNS)}) "
                    f"VALUES ({', '.join('?' * len(_COLUMNS))})",
                    ((i, *row) for i, row in zip(ids, rows.iter_rows(), strict=True)),
                )
                documents = [
                    (2 * i, text or "") for i, (_, text) in zip(ids, texts.iter_rows(), strict=True)
                ]
                for table in _FTS_TABLES:
                    conn.executemany(f"INSERT INTO {table} (rowid, text) VALUES (?, ?)", documents)
                    conn.execute(
                        f"INSERT INTO {table} (rowid, text) SELECT 2 * id + 1, "
                        f"{_label_text('features')} FROM features WHERE id >= ? AND id < ?",
                        (ids.start, ids.stop),
                    )
            if progress is not None:
                progress(rows.height)
        with conn:
            conn.executemany(
                "UPDATE features SET audit_id = ?, audit_position = ?, audit_size = ? "
                "WHERE feature_id = ?",
                (
                    (p.audit_id, p.position, p.n_drawn, fid)
                    for fid, p in audit_places(store).items()
                ),
            )
            conn.executemany("INSERT INTO meta VALUES (?, ?)", stamp.items())
        for table in _FTS_TABLES:
            conn.execute(f"INSERT INTO {table} ({table}) VALUES ('optimize')")
        conn.commit()


def index_is_current(run: RunData, store: LabelStore, rules: DisputeRules, path: Path) -> bool:
    """Whether ``path`` holds a whole, undamaged index built from the run as it is now
    (reviews aside: those are caught up with)."""
    if not path.exists():
        return False
    try:
        with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
            stored = dict(conn.execute("SELECT key, value FROM meta").fetchall())
            synced = stored.pop(SYNCED, None)
            if stored != fingerprint(run, store, rules) or synced is None:
                return False
            if int(synced) > last_review(store):  # another store, or reviews went missing
                return False
            # damaged pages behind an intact meta row answer only when read
            return [r[0] for r in conn.execute("PRAGMA quick_check")] == ["ok"]
    except (sqlite3.DatabaseError, ValueError):
        return False


def query_words(text: str) -> list[str]:
    """The words of what a user typed (an underscore separates words, as in label names)."""
    return _WORD.findall(text)[:MAX_QUERY_WORDS]


def search_sql(text: str) -> tuple[str, list[str]] | None:
    """The SQL that selects the ids of the features matching what a user typed, and its
    arguments (FTS5 strings); None when it holds no word. The last word's features (by
    stem or by prefix) come first, then each other word's are intersected with them:
    SQLite evaluates a compound SELECT from left to right."""
    words = query_words(text)
    if not words:
        return None
    stemmed = "SELECT rowid >> 1 FROM search WHERE search MATCH ?"
    *others, last = words
    parts = [f"{stemmed} UNION SELECT rowid >> 1 FROM words WHERE words MATCH ?"]
    args = [f'"{last}"', f'"{last}"*']
    for word in others:
        parts.append(stemmed)
        args.append(f'"{word}"')
    return " INTERSECT ".join(parts), args


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
    detection_f1_min: float | None = None
    detection_f1_max: float | None = None
    fuzz_f1_min: float | None = None
    fuzz_f1_max: float | None = None
    intruder_accuracy_min: float | None = None
    intruder_accuracy_max: float | None = None
    frequency_min: float | None = None
    frequency_max: float | None = None
    disputed: bool | None = None
    audit: str | None = None  # todo: audited features nobody decided; all: every audited one
    sort: str = "feature"
    descending: bool = False
    page: int = 1
    per_page: int = PER_PAGE

    @classmethod
    def from_params(cls, params: dict[str, list[str]]) -> CatalogQuery:
        """From URL query parameters; BadQuery names the first unusable one."""
        known = {"q", "category", "subcategory", "mechanism", "domain_type", "label_source",
                 "layer", "frequency_min", "frequency_max", "disputed", "audit", "sort", "order",
                 "page", "per_page", *_BOUNDS}  # fmt: skip
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

        audit = last.get("audit")
        if audit not in (None, *AUDIT_FILTERS):
            raise BadQuery("audit", "use todo (audited, nobody decided) or all (every audited)")
        sort = last.get("sort", "audit" if audit else "feature")
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
            **{name: number(name, 0, 1) for name in _BOUNDS},
            frequency_min=number("frequency_min", 0, 1),
            frequency_max=number("frequency_max", 0, 1),
            disputed=None if disputed is None else disputed == "1",
            audit=audit,
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
            *(
                (f"{c}_{b}", c, op)
                for c in SCORE_COLUMNS
                for b, op in (("min", ">="), ("max", "<="))
            ),
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
        if self.audit is not None:
            parts.append("audit_id IS NOT NULL")
            if self.audit == "todo":
                parts.append("label_source IS NOT 'human'")
        match = search_sql(self.text)
        if match is not None:
            parts.append(f"id IN ({match[0]})")
            args.extend(match[1])
        return (" AND ".join(parts) or "1"), args


def _identity(path: Path) -> tuple[int, int] | None:
    """Which file ``path`` is now (device, inode); None when there is none."""
    try:
        info = path.stat()
    except FileNotFoundError:
        return None
    return info.st_dev, info.st_ino


class CatalogIndex:
    """The index of one run, open for queries and kept in step with the label store. It
    reads the store through a connection of its own, so it may run on a thread other than
    the one deciding; use it from one thread at a time."""

    def __init__(self, run: RunData, store_path: Path, rules: DisputeRules, path: Path) -> None:
        self.run = run
        self.rules = rules
        self.path = path
        self.store = LabelStore(store_path)
        self.conn: sqlite3.Connection | None = None
        self._opened: tuple[int, int] | None = None  # the file the connection is to
        self._suspect = False  # a failure was seen: check the file before trusting it
        self._facets: dict[str, list[dict[str, Any]]] | None = None

    def close(self) -> None:
        self._drop()
        self.store.close()

    def _drop(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.conn, self._opened, self._facets = None, None, None

    def open(self, checked: bool = False) -> sqlite3.Connection:
        """The connection to the index file as it is now: reopened when the file was
        replaced (another ``browse --rebuild``), rebuilt when it is missing, stale or
        fails its check (skipped when the caller just ``checked`` it)."""
        now = _identity(self.path)
        if self.conn is not None and now == self._opened and not self._suspect:
            return self.conn
        self._drop()
        trusted = checked and now is not None
        if not trusted and not index_is_current(self.run, self.store, self.rules, self.path):
            log.warning("%s is %s; rebuilding it", self.path, "missing" if now is None
                        else "stale or damaged")  # fmt: skip
            build_index(self.run, self.store, self.rules, self.path)
        self._opened = _identity(self.path)  # before connecting: a later swap is noticed
        self.conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, check_same_thread=False)
        self._suspect = False
        return self.conn

    def sync(self) -> sqlite3.Connection:
        """The open index with every review in the store so far: the rows of the features
        reviewed since it was last brought up to date are recomputed (by any writer)."""
        conn = self.open()
        if self._audits_changed(conn):  # an audit drawn meanwhile: rows gain their places
            log.info("%s: an audit was drawn since it was built", self.path)
            self._suspect = True
            conn = self.open()
        row = conn.execute("SELECT value FROM meta WHERE key = ?", (SYNCED,)).fetchone()
        synced, latest = int(row[0]), last_review(self.store)
        if latest == synced:
            return conn
        if latest < synced:  # the store was replaced: its reviews are not the ones indexed
            self._suspect = True
            return self.open()
        reviewed = [r[0] for r in self.store.conn.execute(
            "SELECT DISTINCT feature_id FROM reviews WHERE id > ? AND id <= ?", (synced, latest)
        )]  # fmt: skip
        self.refresh(reviewed, synced=latest)
        return conn

    def _audits_changed(self, conn: sqlite3.Connection) -> bool:
        """Whether the store's audits differ from those the index was built with (a
        rebuild: an audit is drawn rarely, and it places features the build placed)."""
        row = conn.execute("SELECT value FROM meta WHERE key = 'audits'").fetchone()
        now = self.store.conn.execute("SELECT count(*), max(audit_id) FROM audits").fetchone()
        return row is None or json.loads(row[0]) != list(now)

    def refresh(self, feature_ids: Sequence[str], synced: int | None = None) -> None:
        """Recompute these features' rows (their text, the judges' answers, is kept);
        ``synced``: the review id they now include."""
        conn = self.open()
        rows = changed_rows(self.store, self.rules, conn, feature_ids)
        names = [c for c in _ROW if c != "feature_id"]
        assignments = ", ".join(f"{c} = ?" for c in names)
        with conn:
            conn.executemany(
                f"UPDATE features SET {assignments} WHERE feature_id = ?",
                ((*row[1:], row[0]) for row in rows.select("feature_id", *names).iter_rows()),
            )
            if synced is not None:
                conn.execute("UPDATE meta SET value = ? WHERE key = ?", (str(synced), SYNCED))
        self._facets = None

    def _answer(self, read: Callable[[sqlite3.Connection], _T]) -> _T:
        """``read`` on the index brought up to date. A failure to bring it up to date (a
        full disk, a file swapped meanwhile) is logged and the index checked again (and
        rebuilt if need be); a query that still cannot catch up is answered from the rows
        as they are. A read that fails (pages damaged while open) is retried once on the
        checked file."""
        try:
            return read(self._current())
        except sqlite3.DatabaseError as exc:
            log.warning("reading %s failed (%s); checking it", self.path, exc)
            self._suspect = True
        return read(self._current())

    def _current(self) -> sqlite3.Connection:
        """The index brought up to date, checked once more when that fails; as it is when
        it still cannot be (answering from it beats answering nothing)."""
        try:
            return self.sync()
        except sqlite3.DatabaseError as exc:
            log.warning("could not bring %s up to date (%s); checking it", self.path, exc)
            self._suspect = True
        try:
            return self.sync()
        except sqlite3.DatabaseError as exc:
            log.warning("%s stays behind the label store (%s)", self.path, exc)
            return self.open()

    def query(self, q: CatalogQuery) -> dict[str, Any]:
        """One page of features matching ``q``, and how many match in all."""
        return self._answer(lambda conn: _page(conn, q))

    def facets(self) -> dict[str, list[dict[str, Any]]]:
        """Each filterable field's values with their feature counts (kept until a row
        changes)."""
        self._facets = self._answer(lambda conn: self._facets or _facets(conn))
        return self._facets


def _page(conn: sqlite3.Connection, q: CatalogQuery) -> dict[str, Any]:
    where, args = q.where()
    total = conn.execute(f"SELECT count(*) FROM features WHERE {where}", args).fetchone()
    direction = "DESC" if q.descending else "ASC"
    order = ", ".join(
        f"{c} IS NULL, {c} {direction}" if c in _NULLS_LAST
        else f"{c} {direction}"
        for c in SORTS[q.sort]
    )  # fmt: skip
    rows = conn.execute(
        f"SELECT {', '.join(SHOWN)} FROM features WHERE {where} ORDER BY {order} LIMIT ? OFFSET ?",
        [*args, q.per_page, (q.page - 1) * q.per_page],
    ).fetchall()
    return {
        "total": int(total[0]),
        "page": q.page,
        "per_page": q.per_page,
        "features": [dict(zip(SHOWN, row, strict=True)) for row in rows],
    }


def _facets(conn: sqlite3.Connection) -> dict[str, list[dict[str, Any]]]:
    facets = {
        name: [
            {"value": value, "count": count}
            for value, count in conn.execute(
                f"SELECT {name}, count(*) FROM features GROUP BY {name} ORDER BY {name}"
            )
        ]
        for name in FACETS
    }
    total = conn.execute("SELECT count(*) FROM features").fetchone()[0]
    facets["total"] = [{"value": None, "count": int(total)}]
    todo, audited = conn.execute(
        "SELECT count(*) FILTER (WHERE label_source IS NOT 'human'), count(*) FROM features "
        "WHERE audit_id IS NOT NULL"
    ).fetchone()
    facets["audit"] = [
        {"value": "todo", "count": int(todo)},
        {"value": "all", "count": int(audited)},
    ]
    return facets


def open_index(
    run: RunData,
    store: LabelStore,
    rules: DisputeRules,
    rebuild: bool = False,
    progress: Callable[[int], None] | None = None,
    on_build: Callable[[str], object] | None = None,
) -> CatalogIndex:
    """The run's index, built first when missing, stale, damaged or asked for
    (``on_build`` is told why before it starts), and caught up with the reviews."""
    path = run.folder / INDEX_FILE
    if rebuild or not index_is_current(run, store, rules, path):
        why = "asked to" if rebuild else ("stale" if path.exists() else "missing")
        log.info("building %s (%s)", path, why)
        if on_build is not None:
            on_build(why)
        build_index(run, store, rules, path, progress)
    index = CatalogIndex(run, store.path, rules, path)
    index.open(checked=True)
    index.sync()
    return index
