"""People's decisions as a gold set that travels between runs (docs/gold.md).

``labeler export RUN --format gold`` writes one JSON line per review decision (skips
are left out), in the order they were made: the decision, the feature it is about, the
adapter and corpus it was made on, and the audits whose usable features include it with
the feature's inclusion probability there (``labeler.audit.estimate.audit_prefixes``).

``labeler import-gold RUN FILE`` stores those decisions as reviews of another run of the
same adapter, say one labeled by another judge, so that its ``summarize`` measures its
judges against the same people. An audit travels with its decisions and is used in the
run it is imported into only when that run labels exactly the features the audit was
drawn from (its ``frame_hash``): elsewhere its probabilities mean nothing, and its
decisions come in as plain gold reviews.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from adapters.outputs import replacing
from collectors.run_format import RunInfo
from labeler.audit.design import frame_hash
from labeler.audit.estimate import audit_prefixes, labeled_population
from labeler.errors import UserError, first_error
from labeler.labeling.store import AuditRow, LabelStore
from labeler.run.feature_ids import feature_sort_key
from labeler.run.schemas import ReviewDecision
from prompts import Category, DomainType, Mechanism, Subcategory

GOLD_SCHEMA_VERSION = 1
SOURCE_PREFIX = "gold:"
"""Imported audits' ``source``: ``gold:{file name}#{audit id in the exporting run}``."""
NAMED = 5
"""Feature ids named in a message about features left out."""


class GoldAudit(BaseModel):
    """An audit of the exporting run whose usable features include the line's feature."""

    model_config = ConfigDict(extra="forbid")

    audit_id: int = Field(description="the audit's id in the exporting run")
    source: str = Field(description="'drawn', or the gold file it was itself imported from")
    weighting: str = Field(description="'uncertainty' or 'uniform' (labeler.audit.design)")
    frame_hash: str = Field(min_length=1, description="the labeled features it was drawn from")
    n_frame: int = Field(ge=1, description="how many features that frame holds")
    probability: float = Field(gt=0.0, le=1.0, description="the feature's inclusion probability")


class GoldLine(BaseModel):
    """One line of a gold file: one person's decision on one feature."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int
    adapter_hash: str = Field(min_length=1, description="run.json's adapter_hash")
    unit: str = Field(min_length=1, description="run.json's unit: feature or neuron")
    corpus_hash: str = Field(description="run.json's corpus_hash")
    run: str = Field(description="the exporting run's folder name")
    feature_id: str = Field(min_length=1)
    layer: int = Field(ge=0)
    index: int = Field(ge=0)
    reviewer: str = Field(min_length=1, pattern=r"\S")
    category: Category
    subcategory: Subcategory | None = None
    mechanism: Mechanism | None = None
    domain_type: DomainType | None = None
    note: str = ""
    decided_at: str = Field(min_length=1, description="UTC, ISO 8601, as the decision was stored")
    audits: list[GoldAudit] = Field(default_factory=list)

    @field_validator("schema_version")
    @classmethod
    def _known_version(cls, version: int) -> int:
        if version != GOLD_SCHEMA_VERSION:
            raise ValueError(f"{version}: this labeler reads gold files of version "
                             f"{GOLD_SCHEMA_VERSION}")  # fmt: skip
        return version

    @model_validator(mode="after")
    def _consistent(self) -> GoldLine:
        """The rules of a review decision (a subcategory only for reasoning, ...)."""
        try:
            self.decision()
        except ValidationError as exc:
            raise ValueError(first_error(exc)[1].removeprefix("Value error, ")) from None
        return self

    def decision(self) -> ReviewDecision:
        """The review decision this line stands for."""
        return ReviewDecision(
            feature_id=self.feature_id, reviewer=self.reviewer, category=self.category,
            subcategory=self.subcategory, mechanism=self.mechanism,
            domain_type=self.domain_type, note=self.note, decided_at=self.decided_at,
        )  # fmt: skip

    def request_key(self) -> str:
        """The key the decision is stored under: the same decision imported again (from
        this file or another export of it) is recognised and not stored twice."""
        fields = self.model_dump(include=_DECISION_FIELDS | {"adapter_hash"})
        digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()
        return f"{SOURCE_PREFIX}{digest[:32]}"


_DECISION_FIELDS = {"feature_id", "reviewer", "category", "subcategory", "mechanism",
                    "domain_type", "note", "decided_at"}  # fmt: skip


def gold_lines(store: LabelStore, info: RunInfo, run_name: str) -> list[GoldLine]:
    """Every decision of the run's reviews as a gold line, in the order made."""
    reviews = [r for r in store.reviews() if r.action == "decide"]
    decided = {r.feature_id for r in reviews}
    audits_of: dict[str, list[GoldAudit]] = {}
    for prefix in audit_prefixes(store, decided):
        audit = prefix.audit
        for fid, pi in zip(prefix.features, prefix.pi, strict=True):
            audits_of.setdefault(fid, []).append(GoldAudit(
                audit_id=audit.audit_id, source=audit.source, weighting=audit.weighting,
                frame_hash=audit.frame_hash, n_frame=audit.n_frame, probability=pi,
            ))  # fmt: skip
    where = {fid: (layer, idx) for fid, layer, idx in store.planned()}
    lines = []
    for review in reviews:
        layer, index = where.get(review.feature_id) or feature_sort_key(review.feature_id)[:2]
        lines.append(GoldLine(
            schema_version=GOLD_SCHEMA_VERSION, adapter_hash=info.adapter_hash, unit=info.unit,
            corpus_hash=info.corpus_hash, run=run_name, layer=layer, index=index,
            audits=audits_of.get(review.feature_id, []),
            **review.model_dump(include=_DECISION_FIELDS),
        ))  # fmt: skip
    return lines


def write_gold(path: Path, lines: Iterable[GoldLine]) -> int:
    """Write the lines to ``path``, whole or not at all; how many were written."""
    n = 0
    with replacing(path) as tmp, tmp.open("w", encoding="utf-8") as out:
        for line in lines:
            out.write(line.model_dump_json() + "\n")
            n += 1
    return n


def read_gold(path: Path) -> list[GoldLine]:
    """Every line of a gold file, validated: a bad line is a :class:`UserError` naming
    ``FILE:LINE`` and its field; lines that disagree on the adapter, or on an audit,
    are refused the same way. Blank lines are skipped."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise UserError(f"{path}: no such file") from exc
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text ({exc.reason})") from exc
    lines: list[GoldLine] = []
    first: dict[str, tuple[int, str]] = {}
    audits: dict[int, tuple[int, GoldAudit]] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            line = GoldLine.model_validate_json(raw)
        except ValidationError as exc:
            problem = exc.errors()[0]
            if problem["type"] == "json_invalid":
                raise UserError(f"{path}:{number}: not a JSON object ({problem['msg']})") from exc
            where, message = first_error(exc)
            if not where:  # the line as a whole: the message names its fields
                where, message = "", message.removeprefix("Value error, ")
            raise UserError(f"{path}:{number}: {where + ': ' if where else ''}{message}") from exc
        for key in ("adapter_hash", "unit"):
            seen, value = first.setdefault(key, (number, getattr(line, key)))
            if (found := getattr(line, key)) != value:
                raise UserError(f"{path}:{number}: {key}: {found!r} differs from line "
                                f"{seen}'s {value!r}; a gold file is of one adapter")  # fmt: skip
        for audit in line.audits:
            seen_at, known = audits.setdefault(audit.audit_id, (number, audit))
            if audit.model_dump(exclude={"probability"}) != known.model_dump(
                exclude={"probability"}
            ):
                raise UserError(f"{path}:{number}: audits: audit {audit.audit_id} differs from "
                                f"line {seen_at}'s audit of that id")  # fmt: skip
        lines.append(line)
    return lines


def check_same_adapter(path: Path, lines: list[GoldLine], info: RunInfo, run: Path) -> None:
    """Refuse decisions made on another adapter's features (or on neurons where the run
    has adapter features): an id names another feature there."""
    if not lines:
        return
    line = lines[0]
    if line.adapter_hash != info.adapter_hash:
        raise UserError(
            f"{path}: adapter_hash {line.adapter_hash} differs from {run}'s "
            f"{info.adapter_hash} (run.json): its decisions are about another adapter's "
            "features; import it into a run of that adapter"
        )
    if line.unit != info.unit:
        raise UserError(f"{path}: unit {line.unit!r} differs from {run}'s {info.unit!r} "
                        f"(run.json, adapter_hash {info.adapter_hash}): its decisions are "
                        "about other features")  # fmt: skip


@dataclass
class AuditOutcome:
    """What became of one audit of a gold file in the run it was imported into."""

    audit_id: int
    source: str
    n_features: int
    added_as: int | None = None
    note: str = ""


@dataclass
class GoldImport:
    """What an import stored and what it left out."""

    imported: int = 0
    already: int = 0
    unplanned: list[str] = field(default_factory=list)
    audits: list[AuditOutcome] = field(default_factory=list)


def import_gold(
    store: LabelStore, lines: list[GoldLine], file_name: str, run_name: str = "the run"
) -> GoldImport:
    """Store the lines' decisions as reviews, and their usable audits, in one transaction
    (all of it or nothing). A decision stored already (imported before, or made in this
    very run) is not stored again; one on a feature the run did not plan is left out.
    ``run_name`` names the run in the notes on audits."""
    result = GoldImport()
    planned = {fid for fid, _, _ in store.planned()}
    made_here = {_identity(r) for r in store.reviews() if r.action == "decide"}
    fresh: set[str] = set()
    with store.transaction():
        for line in lines:
            if line.feature_id not in planned:
                result.unplanned.append(line.feature_id)
                continue
            decision = line.decision()
            if _identity(decision) in made_here:
                result.already += 1
                continue
            _, stored = store.add_review(decision, line.request_key())
            result.imported += stored
            result.already += not stored
            if stored:
                fresh.add(line.feature_id)
        result.audits = _import_audits(store, lines, file_name, fresh, run_name)
    return result


def _identity(decision: ReviewDecision) -> tuple[str | None, ...]:
    return tuple(decision.model_dump(include=_DECISION_FIELDS).values())


def _import_audits(
    store: LabelStore, lines: list[GoldLine], file_name: str, fresh: set[str], run_name: str
) -> list[AuditOutcome]:
    """Add each audit of the file whose frame is this run's labeled features, with each
    of its features' probability, once."""
    probabilities: dict[int, dict[str, float]] = {}
    design: dict[int, GoldAudit] = {}
    for line in lines:
        for audit in line.audits:
            design.setdefault(audit.audit_id, audit)
            probabilities.setdefault(audit.audit_id, {})[line.feature_id] = audit.probability
    current = frame_hash(labeled_population(store))
    present = store.audits.all()
    sources = {a.source: a.audit_id for a in present}
    outcomes = []
    for audit_id, audit in sorted(design.items()):
        features = probabilities[audit_id]
        source = f"{SOURCE_PREFIX}{file_name}#{audit_id}"
        outcome = AuditOutcome(audit_id, audit.source, len(features))
        outcomes.append(outcome)
        if audit.frame_hash != current:
            outcome.note = (f"not usable here: {run_name} labels a different set of features "
                            f"(drawn from {audit.n_frame:,}, frame {audit.frame_hash}; "
                            f"{run_name}'s is {current}); the decisions are imported without "
                            "it")  # fmt: skip
            continue
        if source in sources:
            outcome.note = _imported_before(store, sources[source], len(features))
            continue
        covering = _covering(store, present, current, set(features))
        if covering is not None and not fresh & set(features):
            outcome.note = f"its decisions were all here already, under audit {covering}"
            continue
        row = AuditRow(
            audit_id=0, n_drawn=len(features), seed=None, weighting=audit.weighting,
            n_frame=audit.n_frame, frame_hash=audit.frame_hash, source=source,
            made_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        )  # fmt: skip
        frame = ((fid, None, None, q) for fid, q in sorted(features.items()))
        outcome.added_as = store.audits.add(row, frame)
    return outcomes


def _imported_before(store: LabelStore, audit_id: int, n_file: int) -> str:
    """The note on an audit this file's name brought in already: an audit is never
    changed, so one that has more decided features in this file keeps the ones it was
    imported with (its decisions are still imported)."""
    n_stored = len(store.audits.frame(audit_id))
    note = f"imported before, as audit {audit_id}"
    if n_file != n_stored:
        note += (f" with {n_stored:,} features (this file has {n_file:,}; the audit keeps "
                 "those it was imported with)")  # fmt: skip
    return note


def _covering(
    store: LabelStore, audits: list[AuditRow], current: str, features: set[str]
) -> int | None:
    """An audit of this run on the same frame that holds every one of ``features`` (the
    audit a gold file exported from this run came from)."""
    for audit in audits:
        if audit.frame_hash != current:
            continue
        rows = store.audits.frame(audit.audit_id)
        held = {f for f, _, p, q in rows if p is not None or q is not None}
        if features <= held:
            return audit.audit_id
    return None


def named(ids: list[str]) -> str:
    """The first few ids, and how many more."""
    shown = ", ".join(ids[:NAMED])
    return shown + (f" and {len(ids) - NAMED:,} more" if len(ids) > NAMED else "")
