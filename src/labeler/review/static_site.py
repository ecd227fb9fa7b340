"""``labeler export RUN --format html``: the catalog and feature pages as a folder of
files, opened from disk (``file://``) with no server and no network.

Layout: ``OUT/index.html``, the catalog of the exported features (``static_catalog.html``:
word search, category filter, sortable columns, pages of rows), and
``OUT/features/L{layer}F{index}.html``, one review page (``review_page.html``) per
feature in its static mode. Nothing else: no script, style or font is fetched.

Each page carries its data in ``<script type="application/json" id="static-data">``: a
feature page the server's ``/api/session`` answer (``static: true``, the run's folder
name only), the feature's :func:`labeler.review.feature_page.feature_payload` (with
its neighbours when ``labeler browse`` has built the run's index of them), its final
label as the catalog shows it, and which of the feature ids the payload names are
exported too (the pages it may link to); the catalog its rows, as ``labeler browse``'s
index computes them (:func:`labeler.review.catalog_index.index_rows`). The JSON is
written with ``<``, ``>``, ``&``, U+2028 and U+2029 escaped, so no text in it can close
the script element or start markup. Every page states its own Content-Security-Policy
in a ``<meta>``: its inline script and style by a fresh nonce, nothing else (no
connections, images, frames, forms or base URL), and Trusted Types, so that an
HTML-string sink throws. The pages put every text in through text nodes, as served.

The folder is written beside ``OUT`` and renamed into place when whole; an existing
``OUT`` is replaced only when asked to.
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
import re
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from collectors.run_format import publish
from labeler.errors import UserError
from labeler.labeling.store import LabelStore
from labeler.reporting.catalog_lines import LayerReader
from labeler.reporting.disputes import DisputeRules
from labeler.review.catalog_index import AUDIT_COLUMNS, SHOWN, index_rows
from labeler.review.feature_page import feature_payload
from labeler.review.neighbours import NeighbourIndex
from labeler.review.queue import audit_places
from labeler.review.web import NONCE_MARK, Request, ReviewApp, read_page
from labeler.run.data import RunData

log = logging.getLogger(__name__)

CATALOG_PAGE = "static_catalog.html"
INDEX = "index.html"
FEATURES_DIR = "features"
ANNOUNCE_OVER = 20_000  # pages: more than this, the estimated size is said first
_ID = re.compile(r"L\d+F\d+")
_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026",
            "\u2028": "\\u2028", "\u2029": "\\u2029"}  # fmt: skip
_UNSAFE = re.compile("[<>&\u2028\u2029]")
_SCRIPT = '<script nonce="' + NONCE_MARK + '">'


@dataclass(frozen=True)
class StaticExport:
    """What was written: the folder, its feature pages and their sizes in bytes."""

    folder: Path
    pages: int
    catalog_bytes: int
    pages_bytes: int
    largest_page_bytes: int
    largest_page: str | None
    neighbours: bool  # whether the run's neighbour index (labeler browse) was there to show

    @property
    def total_bytes(self) -> int:
        return self.catalog_bytes + self.pages_bytes

    @property
    def mean_page_bytes(self) -> float:
        return self.pages_bytes / self.pages if self.pages else 0.0


def policy(nonce: str) -> str:
    """A static page's Content-Security-Policy: its own inline script and style, and
    nothing else (``frame-ancestors`` has no effect in a ``<meta>``, so it is left out)."""
    own = f"'nonce-{nonce}'"
    return (
        f"default-src 'none'; script-src {own}; style-src {own}; connect-src 'none'; "
        "img-src 'none'; font-src 'none'; media-src 'none'; object-src 'none'; "
        "frame-src 'none'; worker-src 'none'; manifest-src 'none'; base-uri 'none'; "
        "form-action 'none'; require-trusted-types-for 'script'; trusted-types 'none'"
    )


def _finite(value: Any) -> Any:
    """``value`` with every NaN or infinity as None (JSON has neither)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def embed_json(data: Any) -> str:
    """``data`` as JSON safe inside a ``<script>`` element: no ``<``, ``>`` or ``&`` (so
    no ``</script>`` or ``<!--``), no line separators; JSON.parse reads it unchanged."""
    text = json.dumps(_finite(data), ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return _UNSAFE.sub(lambda m: _ESCAPES[m.group()], text)


class _Template:
    """A package page made static: its CSP ``<meta>`` first in the head and its data
    element before its script; filled per page with a fresh nonce and the data."""

    def __init__(self, name: str) -> None:
        page = read_page(name)
        head = '<meta charset="utf-8">'
        if head not in page or _SCRIPT not in page:
            raise UserError(f"{name}: no {head} or {_SCRIPT} to make a static page of")
        meta = f'{head}\n<meta http-equiv="Content-Security-Policy" content="__CSP_POLICY__">'
        page = page.replace(head, meta, 1)
        before, after = page.split(_SCRIPT, 1)
        self.before = before + '<script type="application/json" id="static-data">'
        self.after = "</script>\n" + _SCRIPT + after

    def fill(self, data: Any) -> bytes:
        nonce = secrets.token_urlsafe(18)

        def own(part: str) -> str:
            return part.replace("__CSP_POLICY__", policy(nonce)).replace(NONCE_MARK, nonce)

        return (own(self.before) + embed_json(data) + own(self.after)).encode("utf-8")


def static_session(run: RunData, store: LabelStore, rules: DisputeRules) -> dict[str, Any]:
    """The server's ``/api/session`` answer for a static copy: no reviewer, the run's
    folder name (not its path on this machine), ``static``."""
    app = ReviewApp(run, store, rules, "", include_decided=False)
    app.catalog = True
    session: dict[str, Any] = json.loads(app._session(Request("GET", "/api/session")).body)
    return session | {"run": run.folder.name, "static": True}


def catalog_rows(
    run: RunData, store: LabelStore, rules: DisputeRules, feature_ids: Iterable[str]
) -> pl.DataFrame:
    """The catalog rows of these features (``SHOWN`` columns, by layer and index), as
    ``labeler browse``'s index has them, their places in an audit included."""
    wanted = set(feature_ids)
    planned = store.conn.execute("SELECT feature_id, layer FROM planned").fetchall()
    layers = sorted({int(layer) for fid, layer in planned if fid in wanted})
    reader = LayerReader(run, store, rules, False, {"run": str(run.folder)}, None)
    frames = []
    for layer in layers:
        rows, _ = index_rows(reader.lines(layer))
        frames.append(rows.filter(pl.col("feature_id").is_in(list(wanted))))
    places = audit_places(store)
    audits = pl.DataFrame(
        [(f, p.audit_id, p.position, p.n_drawn) for f, p in places.items()],
        schema={"feature_id": pl.String, **{c: pl.Int64 for c in AUDIT_COLUMNS}},
        orient="row",
    )
    if not frames:
        return pl.DataFrame(schema={c: pl.String for c in SHOWN})
    rows = pl.concat(frames, how="vertical_relaxed").join(audits, on="feature_id", how="left")
    return rows.sort("layer", "idx").select(SHOWN)


def _named_ids(value: Any, found: set[str]) -> set[str]:
    """Every feature id among the strings of ``value`` (a feature page's JSON)."""
    if isinstance(value, str):
        if _ID.fullmatch(value):
            found.add(value)
    elif isinstance(value, dict):
        for item in value.values():
            _named_ids(item, found)
    elif isinstance(value, list):
        for item in value:
            _named_ids(item, found)
    return found


class _PageWriter:
    """Writes feature pages into ``folder``: a feature's payload, its final label and the
    exported ids it names, in the review page made static."""

    def __init__(
        self,
        run: RunData,
        store: LabelStore,
        rules: DisputeRules,
        session: dict[str, Any],
        exported: frozenset[str],
        folder: Path,
    ) -> None:
        self.run, self.store, self.rules = run, store, rules
        self.session, self.exported, self.folder = session, exported, folder
        self.template = _Template("review_page.html")
        self.neighbours = NeighbourIndex.open(run.folder)  # None: not built (labeler browse)

    def write(self, feature_id: str, final: dict[str, Any]) -> int:
        """Write one feature's page; its size in bytes."""
        payload = feature_payload(self.run, self.store, self.rules, feature_id, self.neighbours)
        payload["neighbour_notes"] = {  # the checkpoint's folder by name, not where it lies
            kind: note.replace(self.run.info.adapter_path, Path(self.run.info.adapter_path).name)
            for kind, note in payload["neighbour_notes"].items()
        }
        body = self.template.fill({
            "session": self.session,
            "feature": payload,
            "final": final,
            "exported": sorted(_named_ids(payload, set()) & self.exported),
        })  # fmt: skip
        (self.folder / f"{feature_id}.html").write_bytes(body)
        return len(body)


_WORKER: list[_PageWriter] = []  # a pool process's writer


def _start_worker(
    run_folder: Path,
    store_path: Path,
    rules: DisputeRules,
    session: dict[str, Any],
    exported: frozenset[str],
    folder: Path,
) -> None:
    """A pool process opens the run and the label store once."""
    run = RunData.open(run_folder)
    _WORKER.append(_PageWriter(run, LabelStore(store_path), rules, session, exported, folder))


def _write_chunk(chunk: list[tuple[str, dict[str, Any]]]) -> list[tuple[str, int]]:
    writer = _WORKER[0]
    return [(fid, writer.write(fid, final)) for fid, final in chunk]


def export_html(
    run: RunData,
    store: LabelStore,
    rules: DisputeRules,
    feature_ids: Sequence[str],
    out: Path,
    progress: Callable[[int], None] | None = None,
    overwrite: bool = False,
    announce: Callable[[str], object] | None = None,
    jobs: int = 1,
) -> StaticExport:
    """Write the catalog of ``feature_ids`` (planned features) and one page each to
    ``out``; ``progress`` is told the pages written, ``announce`` (and the log) the
    estimated size before more than ``ANNOUNCE_OVER`` pages. ``jobs`` processes write
    the pages (each opens the run and the store; one: this process alone)."""
    if not feature_ids:
        raise UserError(f"{run.folder}: no features to export")
    for fid in feature_ids:
        if not _ID.fullmatch(fid):
            raise UserError(f"{fid!r}: not a feature id of the form L{{layer}}F{{index}}")
    if out.exists() and not overwrite:
        raise UserError(f"{out}: already exists; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        result = _write(run, store, rules, list(feature_ids), staging, progress, announce, jobs)
        publish(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return StaticExport(out, *result)


_FINAL = ("category", "subcategory", "mechanism", "domain_type", "label_source", "judge")
CHUNK = 32  # pages a pool process writes per task


def _write(
    run: RunData,
    store: LabelStore,
    rules: DisputeRules,
    feature_ids: list[str],
    folder: Path,
    progress: Callable[[int], None] | None,
    announce: Callable[[str], object] | None,
    jobs: int,
) -> tuple[int, int, int, int, str | None, bool]:
    rows = catalog_rows(run, store, rules, feature_ids)
    exported = frozenset(rows["feature_id"].to_list())
    missing = [f for f in feature_ids if f not in exported]
    if missing:
        raise UserError(f"{missing[0]}: not planned in {run.folder}")
    session = static_session(run, store, rules)
    todo = [(r["feature_id"], {k: r[k] for k in _FINAL}) for r in rows.iter_rows(named=True)]
    pages = folder / FEATURES_DIR
    pages.mkdir()
    writer = _PageWriter(run, store, rules, session, exported, pages)
    sizes: dict[str, int] = {}
    first, final = todo[0]
    sizes[first] = writer.write(first, final)
    if progress is not None:
        progress(1)
    if len(todo) > ANNOUNCE_OVER:
        estimate = len(todo) * sizes[first]
        message = (
            f"writing {len(todo):,} feature pages: about {estimate / 2**30:.1f} GiB "
            f"({len(todo):,} x the first page's {sizes[first] / 2**10:.0f} KiB)"
        )
        log.info(message)
        if announce is not None:
            announce(message)
    rest = todo[1:]
    if jobs > 1 and len(rest) > CHUNK:
        chunks = [rest[i : i + CHUNK] for i in range(0, len(rest), CHUNK)]
        pool = ProcessPoolExecutor(
            min(jobs, len(chunks)),
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_start_worker,
            initargs=(run.folder, store.path, rules, session, exported, pages),
        )
        try:
            for written in pool.map(_write_chunk, chunks):
                sizes.update(written)
                if progress is not None:
                    progress(len(written))
        finally:
            pool.shutdown(cancel_futures=True)
    else:
        for fid, final in rest:
            sizes[fid] = writer.write(fid, final)
            if progress is not None:
                progress(1)
    catalog = _Template(CATALOG_PAGE).fill({
        "run": session["run"],
        "columns": list(rows.columns),
        "rows": [list(r) for r in rows.iter_rows()],
        "features": FEATURES_DIR,
    })  # fmt: skip
    (folder / INDEX).write_bytes(catalog)
    largest = max(sizes, key=lambda f: sizes[f])
    found = writer.neighbours is not None
    return len(sizes), len(catalog), sum(sizes.values()), sizes[largest], largest, found
