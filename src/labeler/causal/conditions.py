"""The conditions an intervention study compares.

- ``baseline``: the adapter model as it is;
- ``hybrid``: the branch off (the base model with the adapter's frame);
- ``ablated``: the adapter model with the selection ablated, against ``baseline``;
- ``added``: the hybrid with only the selection's contributions, against ``hybrid``;
- ``control-K-ablated`` and ``control-K-added``: the same for random control selections
  matched to the selection (``selection.matched_controls``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from adapters.interventions import Intervention
from collectors.run_format import feature_id

Feature = tuple[int, int]
Mode = Literal["ablated", "added"]
MODES: tuple[Mode, ...] = ("ablated", "added")
REFERENCE = {"ablated": "baseline", "added": "hybrid"}
"""What each mode's condition is compared with."""


@dataclass(frozen=True)
class Condition:
    name: str
    features: tuple[Feature, ...] = ()
    mode: Mode | None = None
    control: int | None = None
    """The control selection's number; None for the selection itself."""

    @property
    def intervention(self) -> Intervention:
        if self.mode == "ablated":
            return Intervention.ablating(self.features)
        if self.mode == "added":
            return Intervention.added_to_hybrid(self.features)
        return Intervention(branch=0.0 if self.name == "hybrid" else 1.0)

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "mode": self.mode, "control": self.control,
                "features": [feature_id(*f) for f in self.features]}  # fmt: skip


def conditions(
    selected: Sequence[Feature], controls: Sequence[Sequence[Feature]],
    modes: Sequence[Mode] = MODES,
) -> list[Condition]:  # fmt: skip
    """The study's conditions, references first."""
    out = [Condition("baseline")]
    if "added" in modes:
        out.append(Condition("hybrid"))
    chosen = tuple(sorted(selected))
    for mode in modes:
        out.append(Condition(mode, chosen, mode))
        for k, control in enumerate(controls, 1):
            out.append(Condition(f"control-{k}-{mode}", tuple(sorted(control)), mode, k))
    return out
