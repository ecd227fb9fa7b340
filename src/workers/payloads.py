"""What a stage task carries: everything a worker needs, so workers need no access to
the run folder. The judge travels by name with its options; keys never travel."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from labeler.judges.base import JudgeOptions
from labeler.judges.ratelimit import RateLimits
from labeler.judges.stages import StageName
from labeler.run.schemas import FeatureRecord, Snippet, Usage

PAYLOAD_SCHEMA_VERSION = 1
N_POSITIVES = 5


class StageTask(BaseModel):
    model_config = ConfigDict(extra="forbid")

    schema_version: int = PAYLOAD_SCHEMA_VERSION
    run: str = Field(description="the label store's id")
    feature_id: str
    judge: str
    stage: StageName
    prompt_hash: str = Field(description="the driver's; a worker with other prompts refuses")
    options: JudgeOptions = Field(default_factory=JudgeOptions)
    limits: RateLimits | None = None
    record: FeatureRecord
    negatives: dict[str, list[Snippet]]
    explanation: str | None = None
    carried_usage: dict[str, Usage] = Field(
        default_factory=dict, description="what rescheduled attempts of this stage used"
    )
    reschedules: int = 0


def trimmed(record: FeatureRecord, stage: StageName, n_examples: int) -> FeatureRecord:
    """The record with only the examples the stage shows the model (a staged LLM judge
    uses the first top examples and the first random ones), to keep messages small."""
    if stage in ("label", "fuzz", "intruder"):
        return record  # these show top and random examples
    keep: list[str] = []
    if stage in ("explain", "classify") or stage == "detect_top":
        keep = ["top"]
    elif stage == "detect_random":
        keep = ["random"]
    limit = {"top": max(n_examples, N_POSITIVES), "random": N_POSITIVES}
    examples = [e for kind in keep for e in record.of_kind(kind)[: limit[kind]]]
    return record.model_copy(update={"examples": examples})
