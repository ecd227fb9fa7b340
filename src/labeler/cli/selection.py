"""Which features a command acts on: ``--select FIELD=VALUE[,...]`` (by final label,
repeatable) and ``--features FILE`` (one feature id a line), as ``labeler intervene``,
``labeler score-outputs`` and ``labeler export --format html`` take them."""

from __future__ import annotations

from pathlib import Path

from labeler.cli.app import _open_labels
from labeler.errors import UserError


def read_feature_ids(ids_file: Path) -> list[tuple[int, tuple[int, int]]]:
    """The feature ids of a file (``L{layer}F{index}``, one a line, ``#`` starts a comment,
    blank lines skipped), each with its line number; a bad line is a UserError naming
    FILE:LINE."""
    from collectors.run_format import parse_feature_id

    if not ids_file.is_file():
        raise UserError(f"{ids_file}: no such file of feature ids")
    ids: list[tuple[int, tuple[int, int]]] = []
    for number, line in enumerate(ids_file.read_text(encoding="utf-8").splitlines(), 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        try:
            ids.append((number, parse_feature_id(text)))
        except ValueError as exc:
            raise UserError(f"{ids_file}:{number}: {exc}") from exc
    return ids


def selected_features(
    run: Path, groups: tuple[str, ...], ids_file: Path | None
) -> list[tuple[int, int]]:
    """The features chosen by final label (``groups``), from a file of ids, or both, as
    sorted (layer, index) pairs; a UserError when nothing is chosen or nothing matches."""
    if not groups and ids_file is None:
        raise UserError("choose the features: --select FIELD=VALUE[,...] (repeatable) "
                        "or --features FILE (one feature id a line)")  # fmt: skip
    chosen: set[tuple[int, int]] = set()
    if groups:
        from labeler.causal.selection import parse_group, select
        from labeler.reporting.final_labels import final_labels
        from labeler.reporting.label_table import judgment_frame, planned_frame, review_frame

        parsed = [parse_group(g) for g in groups]  # errors before the store is read
        store = _open_labels(run)
        try:
            planned = planned_frame(store)
            judgments = judgment_frame(store).join(
                planned.select("feature_id", "layer"), on="feature_id"
            )
            final = final_labels(planned, judgments, review_frame(store))
        finally:
            store.close()
        picked = select(final, parsed)
        chosen |= {
            (int(la), int(i)) for la, i in zip(picked["layer"], picked["index"], strict=True)
        }
    if ids_file is not None:
        chosen |= {feature for _, feature in read_feature_ids(ids_file)}
    if not chosen:
        what = " or ".join(filter(None, [", ".join(groups) if groups else "",
                                         str(ids_file) if ids_file else ""]))  # fmt: skip
        raise UserError(f"{run}: no feature matches {what}")
    return sorted(chosen)
