"""The paper's per-feature JSON (circuit-tracer viewer format): import into a run folder, export a
run folder to it, the round trips both ways, and refusals of bad input that name the file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
from pydantic import BaseModel

from collectors.errors import RunFolderError
from collectors.run_format import (
    EXAMPLES,
    FEATURES,
    NEGATIVES,
    REGIONS,
    RUN_SCHEMA_VERSION,
    THINK_BINS,
    CollectParams,
    RunInfo,
    write_run_info,
)
from labeler.errors import USER_ERRORS, UserError
from labeler.formats.circuit_tracer import (
    EXAMPLES_SCHEMA,
    METADATA_JSON,
    NEGATIVES_SCHEMA,
    CircuitTracerError,
    cantor_unpair,
    export_circuit_tracer,
    import_circuit_tracer,
)
from labeler.run.data import RunData
from tests.conftest import CollectedDemo
from tests.test_bad_input import labeler

PAPER_KEYS = ("total_tokens", "tokens_per_domain", "tokens_per_region", "tokens_per_thinking_bin",
              "features")  # fmt: skip
VOCAB = [" Wait", " so", ",", " the", " x", "<think>", " Hmm", "\n\n", " é", " 2", "=", " check"]
DOMAIN_TOKENS = {"math": 7000, "code": 2000, "science": 1000}
REGION_TOKENS = {"bos": 20, "user_marker": 20, "question": 1460, "assistant_marker": 20,
                 "think_start": 20, "thinking": 7000, "think_end": 20, "answer": 1440}  # fmt: skip
BIN_TOKENS = [700] * THINK_BINS
TOTAL = 10_000


def cantor(layer: int, index: int) -> int:
    return (layer + index) * (layer + index + 1) // 2 + index


def f32(x: float) -> float:
    return float(np.float32(x))


def _example(rng: np.random.Generator, peak: float) -> dict[str, Any]:
    before, after = int(rng.integers(0, 6)), int(rng.integers(0, 4))
    width = before + 1 + after
    acts = [f32(rng.uniform(0.1, peak)) if rng.random() < 0.3 else 0.0 for _ in range(width)]
    acts[before] = f32(peak)
    return {
        "tokens": [VOCAB[i] for i in rng.integers(0, len(VOCAB), width)],
        "tokens_acts_list": acts,
        "train_token_ind": before,
        "is_repeated_datapoint": False,
    }


def _split(rng: np.random.Generator, total: int, names: list[str]) -> dict[str, int]:
    """``total`` split among some of ``names`` (the paper lists only nonzero counts)."""
    cuts = np.sort(rng.integers(0, total + 1, len(names) - 1))
    parts = np.diff(np.concatenate([[0], cuts, [total]]))
    return {n: int(p) for n, p in zip(names, parts, strict=True) if p > 0}


def write_paper_folder(
    root: Path, features: dict[int, list[int]], n_quantiles: int = 3, seed: int = 0
) -> Path:
    """A folder as the paper's collection script writes it: ``features/{cantor}.json`` per alive
    feature (``json.dump``, keys in the script's order, float32 activations, act_min/act_max over
    every token of the windows written) and ``feature_metadata.json`` with its counts."""
    rng = np.random.default_rng(seed)
    (root / "features").mkdir(parents=True)
    meta_features = []
    for layer in sorted(features):
        for index in sorted(features[layer]):
            top = sorted(
                (_example(rng, rng.uniform(5, 10)) for _ in range(int(rng.integers(2, 5)))),
                key=lambda e: -e["tokens_acts_list"][e["train_token_ind"]],
            )
            quantiles = [
                {
                    "quantile_name": f"Quantile {q}",
                    "examples": [_example(rng, 1 + q) for _ in range(int(rng.integers(1, 3)))],
                }
                for q in reversed(range(n_quantiles))
            ]
            random = [_example(rng, rng.uniform(0.5, 5)) for _ in range(int(rng.integers(1, 4)))]
            written = top + [e for q in quantiles for e in q["examples"]] + random
            all_acts = [a for e in written for a in e["tokens_acts_list"]]
            count = int(rng.integers(50, 500))
            by_domain = _split(rng, count, list(DOMAIN_TOKENS))
            by_region = _split(rng, count, list(REGION_TOKENS))
            in_thinking = by_region.get("thinking", 0)
            by_bin = [0] * THINK_BINS
            for b in rng.integers(0, THINK_BINS, in_thinking):
                by_bin[int(b)] += 1
            record = {
                "top_logits": [VOCAB[i] for i in rng.integers(0, len(VOCAB), 10)],
                "bottom_logits": [VOCAB[i] for i in rng.integers(0, len(VOCAB), 10)],
                "act_min": min(all_acts),
                "act_max": max(all_acts),
                "examples_quantiles": [
                    {"quantile_name": "Top activations", "examples": top},
                    *quantiles,
                    {"quantile_name": "Random samples", "examples": random},
                ],
                "activation_frequency": count / TOTAL,
                "layer": layer,
                "feature": index,
            }
            with (root / "features" / f"{cantor(layer, index)}.json").open("w") as fh:
                json.dump(record, fh)
            meta_features.append(
                {
                    "layer": layer,
                    "feature": index,
                    "cantor_id": cantor(layer, index),
                    "activation_count": count,
                    "activation_freq": count / TOTAL,
                    "domain_density": {d: n / DOMAIN_TOKENS[d] for d, n in by_domain.items()},
                    "domain_fraction": {d: n / count for d, n in by_domain.items()},
                    "region_density": {r: n / REGION_TOKENS[r] for r, n in by_region.items()},
                    "region_fraction": {r: n / count for r, n in by_region.items()},
                    "thinking_position_density": [
                        n / t if t > 0 else 0 for n, t in zip(by_bin, BIN_TOKENS, strict=True)
                    ],
                    "thinking_position_fraction": [
                        n / in_thinking if in_thinking > 0 else 0 for n in by_bin
                    ],
                }
            )
    metadata = {
        "total_tokens": TOTAL,
        "tokens_per_domain": DOMAIN_TOKENS,
        "tokens_per_region": REGION_TOKENS,
        "tokens_per_thinking_bin": BIN_TOKENS,
        "features": meta_features,
    }
    with (root / METADATA_JSON).open("w") as fh:
        json.dump(metadata, fh)
    return root


LAYOUT = {0: [0, 2, 5], 3: [1, 4]}


@pytest.fixture
def paper(tmp_path: Path) -> Path:
    return write_paper_folder(tmp_path / "paper", LAYOUT)


def feature_file(folder: Path, layer: int, index: int) -> Path:
    return folder / "features" / f"{cantor(layer, index)}.json"


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def test_cantor_unpair_inverts_the_pairing() -> None:
    for layer in range(30):
        for index in (0, 1, 7, 8191):
            assert cantor_unpair(cantor(layer, index)) == (layer, index)


def test_import_opens_as_a_run_with_the_source_examples(paper: Path, tmp_path: Path) -> None:
    info = import_circuit_tracer(paper, tmp_path / "run")
    run = RunData.open(tmp_path / "run")
    assert run.info == info
    assert info.schema_version == RUN_SCHEMA_VERSION
    assert (info.source, info.unit, info.negatives_checked) == ("import", "feature", False)
    assert info.layers == [0, 3] and info.n_features_per_layer == 6
    assert info.n_alive == {"0": 3, "3": 2}
    assert info.n_tokens == TOTAL and info.tokens_by_domain == DOMAIN_TOKENS
    assert info.tokens_by_region == {r: REGION_TOKENS.get(r, 0) for r in REGIONS}
    assert info.tokens_by_think_bin == {str(b): 700 for b in range(THINK_BINS)}
    assert info.adapter_path == str(paper.resolve()) and len(info.adapter_hash) == 64
    assert info.params.n_quantiles == 3 and info.params.logit_lens_k == 10
    assert info.params.context_before <= 5 and info.params.context_after <= 3

    features = run.features
    assert features.height == 2 * 6  # dead features are listed
    assert sorted(run.alive()["feature_id"].to_list()) == ["L0F0", "L0F2", "L0F5", "L3F1", "L3F4"]
    meta = {(f["layer"], f["feature"]): f for f in read_json(paper / METADATA_JSON)["features"]}
    ids = ["L3F4", "L0F2"]
    for record, (layer, index) in zip(run.records(ids), [(3, 4), (0, 2)], strict=True):
        source = read_json(feature_file(paper, layer, index))
        entry = meta[(layer, index)]
        assert (record.layer, record.index) == (layer, index)
        assert record.count == entry["activation_count"]
        assert record.frequency == source["activation_frequency"]
        assert record.top_logits == source["top_logits"]
        assert record.top_logit_values == []  # unknown in the format
        for d, share in entry["domain_fraction"].items():
            assert record.by_domain[d] == round(share * entry["activation_count"])
        assert sum(record.by_region.values()) == entry["activation_count"]
        groups = {g["quantile_name"]: g["examples"] for g in source["examples_quantiles"]}
        for kind, name in (("top", "Top activations"), ("random", "Random samples")):
            got = record.of_kind(kind)
            assert [e.rank for e in got] == list(range(len(groups[name])))
            for example, want in zip(got, groups[name], strict=True):
                assert example.tokens == want["tokens"]
                assert example.acts == want["tokens_acts_list"]
                assert example.highlight == want["train_token_ind"]
                assert example.activation == want["tokens_acts_list"][want["train_token_ind"]]
                assert (example.domain, example.region) == ("unknown", "unknown")
        n_quantile = sum(len(groups[f"Quantile {q}"]) for q in range(3))
        assert len(record.of_kind("quantile")) == n_quantile


def test_import_writes_every_documented_column_with_sentinels(paper: Path, tmp_path: Path) -> None:
    import_circuit_tracer(paper, tmp_path / "run")
    examples = pl.read_parquet(tmp_path / "run" / EXAMPLES)
    assert dict(examples.schema) == EXAMPLES_SCHEMA
    assert set(examples["kind"]) == {"top", "quantile", "random"}
    assert examples.filter(pl.col("kind") == "quantile")["quantile"].null_count() == 0
    assert examples.filter(pl.col("kind") != "quantile")["quantile"].null_count() == (
        examples.filter(pl.col("kind") != "quantile").height
    )
    for column in ("sequence", "position", "corpus_position", "think_bin"):
        assert set(examples[column]) == {-1}
    assert (examples["token_ids"].list.len() == examples["tokens"].list.len()).all()
    assert set(examples["token_ids"].explode()) == {-1}

    features = pl.read_parquet(tmp_path / "run" / FEATURES)
    for column in ("count", "frequency", "act_max", "act_min", "act_mean", "top_logits",
                   "top_logit_ids", "top_logit_values", "bottom_logits", "bottom_logit_ids",
                   "bottom_logit_values"):  # fmt: skip
        assert column in features.columns
    for group, names in (("domain", DOMAIN_TOKENS), ("region", REGIONS),
                         ("think_bin", range(THINK_BINS))):  # fmt: skip
        for name in names:
            assert f"{group}_{name}" in features.columns
            assert f"density_{group}_{name}" in features.columns
    alive = features.filter(pl.col("alive"))
    assert alive["act_mean"].null_count() == alive.height
    dead = features.filter(~pl.col("alive"))
    assert (dead["count"] == 0).all() and (dead["act_mean"] == 0).all()
    assert alive["region_text"].sum() == 0

    negatives = pl.read_parquet(tmp_path / "run" / NEGATIVES)
    assert dict(negatives.schema) == NEGATIVES_SCHEMA
    assert negatives.height > 0
    windows = set(map(tuple, examples["tokens"].to_list()))
    n_features = 6
    for tokens, active in negatives.select("tokens", "active_features").iter_rows():
        assert tuple(tokens) in windows
        owners = examples.filter(pl.col("tokens") == pl.lit(pl.Series([tokens])))
        assert active == sorted({la * n_features + i for la, i in owners.select(
            "layer", "index").iter_rows()})  # fmt: skip


def test_negatives_exclude_windows_of_the_feature_itself(paper: Path, tmp_path: Path) -> None:
    import_circuit_tracer(paper, tmp_path / "run")
    run = RunData.open(tmp_path / "run")
    for record in run.records(run.alive()["feature_id"].to_list()):
        own = {tuple(e.tokens) for e in record.examples}
        for snippet in run.negative_snippets(record, 50, seed=0):
            assert tuple(snippet.tokens) not in own


def test_export_of_an_import_reproduces_the_paper_folder(paper: Path, tmp_path: Path) -> None:
    import_circuit_tracer(paper, tmp_path / "run")
    written = export_circuit_tracer(tmp_path / "run", tmp_path / "again")
    assert written == 5
    names = sorted(p.name for p in (paper / "features").iterdir())
    assert sorted(p.name for p in (tmp_path / "again" / "features").iterdir()) == names
    for name in names:
        source = json.loads((paper / "features" / name).read_bytes())
        exported = json.loads((tmp_path / "again" / "features" / name).read_bytes())
        paper_keys = {k: v for k, v in exported.items() if k not in FRONTEND_ONLY}
        assert paper_keys == source
        assert list(paper_keys) == list(source)  # the paper's keys, in its order
        FrontendFeature.model_validate(exported)
    source_meta = read_json(paper / METADATA_JSON)
    exported_meta = read_json(tmp_path / "again" / METADATA_JSON)
    for key in PAPER_KEYS:
        assert exported_meta[key] == source_meta[key], key
    assert exported_meta["n_alive"] == {"0": 3, "3": 2}
    assert exported_meta["n_dead"] == {"0": 3, "3": 4}
    assert exported_meta["n_features"] == 12 and exported_meta["n_feature_files"] == 5


# circuit-tracer's frontend model of a feature file (circuit_tracer/frontend/feature_models.py,
# class Model): every field required, extra keys ignored.
class FrontendExample(BaseModel):
    tokens_acts_list: list[float]
    train_token_ind: int
    is_repeated_datapoint: bool
    tokens: list[str]


class FrontendQuantile(BaseModel):
    quantile_name: str
    examples: list[FrontendExample]


class FrontendFeature(BaseModel):
    transcoder_id: str
    index: int
    examples_quantiles: list[FrontendQuantile]
    top_logits: list[str]
    bottom_logits: list[str]
    act_min: float
    act_max: float
    quantile_values: list[float]
    histogram: list[float]
    activation_frequency: float


FRONTEND_ONLY = ("transcoder_id", "index", "quantile_values", "histogram")


def test_export_is_valid_by_the_frontend_model_with_spread_from_random_samples(
    tmp_path: Path,
) -> None:
    write_run(tmp_path / "run")
    export_circuit_tracer(tmp_path / "run", tmp_path / "ct")
    features = pl.read_parquet(tmp_path / "run" / FEATURES).filter(pl.col("alive"))
    examples = pl.read_parquet(tmp_path / "run" / EXAMPLES)
    for row in features.iter_rows(named=True):
        layer, index = row["layer"], row["index"]
        data = read_json(feature_file(tmp_path / "ct", layer, index))
        feature = FrontendFeature.model_validate(data)
        assert (feature.transcoder_id, feature.index) == (f"layer_{layer}", index)
        assert (data["layer"], data["feature"]) == (layer, index)  # the paper's keys stay
        q = feature.quantile_values
        assert len(q) == 100 and q == sorted(q) and q[-1] == pytest.approx(row["act_max"])
        sample = examples.filter(
            pl.col("feature_id") == row["feature_id"], pl.col("kind") == "random"
        )["activation"].to_numpy()
        sample = np.clip(sample, feature.act_min, row["act_max"])  # this run's are not within
        assert q[49] == pytest.approx(float(np.median(sample)), rel=1e-5)
        # 32 equal bins over the file's [act_min, act_max], summing to the activating tokens
        assert len(feature.histogram) == 32
        assert sum(feature.histogram) == pytest.approx(row["count"], abs=0.1)
        span = row["act_max"] - feature.act_min
        expected = np.zeros(32)
        for value in sample:
            expected[min(int((value - feature.act_min) / span * 32), 31)] += row["count"] / 2
        assert feature.histogram == pytest.approx(expected.tolist(), abs=0.01)


def test_act_min_is_the_lowest_activation_of_the_windows_written(tmp_path: Path) -> None:
    """The viewer scales a token's colour from act_min, as the paper writes it: the lowest
    activation over every token of the feature's example windows, not the run's lowest
    activation on activating tokens."""
    write_run(tmp_path / "run")
    export_circuit_tracer(tmp_path / "run", tmp_path / "ct")
    features = pl.read_parquet(tmp_path / "run" / FEATURES).filter(pl.col("alive"))
    below = 0
    for row in features.iter_rows(named=True):
        data = read_json(feature_file(tmp_path / "ct", row["layer"], row["index"]))
        windows = [a for group in data["examples_quantiles"] for e in group["examples"]
                   for a in e["tokens_acts_list"]]  # fmt: skip
        assert data["act_min"] == min(windows)
        assert data["act_max"] == row["act_max"]
        below += data["act_min"] < row["act_min"]
    assert below == features.height  # every feature's windows hold a zero here


def test_a_second_import_of_the_export_equals_the_first(paper: Path, tmp_path: Path) -> None:
    first = import_circuit_tracer(paper, tmp_path / "run")
    export_circuit_tracer(tmp_path / "run", tmp_path / "again")
    second = import_circuit_tracer(tmp_path / "again", tmp_path / "run2")
    for table in (FEATURES, EXAMPLES, NEGATIVES):
        a = pl.read_parquet(tmp_path / "run" / table)
        b = pl.read_parquet(tmp_path / "run2" / table)
        assert a.equals(b), table
    assert second.params == first.params
    assert second.layers == first.layers and second.n_alive == first.n_alive
    assert second.tokens_by_region == first.tokens_by_region
    assert second.adapter_hash != first.adapter_hash  # the hash is of the files read


def test_paper_folder_without_quantiles_round_trips(tmp_path: Path) -> None:
    paper = write_paper_folder(tmp_path / "paper", {2: [0, 3]}, n_quantiles=0, seed=1)
    info = import_circuit_tracer(paper, tmp_path / "run")
    assert info.params.n_quantiles == 0
    export_circuit_tracer(tmp_path / "run", tmp_path / "again")
    for path in (paper / "features").iterdir():
        exported = read_json(tmp_path / "again" / "features" / path.name)
        assert {k: v for k, v in exported.items() if k not in FRONTEND_ONLY} == read_json(path)
        FrontendFeature.model_validate(exported)


def test_import_hash_is_stable_and_follows_the_bytes(paper: Path, tmp_path: Path) -> None:
    a = import_circuit_tracer(paper, tmp_path / "a")
    b = import_circuit_tracer(paper, tmp_path / "b")
    assert a.adapter_hash == b.adapter_hash == a.corpus_hash
    path = feature_file(paper, 0, 5)
    path.write_text(path.read_text() + " ")
    c = import_circuit_tracer(paper, tmp_path / "c")
    assert c.adapter_hash != a.adapter_hash


# --- a run folder written directly (as the collector would), exported and imported back ---------


def write_run(folder: Path) -> RunInfo:
    rng = np.random.default_rng(3)
    layers, n = [1, 4], 5
    domains = ["math", "code"]
    params = CollectParams(top_k=3, n_random=2, n_quantiles=2, per_quantile=2, layers=layers)
    rows: list[dict[str, Any]] = []
    feats: list[dict[str, Any]] = []
    for layer in layers:
        for index in range(n):
            alive = (layer, index) not in {(1, 3), (4, 0), (4, 4)}
            count = int(rng.integers(5, 90)) if alive else 0
            by_domain = _split(rng, count, domains) if alive else {}
            by_region = _split(rng, count, ["question", "thinking", "answer"]) if alive else {}
            by_bin = [0] * THINK_BINS
            for b in rng.integers(0, THINK_BINS, by_region.get("thinking", 0)):
                by_bin[int(b)] += 1
            row: dict[str, Any] = {
                "feature_id": f"L{layer}F{index}", "layer": layer, "index": index,
                "alive": alive, "count": count, "frequency": count / 4000,
                "act_max": f32(rng.uniform(2, 9)) if alive else 0.0,
                "act_min": f32(rng.uniform(0, 1)) if alive else 0.0,
                "act_mean": f32(rng.uniform(1, 2)) if alive else 0.0,
            }  # fmt: skip
            row |= {f"domain_{d}": by_domain.get(d, 0) for d in domains}
            row |= {f"region_{r}": by_region.get(r, 0) for r in REGIONS}
            row |= {f"think_bin_{b}": by_bin[b] for b in range(THINK_BINS)}
            row |= {f"density_domain_{d}": by_domain.get(d, 0) / 2000 for d in domains}
            row |= {f"density_region_{r}": by_region.get(r, 0) / 500 for r in REGIONS}
            row |= {f"density_think_bin_{b}": by_bin[b] / 200 for b in range(THINK_BINS)}
            k = 4 if alive else 0
            row |= {
                "top_logits": [VOCAB[i] for i in rng.integers(0, len(VOCAB), k)],
                "top_logit_ids": rng.integers(0, 99, k).tolist(),
                "top_logit_values": [f32(v) for v in rng.uniform(0, 1, k)],
                "bottom_logits": [VOCAB[i] for i in rng.integers(0, len(VOCAB), k)],
                "bottom_logit_ids": rng.integers(0, 99, k).tolist(),
                "bottom_logit_values": [f32(v) for v in rng.uniform(-1, 0, k)],
            }
            feats.append(row)
            if not alive:
                continue
            groups = [("top", None, 3), ("random", None, 2), ("quantile", 0, 2), ("quantile", 1, 1)]
            for kind, quantile, size in groups:
                for rank in range(size):
                    ex = _example(rng, rng.uniform(1, 9))
                    width = len(ex["tokens"])
                    rows.append({
                        "feature_id": f"L{layer}F{index}", "layer": layer, "index": index,
                        "kind": kind, "rank": rank, "quantile": quantile,
                        "activation": ex["tokens_acts_list"][ex["train_token_ind"]],
                        "sequence": int(rng.integers(0, 50)), "position": int(rng.integers(0, 99)),
                        "corpus_position": int(rng.integers(0, 4000)),
                        "domain": domains[int(rng.integers(0, 2))], "region": "thinking",
                        "think_bin": int(rng.integers(0, THINK_BINS)),
                        "token_ids": rng.integers(0, 99, width).tolist(), "tokens": ex["tokens"],
                        "acts": ex["tokens_acts_list"], "highlight": ex["train_token_ind"],
                    })  # fmt: skip
    folder.mkdir()
    schema: dict[str, pl.DataType] = {
        "layer": pl.Int32(), "index": pl.Int32(), "act_max": pl.Float32(),
        "act_min": pl.Float32(), "top_logit_values": pl.List(pl.Float32()),
        "bottom_logit_values": pl.List(pl.Float32()), "top_logit_ids": pl.List(pl.Int64()),
        "bottom_logit_ids": pl.List(pl.Int64()),
    }  # fmt: skip
    pl.DataFrame(feats, schema_overrides=schema).write_parquet(folder / FEATURES)
    rng.shuffle(rows)  # export must not rely on the stored order
    pl.DataFrame(rows, schema=EXAMPLES_SCHEMA).write_parquet(folder / EXAMPLES)
    pl.DataFrame(schema=NEGATIVES_SCHEMA).write_parquet(folder / NEGATIVES)
    info = RunInfo(
        schema_version=RUN_SCHEMA_VERSION, created_at="2026-01-01T00:00:00+00:00",
        source="collect", unit="feature", adapter_path="/ckpt", adapter_hash="a" * 64,
        corpus_path="/corpus.jsonl", corpus_hash="c" * 64, params=params, layers=layers,
        n_features_per_layer=n, n_alive={"1": 4, "4": 3}, n_sequences=50, n_tokens=4000,
        n_truncated=2, n_unterminated_think=1, domains={"math": 30, "code": 20},
        tokens_by_domain={"math": 2000, "code": 2000},
        tokens_by_region={r: 500 if r in ("question", "thinking", "answer") else 0
                          for r in REGIONS},
        tokens_by_think_bin={str(b): 200 for b in range(THINK_BINS)}, versions={},
    )  # fmt: skip
    write_run_info(folder, info)
    return info


def test_import_of_an_export_keeps_what_the_format_holds(tmp_path: Path) -> None:
    original = write_run(tmp_path / "run")
    assert export_circuit_tracer(tmp_path / "run", tmp_path / "ct") == 7
    # quantile groups: highest first, between the top and the random group
    names = [g["quantile_name"] for g in read_json(
        tmp_path / "ct" / "features" / f"{cantor(1, 0)}.json")["examples_quantiles"]]  # fmt: skip
    assert names == ["Top activations", "Quantile 1", "Quantile 0", "Random samples"]
    info = import_circuit_tracer(tmp_path / "ct", tmp_path / "back")
    assert info.layers == original.layers
    assert info.n_features_per_layer == original.n_features_per_layer
    assert info.n_alive == original.n_alive
    assert (info.n_sequences, info.n_truncated, info.n_unterminated_think) == (50, 2, 1)
    assert info.domains == original.domains
    assert info.tokens_by_domain == original.tokens_by_domain
    assert info.params.n_quantiles == 2 and info.params.top_k == 3 and info.params.n_random == 2

    # act_min comes back as the windows' lowest activation (the test above)
    kept = ["feature_id", "layer", "index", "alive", "count", "frequency", "act_max",
            "top_logits", "bottom_logits", "domain_math", "domain_code",
            *(f"region_{r}" for r in REGIONS),
            *(f"think_bin_{b}" for b in range(THINK_BINS))]  # fmt: skip
    a = pl.read_parquet(tmp_path / "run" / FEATURES).select(kept).sort("layer", "index")
    b = pl.read_parquet(tmp_path / "back" / FEATURES).select(kept).sort("layer", "index")
    assert a.equals(b)

    order = ["feature_id", "kind", "quantile", "rank"]
    cols = [*order, "layer", "index", "activation", "tokens", "acts", "highlight"]
    a = pl.read_parquet(tmp_path / "run" / EXAMPLES).select(cols).sort(order)
    b = pl.read_parquet(tmp_path / "back" / EXAMPLES).select(cols).sort(order)
    assert a.equals(b)


def test_export_refuses_to_overwrite_unless_asked(tmp_path: Path) -> None:
    write_run(tmp_path / "run")
    out = tmp_path / "ct"
    out.mkdir()
    (out / "keep").write_text("x")
    with pytest.raises(UserError, match="already exists"):
        export_circuit_tracer(tmp_path / "run", out)
    assert (out / "keep").exists()
    export_circuit_tracer(tmp_path / "run", out, overwrite=True)
    assert not (out / "keep").exists() and (out / METADATA_JSON).is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


# --- bad input ----------------------------------------------------------------------------------


def import_fails(paper: Path, out: Path, *needles: str) -> None:
    with pytest.raises(CircuitTracerError) as caught:
        import_circuit_tracer(paper, out)
    for needle in needles:
        assert needle in str(caught.value), str(caught.value)
    assert not out.exists()
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")] == []


def test_errors_are_user_errors() -> None:
    assert issubclass(CircuitTracerError, RunFolderError)
    assert issubclass(CircuitTracerError, USER_ERRORS)  # reported as one line, exit 2


def test_missing_metadata_is_refused(paper: Path, tmp_path: Path) -> None:
    (paper / METADATA_JSON).unlink()
    import_fails(paper, tmp_path / "run", str(paper / METADATA_JSON), "not found")


def test_metadata_without_a_field_is_refused(paper: Path, tmp_path: Path) -> None:
    meta = read_json(paper / METADATA_JSON)
    del meta["total_tokens"]
    (paper / METADATA_JSON).write_text(json.dumps(meta))
    import_fails(paper, tmp_path / "run", METADATA_JSON, "'total_tokens'")


def test_feature_file_that_is_not_json_is_refused(paper: Path, tmp_path: Path) -> None:
    path = feature_file(paper, 3, 1)
    path.write_text(path.read_text()[:-10])
    import_fails(paper, tmp_path / "run", str(path), "not valid JSON")


@pytest.mark.parametrize(
    ("drop", "field"),
    [
        (("act_max",), "'act_max'"),
        (("examples_quantiles", 0, "examples", 1, "train_token_ind"),
         "'examples_quantiles.0.examples.1.train_token_ind'"),
        (("examples_quantiles", 2, "quantile_name"), "'examples_quantiles.2.quantile_name'"),
    ],
)  # fmt: skip
def test_feature_file_without_a_field_is_refused(
    paper: Path, tmp_path: Path, drop: tuple[str | int, ...], field: str
) -> None:
    path = feature_file(paper, 0, 2)
    record = read_json(path)
    node = record
    for key in drop[:-1]:
        node = node[key]
    del node[drop[-1]]
    path.write_text(json.dumps(record))
    import_fails(paper, tmp_path / "run", str(path), field, "required")


def test_file_name_that_does_not_pair_to_layer_and_feature_is_refused(
    paper: Path, tmp_path: Path
) -> None:
    path = feature_file(paper, 0, 5)
    wrong = path.with_name(f"{cantor(0, 6)}.json")
    path.rename(wrong)
    import_fails(paper, tmp_path / "run", str(wrong), "'layer'", "'feature'", "cantor")


def test_file_name_that_is_not_a_cantor_id_is_refused(paper: Path, tmp_path: Path) -> None:
    path = paper / "features" / "L0F5.json"
    feature_file(paper, 0, 5).rename(path)
    import_fails(paper, tmp_path / "run", str(path), "{cantor_id}.json")


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (lambda r: r["examples_quantiles"][0].update(quantile_name="Top 20"),
         "'examples_quantiles.0.quantile_name'"),
        (lambda r: r["examples_quantiles"][1].update(quantile_name="Top activations"),
         "'examples_quantiles.1.quantile_name'"),
        (lambda r: r["examples_quantiles"][0]["examples"][0]["tokens_acts_list"].append(0.0),
         "'examples_quantiles.0.examples.0.tokens_acts_list'"),
        (lambda r: r["examples_quantiles"][4]["examples"][0].update(train_token_ind=99),
         "'examples_quantiles.4.examples.0.train_token_ind'"),
        (lambda r: r.update(top_logits=[1, 2]), "'top_logits.0'"),
    ],
)  # fmt: skip
def test_feature_file_with_a_bad_value_is_refused(
    paper: Path, tmp_path: Path, edit: Any, field: str
) -> None:
    path = feature_file(paper, 3, 4)
    record = read_json(path)
    edit(record)
    path.write_text(json.dumps(record))
    import_fails(paper, tmp_path / "run", str(path), field)


def test_import_refuses_to_overwrite_unless_asked(paper: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    with pytest.raises(UserError, match="already exists"):
        import_circuit_tracer(paper, out)
    import_circuit_tracer(paper, out, overwrite=True)
    assert RunData.open(out).info.source == "import"


# --- the round trip of a labeled run ---------------------------------------------------------

LOGIT_LENS_KEYS = ("top_logit_ids", "top_logit_values", "bottom_logit_ids", "bottom_logit_values")
"""Export writes the logit lens's ids and values beside the paper's token lists."""


def _final_labels(run: Path) -> tuple[float, dict[str, tuple[Any, ...]]]:
    """The run's final reasoning share and each feature's final label, by the CLI."""
    summary = labeler("summarize", run, "--json")
    assert summary.returncode == 0, summary.stderr
    share = json.loads(summary.stdout)["final"]["reasoning"]["share"]
    catalog = run.parent / f"{run.name}-catalog.jsonl"
    exported = labeler("export", run, "--out", catalog)
    assert exported.returncode == 0, exported.stderr
    lines = [json.loads(line) for line in catalog.read_text().splitlines()]
    fields = ("category", "subcategory", "mechanism", "domain_type")
    return share, {x["feature_id"]: tuple(x["final_label"][f] for f in fields) for x in lines}


def _round_trip(run: Path, tmp_path: Path, strip_values: bool) -> tuple[str, Path]:
    folder = tmp_path / "ct"
    result = labeler("export", run, "--format", "circuit-tracer", "--out", folder)
    assert result.returncode == 0, result.stderr
    if strip_values:  # as the paper's files are: the logit tokens without their values
        for path in (folder / "features").iterdir():
            record = read_json(path)
            for key in LOGIT_LENS_KEYS:
                del record[key]
            path.write_text(json.dumps(record), encoding="utf-8")
    back = tmp_path / "back"
    imported = labeler("import", folder, "--out", back)
    assert imported.returncode == 0, imported.stderr
    relabeled = labeler("label", back, "--judge", "heuristic")
    assert relabeled.returncode == 0, relabeled.stderr
    return imported.stderr, back


def test_a_labeled_demo_run_keeps_its_labels_through_the_format(
    labeled: CollectedDemo, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    shutil.copytree(labeled.run, run)
    share, labels = _final_labels(run)
    warnings, back = _round_trip(run, tmp_path, strip_values=False)
    assert "logit" not in warnings  # the logit lens is carried
    features = pl.read_parquet(back / FEATURES).filter(pl.col("alive")).sort("layer", "index")
    original = pl.read_parquet(run / FEATURES).filter(pl.col("alive")).sort("layer", "index")
    for column in LOGIT_LENS_KEYS:
        assert features[column].equals(original[column]), column
    share_back, labels_back = _final_labels(back)
    assert sorted(labels_back) == sorted(labels) and len(labels) == 960
    assert [f for f in labels if labels[f] != labels_back[f]] == []
    assert share_back == pytest.approx(share)


def test_an_import_without_logit_values_says_what_it_could_not_carry(
    labeled: CollectedDemo, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    shutil.copytree(labeled.run, run)
    _, labels = _final_labels(run)
    warnings, back = _round_trip(run, tmp_path, strip_values=True)
    _, labels_back = _final_labels(back)
    changed = [f for f in labels if labels[f] != labels_back[f]]
    assert changed  # the heuristic cannot find output features without the values
    said = " ".join(warnings.split())
    assert "960 of 960 alive features" in said
    for field in ("top_logit_values", "bottom_logit_values", "act_mean"):
        assert field in said
