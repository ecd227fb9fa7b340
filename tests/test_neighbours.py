"""Each feature's nearest features (labeler.review.neighbours): planted pairs in a small
real checkpoint (decoder columns, encoder rows) and planted co-firing in a negatives
table are found, dead features never listed, an index follows its run (stale: rebuilt;
a killed build keeps the old one), and a run without its checkpoint still gets
co-activation with a note that says why the cosines are missing."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from collectors.run_format import (
    EXAMPLES,
    FEATURES,
    NEGATIVES,
    RUN_SCHEMA_VERSION,
    CollectParams,
    RunInfo,
    feature_id,
    write_run_info,
)
from labeler.errors import UserError
from labeler.review.neighbours import (
    INDEX_DIR,
    NEIGHBOUR_KINDS,
    Neighbour,
    NeighbourIndex,
    ensure_neighbours,
)
from labeler.run.data import RunData
from tests.test_review_web import _start, _stop

N_LAYERS, N_FEATURES, D_MODEL, N_WINDOWS = 2, 64, 32, 200
DEC_PAIR = (0, 5, 17)  # layer, a, b: decoder columns nearly parallel
ENC_PAIR = (1, 8, 30)  # layer, a, b: encoder rows nearly parallel
DEAD = (0, 40, 41)  # layer, dead, alive: the dead one's decoder column parallels the alive one's
CO_PAIR = (0, 3, 9)  # layer, a, b: fire in exactly the same windows
ALWAYS_ON = (0, 12)  # fires in every window
CO_WINDOWS = 20


@dataclass(frozen=True)
class Planted:
    run: Path
    checkpoint: Path


def write_checkpoint(folder: Path, seed: int = 0) -> None:
    """A transcoder checkpoint in the paper's format (config.json, safetensors), with the
    planted pairs; everything else random."""
    import torch
    from safetensors.torch import save_file

    rng = np.random.default_rng(seed)
    tensors: dict[str, torch.Tensor] = {}
    for layer in range(N_LAYERS):
        enc = rng.standard_normal((N_FEATURES, D_MODEL)).astype(np.float32)
        dec = rng.standard_normal((D_MODEL, N_FEATURES)).astype(np.float32)
        if layer == DEC_PAIR[0]:
            dec[:, DEC_PAIR[2]] = 2.0 * dec[:, DEC_PAIR[1]] + 0.05 * rng.standard_normal(D_MODEL)
        if layer == ENC_PAIR[0]:
            enc[ENC_PAIR[2]] = 0.5 * enc[ENC_PAIR[1]] + 0.05 * rng.standard_normal(D_MODEL)
        if layer == DEAD[0]:
            dec[:, DEAD[1]] = dec[:, DEAD[2]] + 0.01 * rng.standard_normal(D_MODEL)
        prefix = f"model.layers.{layer}.mlp.transcoder_"
        tensors[prefix + "enc.weight"] = torch.from_numpy(enc).to(torch.bfloat16)
        tensors[prefix + "enc.bias"] = torch.zeros(N_FEATURES)
        tensors[prefix + "dec.weight"] = torch.from_numpy(dec).to(torch.bfloat16)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({
        "transcoder_n_features": N_FEATURES, "transcoder_dec_bias": False,
        "num_hidden_layers": N_LAYERS, "hidden_size": D_MODEL, "model_type": "qwen2",
    }))  # fmt: skip
    save_file(tensors, str(folder / "model.safetensors"))


def planted_windows(seed: int = 0) -> list[list[int]]:
    """Each window's active features (global indices): the co-firing pair in the same
    ``CO_WINDOWS`` windows, one feature in all of them, the rest at random (10%)."""
    rng = np.random.default_rng(seed)
    active = rng.random((N_WINDOWS, N_LAYERS * N_FEATURES)) < 0.1
    layer, a, b = CO_PAIR
    together = rng.choice(N_WINDOWS, CO_WINDOWS, replace=False)
    for f in (a, b):
        active[:, layer * N_FEATURES + f] = False
        active[together, layer * N_FEATURES + f] = True
    active[:, ALWAYS_ON[0] * N_FEATURES + ALWAYS_ON[1]] = True
    active[:, DEAD[0] * N_FEATURES + DEAD[1]] = False
    return [np.flatnonzero(row).tolist() for row in active]


def write_run(folder: Path, checkpoint: Path, unit: str = "feature") -> None:
    """A run folder holding what neighbours read: run.json, features.parquet (the dead
    feature marked), negatives.parquet (the planted windows) and an examples table."""
    from adapters.checkpoint import checkpoint_hash

    folder.mkdir(parents=True)
    rows = [(feature_id(la, i), la, i, (la, i) != DEAD[:2]) for la in range(N_LAYERS)
            for i in range(N_FEATURES)]  # fmt: skip
    pl.DataFrame(rows, schema=["feature_id", "layer", "index", "alive"], orient="row").with_columns(
        frequency=pl.lit(0.01), count=pl.lit(10)
    ).write_parquet(folder / FEATURES)
    pl.DataFrame({"feature_id": ["L0F0"], "layer": [0], "index": [0]}).write_parquet(
        folder / EXAMPLES
    )
    windows = planted_windows()
    pl.DataFrame(
        {"window": list(range(len(windows))), "tokens": [["a", "b"]] * len(windows),
         "active_features": windows},
        schema={"window": pl.Int32, "tokens": pl.List(pl.String),
                "active_features": pl.List(pl.Int64)},
    ).write_parquet(folder / NEGATIVES)  # fmt: skip
    info = RunInfo(
        schema_version=RUN_SCHEMA_VERSION, created_at="2026-01-01T00:00:00+00:00",
        source="collect", unit=unit, adapter_path=str(checkpoint),
        adapter_hash=checkpoint_hash(checkpoint), corpus_path="corpus.jsonl",
        corpus_hash="0", params=CollectParams(n_negatives=N_WINDOWS),
        layers=list(range(N_LAYERS)), n_features_per_layer=N_FEATURES,
        n_alive={str(la): N_FEATURES - (la == DEAD[0]) for la in range(N_LAYERS)},
        n_sequences=N_WINDOWS, n_tokens=2 * N_WINDOWS, n_truncated=0, n_unterminated_think=0,
        domains={"math": N_WINDOWS}, tokens_by_domain={"math": 2 * N_WINDOWS},
        tokens_by_region={}, tokens_by_think_bin={}, versions={},
    )  # fmt: skip
    write_run_info(folder, info)


@pytest.fixture
def planted(tmp_path: Path) -> Planted:
    checkpoint = tmp_path / "checkpoint"
    write_checkpoint(checkpoint)
    write_run(tmp_path / "run", checkpoint)
    return Planted(tmp_path / "run", checkpoint)


def first(index: NeighbourIndex, kind: str, layer: int, i: int) -> str | None:
    listed = index.of(layer, i)[kind]
    return listed[0].feature_id if listed else None


def test_planted_decoder_and_encoder_pairs_are_each_others_first_neighbour(
    planted: Planted,
) -> None:
    index = ensure_neighbours(RunData.open(planted.run), device="cpu")
    try:
        for kind, (layer, a, b) in (("decoder", DEC_PAIR), ("encoder", ENC_PAIR)):
            for x, y in ((a, b), (b, a)):
                top = index.of(layer, x)[kind][0]
                assert top.feature_id == feature_id(layer, y), (kind, x)
                assert top.value > 0.9
                assert top.shared is None
            # unrelated features have no near-parallel neighbour
            others = [i for i in range(N_FEATURES) if i not in (a, b, DEAD[1], DEAD[2])]
            for i in others:
                listed = index.of(layer, i)[kind]
                assert len(listed) == 10
                assert listed[0].value < 0.9, (kind, layer, i)
                assert [n.value for n in listed] == sorted((n.value for n in listed), reverse=True)
                assert feature_id(layer, i) not in {n.feature_id for n in listed}
                assert all(n.feature_id.startswith(f"L{layer}F") for n in listed)
        # the encoder pair is not a decoder pair and the other way round
        assert index.of(ENC_PAIR[0], ENC_PAIR[1])["decoder"][0].value < 0.9
        assert index.of(DEC_PAIR[0], DEC_PAIR[1])["encoder"][0].value < 0.9
        assert set(index.notes) == set(NEIGHBOUR_KINDS)
        assert "cpu" in json.loads((planted.run / INDEX_DIR / "meta.json").read_text())["device"]
    finally:
        index.close()


def test_planted_co_firing_pair_and_an_always_on_feature(planted: Planted) -> None:
    index = ensure_neighbours(RunData.open(planted.run), device="cpu")
    try:
        layer, a, b = CO_PAIR
        for x, y in ((a, b), (b, a)):
            top = index.of(layer, x)["coactivation"][0]
            assert top.feature_id == feature_id(layer, y)
            assert top.value == pytest.approx(1.0)
            assert top.shared == CO_WINDOWS
        firsts = [first(index, "coactivation", la, i) for la in range(N_LAYERS)
                  for i in range(N_FEATURES)]  # fmt: skip
        always = feature_id(*ALWAYS_ON)
        # P(B|A) would put it first for every feature; the measure does not
        assert firsts.count(always) < N_FEATURES // 4
        for la in range(N_LAYERS):
            for i in range(N_FEATURES):
                for n in index.of(la, i)["coactivation"]:
                    assert n.shared is not None and n.shared >= 2
                    assert n.feature_id.startswith(f"L{la}F")  # same layer only
        assert f"{N_WINDOWS} " in index.notes["coactivation"]
    finally:
        index.close()


def test_dead_features_are_never_listed_and_have_none(planted: Planted) -> None:
    index = ensure_neighbours(RunData.open(planted.run), device="cpu")
    try:
        layer, dead, twin = DEAD
        assert index.of(layer, dead) == {kind: [] for kind in NEIGHBOUR_KINDS}
        listed = {n.feature_id for la in range(N_LAYERS) for i in range(N_FEATURES)
                  for kind in NEIGHBOUR_KINDS for n in index.of(la, i)[kind]}  # fmt: skip
        assert feature_id(layer, dead) not in listed
        assert index.of(layer, twin)["decoder"][0].value < 0.9  # its dead twin is left out
    finally:
        index.close()


def test_an_index_with_no_neighbours_answers_empty_lists(planted: Planted) -> None:
    assert NeighbourIndex.open(planted.run) is None  # not built
    index = ensure_neighbours(RunData.open(planted.run), device="cpu")
    try:
        empty: dict[str, list[Neighbour]] = {kind: [] for kind in NEIGHBOUR_KINDS}
        assert index.of(5, 0) == empty  # a layer the run does not have
        assert index.of(0, N_FEATURES + 3) == empty
        assert index.of(-1, 0) == empty
    finally:
        index.close()


def test_a_changed_run_is_stale_and_rebuilt_an_unchanged_one_is_reused(planted: Planted) -> None:
    builds: list[str] = []
    ensure_neighbours(RunData.open(planted.run), device="cpu").close()
    reused = ensure_neighbours(RunData.open(planted.run), device="cpu",
                               on_build=lambda why, _n: builds.append(why))  # fmt: skip
    reused.close()
    assert builds == []
    # the negatives change: the pair now fires apart
    negatives = pl.read_parquet(planted.run / NEGATIVES)
    layer, a, _b = CO_PAIR
    gone = layer * N_FEATURES + a
    negatives = negatives.with_columns(pl.col("active_features").list.filter(pl.element() != gone))
    negatives.write_parquet(planted.run / NEGATIVES)
    assert NeighbourIndex.open(planted.run) is None
    index = ensure_neighbours(RunData.open(planted.run), device="cpu",
                              on_build=lambda why, _n: builds.append(why))  # fmt: skip
    try:
        assert len(builds) == 1 and "changed" in builds[0]
        assert index.of(layer, a)["coactivation"] == []
    finally:
        index.close()
    # a different k is another index
    index = ensure_neighbours(RunData.open(planted.run), device="cpu", k=3)
    try:
        assert len(index.of(*DEC_PAIR[:2])["decoder"]) == 3
    finally:
        index.close()
    rebuilt = ensure_neighbours(RunData.open(planted.run), device="cpu", rebuild=True,
                                on_build=lambda why, _n: builds.append(why))  # fmt: skip
    rebuilt.close()
    assert len(builds) == 2


def test_a_killed_build_leaves_the_old_index(planted: Planted) -> None:
    ensure_neighbours(RunData.open(planted.run), device="cpu").close()
    before = (planted.run / INDEX_DIR / "meta.json").read_text()

    class Killed(Exception):
        pass

    def kill(_n: int) -> None:
        raise Killed

    with pytest.raises(Killed):
        ensure_neighbours(RunData.open(planted.run), device="cpu", rebuild=True, progress=kill)
    assert (planted.run / INDEX_DIR / "meta.json").read_text() == before
    assert [p.name for p in planted.run.iterdir() if "neighbours" in p.name] == [INDEX_DIR]
    index = NeighbourIndex.open(planted.run)
    assert index is not None
    assert first(index, "decoder", DEC_PAIR[0], DEC_PAIR[1]) == feature_id(0, DEC_PAIR[2])
    index.close()


def test_a_missing_checkpoint_gives_co_activation_only_with_a_note(planted: Planted) -> None:
    shutil.rmtree(planted.checkpoint)
    index = ensure_neighbours(RunData.open(planted.run), device="cpu")
    try:
        layer, a, b = CO_PAIR
        assert first(index, "coactivation", layer, a) == feature_id(layer, b)
        for kind in ("decoder", "encoder"):
            assert index.of(*DEC_PAIR[:2])[kind] == []
            assert str(planted.checkpoint) in index.notes[kind]
            assert "not found" in index.notes[kind] or "no such" in index.notes[kind]
    finally:
        index.close()
    # the checkpoint comes back: the cosines are built then
    write_checkpoint(planted.checkpoint)
    index = ensure_neighbours(RunData.open(planted.run), device="cpu")
    try:
        assert first(index, "decoder", DEC_PAIR[0], DEC_PAIR[1]) == feature_id(0, DEC_PAIR[2])
    finally:
        index.close()


def test_a_changed_checkpoint_or_a_neuron_run_gets_no_cosines(planted: Planted) -> None:
    write_checkpoint(planted.checkpoint.with_name("other"), seed=1)
    for name in ("model.safetensors",):
        os.replace(planted.checkpoint.with_name("other") / name, planted.checkpoint / name)
    index = ensure_neighbours(RunData.open(planted.run), device="cpu")
    try:
        assert index.of(*DEC_PAIR[:2])["decoder"] == []
        assert "adapter_hash" in index.notes["decoder"]
        assert index.of(*CO_PAIR[:2])["coactivation"] != []
    finally:
        index.close()
    neurons = planted.run.with_name("neurons")
    write_run(neurons, planted.checkpoint, unit="neuron")
    index = ensure_neighbours(RunData.open(neurons), device="cpu")
    try:
        assert index.of(*DEC_PAIR[:2])["encoder"] == []
        assert "neuron" in index.notes["encoder"]
        assert index.of(*CO_PAIR[:2])["coactivation"] != []
    finally:
        index.close()


def test_progress_counts_every_step_once(planted: Planted) -> None:
    totals: list[int] = []
    done: list[int] = []
    index = ensure_neighbours(RunData.open(planted.run), device="cpu",
                              progress=done.append,
                              on_build=lambda _why, n: totals.append(n))  # fmt: skip
    index.close()
    assert len(totals) == 1 and sum(done) == totals[0] > 0


def test_the_demo_run_builds_on_the_cpu(run_copy: Path) -> None:
    index = ensure_neighbours(RunData.open(run_copy), device="cpu")
    try:
        run = RunData.open(run_copy)
        alive = run.alive().row(0, named=True)
        got = index.of(alive["layer"], alive["index"])
        assert set(got) == set(NEIGHBOUR_KINDS)
        assert got["decoder"] and got["encoder"], index.notes
        assert all(n.feature_id.startswith(f"L{alive['layer']}F") for n in got["decoder"])
    finally:
        index.close()


def test_browse_builds_the_index_and_review_opens_it(labeled_copy: Path, tmp_path: Path) -> None:
    process, _url = _start(labeled_copy, "--port", "0", "--device", "cpu",
                           stderr=tmp_path / "browse.log", command="browse")  # fmt: skip
    try:
        meta = json.loads((labeled_copy / INDEX_DIR / "meta.json").read_text())
        assert meta["device"] == "cpu"
        assert set(meta["notes"]) == set(NEIGHBOUR_KINDS)
    finally:
        assert _stop(process) == 0
    built = (labeled_copy / INDEX_DIR / "meta.json").stat().st_mtime_ns
    process, _url = _start(labeled_copy, "--port", "0", stderr=tmp_path / "review.log")
    assert _stop(process) == 0
    assert (labeled_copy / INDEX_DIR / "meta.json").stat().st_mtime_ns == built


def test_without_torch_co_activation_is_still_built(
    planted: Planted, monkeypatch: pytest.MonkeyPatch
) -> None:
    from labeler.review import neighbours

    monkeypatch.setattr(neighbours, "_has_torch", lambda: False)
    index = ensure_neighbours(RunData.open(planted.run))
    try:
        layer, a, b = CO_PAIR
        top = index.of(layer, a)["coactivation"][0]
        assert (top.feature_id, top.value, top.shared) == (feature_id(layer, b), 1.0, CO_WINDOWS)
        assert "torch" in index.notes["decoder"] and "torch" in index.notes["encoder"]
    finally:
        index.close()
    with pytest.raises(UserError, match="--device cuda"):
        ensure_neighbours(RunData.open(planted.run), device="cuda", rebuild=True)


def test_co_activation_agrees_with_and_without_torch(
    planted: Planted, monkeypatch: pytest.MonkeyPatch
) -> None:
    from labeler.review import neighbours

    with_torch = ensure_neighbours(RunData.open(planted.run), device="cpu")
    expected = {(la, i): with_torch.of(la, i)["coactivation"] for la in range(N_LAYERS)
                for i in range(N_FEATURES)}  # fmt: skip
    with_torch.close()
    monkeypatch.setattr(neighbours, "_has_torch", lambda: False)
    without = ensure_neighbours(RunData.open(planted.run), rebuild=True)
    try:
        for (la, i), listed in expected.items():
            got = without.of(la, i)["coactivation"]
            assert [(n.value, n.shared) for n in got] == [(n.value, n.shared) for n in listed]
    finally:
        without.close()
