"""Neuronpedia's bulk-import layout: every line of every file passes copies of the rows
Neuronpedia's admin importer reads (``neuronpedia_utils``' ``db_models`` dataclasses, with the
Explanation table's ``triggeredByUserId`` and the Neuron table's ``sourceSetName``), every
line of a file has the same keys in the same order, and the rows carry what the catalog
holds: one feature per feature with examples, one activation per example, one explanation
per ok judgment, the final label and its source in the notes."""

from __future__ import annotations

import gzip
import json
import math
import re
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal

import pytest
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, TypeAdapter

from labeler.formats import neuronpedia_import
from labeler.formats.catalog import export_catalog
from labeler.formats.neuronpedia_import import write_import_layout
from labeler.labeling.store import LabelStore
from labeler.run.data import RunData
from tests.conftest import CollectedDemo
from tests.test_neuronpedia import Token, at_most_512_units

MODEL, SET = "demo-adapter", "labeler-demo"
BATCH = 100  # rows per batch file in this test, so that a layer (240 features) takes 3
Visibility = Literal["PUBLIC", "UNLISTED", "PRIVATE"]
Index = Annotated[str, Field(pattern=r"^(0|[1-9][0-9]*)$")]


class _Row(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class SourceRelease(_Row):
    name: str
    description: str
    creatorName: str
    creatorId: str
    visibility: Visibility
    isNewUi: bool
    featured: bool
    descriptionShort: str | None
    urls: list[str]
    creatorEmail: str | None
    creatorNameShort: str | None
    defaultSourceSetName: str | None
    defaultSourceId: str | None
    defaultUmapSourceIds: list[str]
    createdAt: datetime


class Model(_Row):
    id: str
    instruct: bool
    creatorId: str
    displayNameShort: str
    displayName: str
    tlensId: str | None
    dimension: int | None
    visibility: Visibility
    defaultSourceSetName: None  # references a source set the importer creates later
    defaultSourceId: None
    inferenceEnabled: bool
    layers: Annotated[int, Field(ge=1)]
    neuronsPerLayer: Annotated[int, Field(ge=0)]
    createdAt: datetime
    owner: Annotated[str, Field(min_length=1)]
    updatedAt: datetime
    website: str | None


class SourceSet(_Row):
    modelId: str
    name: str
    creatorId: str
    hasDashboards: bool
    visibility: Visibility
    description: str
    type: str
    creatorName: str
    urls: list[str]
    creatorEmail: str | None
    releaseName: str | None
    defaultOfModelId: str | None
    defaultRange: int
    defaultShowBreaks: bool
    showDfa: bool
    showCorrelated: bool
    showHeadAttribution: bool
    showUmap: bool
    createdAt: datetime


class Source(_Row):
    id: str
    modelId: str
    setName: str
    creatorId: str
    hasDashboards: bool
    inferenceEnabled: bool
    inferenceHosts: list[str]
    saelensConfig: str | None
    saelensRelease: str | None
    saelensSaeId: str | None
    hfRepoId: str | None
    hfFolderId: str | None
    visibility: Visibility
    defaultOfModelId: str | None
    hasUmap: bool
    hasUmapLogSparsity: bool
    hasUmapClusters: bool
    num_prompts: int | None
    num_tokens_in_prompt: int | None
    dataset: str | None
    notes: str | None
    createdAt: datetime


class Feature(_Row):  # the Neuron table
    modelId: str
    layer: str
    index: Index
    creatorId: str | None
    createdAt: datetime
    maxActApprox: float | None
    hasVector: bool
    vector: list[float]
    vectorLabel: str | None
    vectorDefaultSteerStrength: float | None
    hookName: str | None
    topkCosSimIndices: list[int]
    topkCosSimValues: list[float]
    neuron_alignment_indices: list[int]
    neuron_alignment_values: list[float]
    neuron_alignment_l1: list[float]
    correlated_neurons_indices: list[int]
    correlated_neurons_pearson: list[float]
    correlated_neurons_l1: list[float]
    correlated_features_indices: list[int]
    correlated_features_pearson: list[float]
    correlated_features_l1: list[float]
    neg_str: list[Token]
    neg_values: list[float]
    pos_str: list[Token]
    pos_values: list[float]
    frac_nonzero: Annotated[float, Field(ge=0, le=1)]
    freq_hist_data_bar_heights: list[float]
    freq_hist_data_bar_values: list[float]
    logits_hist_data_bar_heights: list[float]
    logits_hist_data_bar_values: list[float]
    decoder_weights_dist: list[float]
    sourceSetName: str | None


class Activation(_Row):
    id: Annotated[str, Field(pattern=r"^c[0-9a-z]{24}$")]
    tokens: Annotated[list[Token], Field(min_length=1, max_length=1024)]
    index: Index
    layer: str
    modelId: str
    maxValue: float
    maxValueTokenIndex: Annotated[int, Field(ge=0)]
    minValue: float
    values: Annotated[list[float], Field(min_length=1, max_length=1024)]
    creatorId: str
    dataSource: str | None
    dataIndex: str | None
    dfaValues: list[float]
    dfaTargetIndex: int | None
    dfaMaxValue: float | None
    createdAt: datetime
    lossValues: list[float]
    logitContributions: str | None
    binMin: float | None
    binMax: float | None
    binContains: Annotated[float, Field(ge=0, le=1)] | None
    qualifyingTokenIndex: int | None


class Explanation(_Row):
    id: Annotated[str, Field(pattern=r"^c[0-9a-z]{24}$")]
    modelId: str
    layer: str
    index: Index
    description: Annotated[str, Field(min_length=1), AfterValidator(at_most_512_units)]
    authorId: str
    embedding: list[float] | None
    triggeredByUserId: str | None
    typeName: str | None
    explanationModelName: str | None
    notes: str | None
    createdAt: datetime


PLAIN: dict[str, type[_Row]] = {"release": SourceRelease, "model": Model,
                                "sourceset": SourceSet, "source": Source}  # fmt: skip
BATCHED: dict[str, type[_Row]] = {"features": Feature, "activations": Activation,
                                  "explanations": Explanation}  # fmt: skip
LISTS: dict[type[_Row], TypeAdapter[Any]] = {
    SourceRelease: TypeAdapter(list[SourceRelease]), Model: TypeAdapter(list[Model]),
    SourceSet: TypeAdapter(list[SourceSet]), Source: TypeAdapter(list[Source]),
    Feature: TypeAdapter(list[Feature]), Activation: TypeAdapter(list[Activation]),
    Explanation: TypeAdapter(list[Explanation]),
}  # fmt: skip
NOTES = re.compile(r"^\[judge: ([^\]]+)\] \[label: ([^;]+); source: (\w+); "
                   r"detection: ([0-9.]+|n/a)\]$")  # fmt: skip


@dataclass
class Layout:
    folder: Path
    written: int
    reports: list[int]
    lines: dict[tuple[int, int], dict[str, Any]]  # the catalog's, by (layer, index)
    files: dict[Path, list[str]]  # every file's lines (gzip files decompressed), by path
    parsed: dict[Path, list[dict[str, Any]]]  # and parsed

    def source(self, layer: int) -> Path:
        return self.folder / MODEL / f"{layer}-{SET}"

    def batches(self, layer: int, name: str) -> list[Path]:
        """The batch files of one kind, by number; checks that they count from 0."""
        paths = sorted((self.source(layer) / name).iterdir(), key=lambda p: int(p.name[6:-9]))
        assert [p.name for p in paths] == [f"batch-{n}.jsonl.gz" for n in range(len(paths))]
        return paths

    def rows(self, layer: int, name: str) -> list[list[dict[str, Any]]]:
        return [self.parsed[p] for p in self.batches(layer, name)]


@pytest.fixture(scope="module")
def layout(labeled: CollectedDemo, tmp_path_factory: pytest.TempPathFactory) -> Layout:
    """The layout of the labeled demo run, BATCH rows per file, and the catalog."""
    out = tmp_path_factory.mktemp("np-import")
    folder = out / "import"
    folder.mkdir()
    reports: list[int] = []
    store = LabelStore(labeled.run / "labels.sqlite")
    try:
        run = RunData.open(labeled.run)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(neuronpedia_import, "BATCH_ROWS", BATCH)
            written = write_import_layout(run, store, folder, MODEL, SET, progress=reports.append)
        export_catalog(run, store, out / "catalog.jsonl", with_examples=True)
    finally:
        store.close()
    lines = {}
    for text in (out / "catalog.jsonl").read_text(encoding="utf-8").splitlines():
        line = json.loads(text)
        lines[line["layer"], line["index"]] = line
    files = {}
    for path in folder.rglob("*.jsonl*"):
        data = path.read_bytes()
        files[path] = (
            (gzip.decompress(data) if path.suffix == ".gz" else data).decode().splitlines()
        )
    parsed = {path: [json.loads(line) for line in text] for path, text in files.items()}
    return Layout(folder, written, reports, lines, files, parsed)


def test_every_file_is_what_the_importer_reads(layout: Layout) -> None:
    assert (neuronpedia_import.BATCH_ROWS, neuronpedia_import.GZIP_LEVEL) == (1024, 5)
    layers = sorted({layer for layer, _ in layout.lines})
    assert [p.name for p in layout.folder.iterdir()] == [MODEL]
    assert sorted(p.name for p in (layout.folder / MODEL).iterdir()) == sorted(
        f"{layer}-{SET}" for layer in layers
    )
    assert len(layout.reports) == len(layers) and sum(layout.reports) == len(layout.lines)
    assert layout.written == sum(1 for line in layout.lines.values() if line["examples"])
    for path, lines in layout.files.items():
        model = {**PLAIN, **BATCHED}[
            path.name[:-6] if path.suffix == ".jsonl" else path.parent.name
        ]
        assert lines, f"{path} is empty"
        LISTS[model].validate_json(f"[{','.join(lines)}]")  # every line, strictly
        keys = list(model.model_fields)
        assert all(list(row) == keys for row in layout.parsed[path]), f"{path}: keys"
        users = {row.get("creatorId", row.get("authorId")) for row in layout.parsed[path]}
        assert users == {neuronpedia_import.CREATOR_ID}, path  # the documented placeholder
    assert max(len(layout.batches(layer, "features")) for layer in layers) > 1
    shared = None
    for layer in layers:
        source = layout.source(layer)
        assert sorted(p.name for p in source.iterdir()) == sorted(
            [*(f"{name}.jsonl" for name in PLAIN), *BATCHED]
        )
        plain = {}
        for name in PLAIN:
            (line,) = layout.files[source / f"{name}.jsonl"]
            plain[name] = json.loads(line)
        release, model_line, source_set, source_line = plain.values()
        assert source_line["id"] == f"{layer}-{SET}" and source_line["setName"] == SET
        assert model_line["id"] == source_line["modelId"] == source_set["modelId"] == MODEL
        assert model_line["layers"] > max(layers)
        assert source_set["name"] == SET and source_set["releaseName"] == release["name"]
        assert shared in (None, (release, model_line, source_set))
        shared = (release, model_line, source_set)
        for name in BATCHED:
            for batch in layout.rows(layer, name):
                assert {(r["modelId"], r["layer"]) for r in batch} == {(MODEL, f"{layer}-{SET}")}
                # an activations file holds the activations of one features file's features
                assert len({r["index"] for r in batch} if name == "activations" else batch) <= BATCH
                if name == "features":
                    assert {r["sourceSetName"] for r in batch} == {SET}


def _expected_label(label: dict[str, Any]) -> str:
    name = label["category"] or "unlabeled"
    if label["subcategory"]:
        name += f"/{label['subcategory']}"
    return ", ".join([name, *(label[k] for k in ("mechanism", "domain_type") if label[k])])


def test_rows_carry_the_catalogs_features_examples_and_judgments(layout: Layout) -> None:
    lines = layout.lines
    activation_ids: list[str] = []
    explanation_ids: list[str] = []
    n_explanations = 0
    for layer in sorted({layer for layer, _ in lines}):
        feature_batches = layout.rows(layer, "features")
        activation_batches = layout.rows(layer, "activations")
        assert len(activation_batches) == len(feature_batches)
        features = [row for batch in feature_batches for row in batch]
        with_examples = [
            i for (at, i), line in sorted(lines.items()) if at == layer and line["examples"]
        ]
        assert [int(f["index"]) for f in features] == with_examples
        for fbatch, abatch in zip(feature_batches, activation_batches, strict=True):
            assert [f["index"] for f in fbatch] == list(dict.fromkeys(a["index"] for a in abatch))
        by_feature: dict[str, list[dict[str, Any]]] = {}
        for batch in activation_batches:
            for row in batch:
                by_feature.setdefault(row["index"], []).append(row)
                activation_ids.append(row["id"])
        for feature in features:
            line = lines[layer, int(feature["index"])]
            assert feature["pos_str"] == line["top_logits"]
            assert feature["pos_values"] == line["top_logit_values"]
            assert feature["neg_str"] == line["bottom_logits"]
            assert feature["frac_nonzero"] == line["activation_freq"]
            examples, rows = line["examples"], by_feature[feature["index"]]
            assert [r["tokens"] for r in rows] == [e["tokens"] for e in examples]
            assert [r["values"] for r in rows] == [e["acts"] for e in examples]
            assert [r["qualifyingTokenIndex"] for r in rows] == [e["highlight"] for e in examples]
            groups: dict[tuple[str, int | None], list[float]] = {}
            for e in examples:
                groups.setdefault((e["kind"], e["quantile"]), []).append(e["activation"])
            top = len(groups.get(("top", None), []))
            for example, row in zip(examples, rows, strict=True):
                assert row["values"][row["maxValueTokenIndex"]] == row["maxValue"]
                assert row["maxValue"] == max(row["values"]) <= feature["maxActApprox"]
                assert row["minValue"] == min(row["values"])
                group = groups[example["kind"], example["quantile"]]
                if example["kind"] == "random":
                    assert (row["binMin"], row["binMax"], row["binContains"]) == (None,) * 3
                else:
                    share = top / line["activation_count"] if example["kind"] == "top" else 0.1
                    assert (row["binMin"], row["binMax"]) == (min(group), max(group))
                    assert math.isclose(row["binContains"], min(share, 1.0))

        explained: dict[str, list[dict[str, Any]]] = {}
        for batch in layout.rows(layer, "explanations"):
            for row in batch:
                explained.setdefault(row["index"], []).append(row)
                explanation_ids.append(row["id"])
        assert set(explained) <= {f["index"] for f in features}
        for feature in features:
            line = lines[layer, int(feature["index"])]
            ok = {j["judge"]: j for j in line["judgments"]
                  if j["status"] == "ok" and (j["explanation"] or "").strip()}  # fmt: skip
            judges = []
            for row in explained.get(feature["index"], []):
                match = NOTES.fullmatch(row["notes"])
                assert match is not None, row["notes"]
                judge, label, label_source, detection = match.groups()
                judges.append(judge)
                accuracy = (ok[judge]["detection"] or {}).get("accuracy")
                assert label == _expected_label(line["final_label"])
                assert label_source == line["label_source"]
                assert detection == ("n/a" if accuracy is None else f"{accuracy:.2f}")
                assert row["description"] == " ".join(ok[judge]["explanation"].split())[:512]
            n_explanations += len(judges)
            assert sorted(judges) == sorted(ok)
            if line["label_source"] in ("consensus", "single_judge") and ok:
                assert judges[0] == line["label_source_detail"]
    assert n_explanations > 0
    for ids in (activation_ids, explanation_ids):
        assert all(len(i) == 25 for i in ids)
        assert [i for i, n in Counter(ids).items() if n > 1] == []
