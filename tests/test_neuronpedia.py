"""``labeler export --format neuronpedia``: upload request bodies that Neuronpedia's own
request schemas accept (copied below from its upload, model, source-set and list routes),
carrying each feature's final label, label source and detection score."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated

import polars as pl
from pydantic import BaseModel, ConfigDict, Field

from tests.test_bad_input import labeler
from tests.test_first_hour import one_line_error

Name = Annotated[str, Field(pattern=r"^[a-z][a-z0-9.-]*[a-z0-9]$|^[a-z]$", min_length=2,
                            max_length=32)]  # fmt: skip


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# POST /api/feature/upload-batch (apps/webapp/app/api/feature/upload-batch/route.tsx, yup)
class Logit(_Strict):
    token: str
    value: float


class Explanation(_Strict):
    text: Annotated[str, Field(min_length=1, max_length=512)]
    methodName: str | None = None
    modelName: str | None = None


class Activation(_Strict):
    tokens: Annotated[list[str], Field(min_length=1, max_length=1024)]
    values: Annotated[list[float], Field(min_length=1, max_length=1024)]
    quantileMax: Annotated[float, Field(le=99_999_999)] | None = None
    quantileMin: Annotated[float, Field(le=99_999_999)] | None = None
    quantileFraction: Annotated[float, Field(ge=0, le=1)] | None = None


class Feature(_Strict):
    index: Annotated[int, Field(ge=0, le=10_000_000)]
    density: Annotated[float, Field(ge=0, le=1)] | None = None
    topLogits: Annotated[list[Logit], Field(max_length=20)] | None = None
    bottomLogits: Annotated[list[Logit], Field(max_length=20)] | None = None
    explanations: list[Explanation] | None = None
    activations: Annotated[list[Activation], Field(min_length=1)]


class UploadBatch(_Strict):
    modelId: str
    source: str
    features: Annotated[list[Feature], Field(min_length=1, max_length=128)]


class NewModel(_Strict):  # POST /api/model/new
    id: Name
    layers: Annotated[int, Field(ge=1, le=127)]
    displayName: Annotated[str, Field(min_length=1, max_length=64)] | None = None


class NewSourceSet(_Strict):  # POST /api/source-set/new
    name: Annotated[str, Field(pattern=r"^[a-z][a-z0-9-]*[a-z0-9]$|^[a-z0-9]$")]
    modelId: str
    description: Annotated[str, Field(max_length=128)] | None = None


class ListFeature(_Strict):
    modelId: str
    layer: str
    index: int
    description: str = ""


class NewList(_Strict):  # POST /api/list/new-with-features
    name: Annotated[str, Field(min_length=1)]
    description: str = ""
    features: list[ListFeature]


TAG = re.compile(r" \[label: ([^;]+); source: (\w+); detection: ([0-9.]+|n/a)\]$")


def test_upload_bodies_pass_neuronpedias_schemas_and_carry_the_final_labels(
    labeled_copy: Path, tmp_path: Path
) -> None:
    out = tmp_path / "np"
    result = labeler("export", labeled_copy, "--format", "neuronpedia", "--model-id",
                     "demo-adapter", "--source-set", "labeler-demo", "--out", out)  # fmt: skip
    assert result.returncode == 0, result.stderr
    catalog = tmp_path / "catalog.jsonl"
    assert labeler("export", labeled_copy, "--out", catalog, "--with-examples").returncode == 0
    lines = {}
    for text in catalog.read_text(encoding="utf-8").splitlines():
        line = json.loads(text)
        lines[line["feature_id"]] = line
    model = NewModel.model_validate_json((out / "model.json").read_bytes())
    NewSourceSet.model_validate_json((out / "source-set.json").read_bytes())
    assert model.id == "demo-adapter"

    seen: set[str] = set()
    batches = sorted((out / "upload").glob("batch-*.json"), key=lambda p: int(p.stem[6:]))
    assert [p.stem for p in batches] == [f"batch-{n}" for n in range(len(batches))]
    for path in batches:
        body = UploadBatch.model_validate_json(path.read_bytes())
        layer = int(body.source.split("-", 1)[0])
        assert body.source == f"{layer}-labeler-demo" and body.modelId == "demo-adapter"
        assert len({f.index for f in body.features}) == len(body.features)
        for feature in body.features:
            fid = f"L{layer}F{feature.index}"
            line = lines[fid]
            seen.add(fid)
            assert feature.density == line["activation_freq"]
            assert [t.token for t in feature.topLogits or []] == line["top_logits"][:20]
            assert len(feature.activations) == len(line["examples"])
            shown = [e["tokens"] for e in line["examples"]]
            assert [a.tokens for a in feature.activations] == shown
            ok = [j for j in line["judgments"] if j["status"] == "ok"]
            assert len(feature.explanations or []) == len(ok)
            label = line["final_label"]
            for explanation in feature.explanations or []:
                match = TAG.search(explanation.text)
                assert match is not None, explanation.text
                assert match.group(1).split("/")[0].split(",")[0] == label["category"]
                assert match.group(2) == line["label_source"]
    with_examples = {fid for fid, line in lines.items() if line["examples"]}
    assert seen == with_examples and len(seen) > 0

    lists = [NewList.model_validate(x) for x in json.loads((out / "lists.json").read_bytes())]
    by_list = {x.name: {f"L{f.layer.split('-')[0]}F{f.index}" for f in x.features} for x in lists}
    categories = pl.DataFrame([
        {"fid": fid, "category": lines[fid]["final_label"]["category"]} for fid in seen
    ])  # fmt: skip
    for (category,), group in categories.group_by("category"):
        assert by_list[f"labeler-demo: {category}"] == set(group["fid"].to_list())


def test_bad_names_are_one_line(labeled_copy: Path, tmp_path: Path) -> None:
    result = labeler("export", labeled_copy, "--format", "neuronpedia", "--model-id", "Bad_ID",
                     "--source-set", "x", "--out", tmp_path / "np")  # fmt: skip
    assert "--model-id 'Bad_ID'" in one_line_error(result)
    result = labeler("export", labeled_copy, "--format", "neuronpedia", "--model-id", "demo")
    assert "--source-set" in one_line_error(result)
    assert not (tmp_path / "np").exists()
