"""The vectorized collector against a direct reference computed here, sequence by sequence."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl
import pytest
import torch

from adapters.branch import load_adapter
from collectors.corpus import TokenizedCorpus, read_traces, tokenize_traces
from collectors.reservoirs import hash_keys
from collectors.run_format import REGIONS, CollectParams
from tests.conftest import CollectedDemo

TOL = 1e-4


@dataclass(frozen=True)
class Reference:
    corpus: TokenizedCorpus
    dense: dict[int, np.ndarray]  # layer -> features [n_tokens, n_features]

    @property
    def seq_starts(self) -> np.ndarray:
        return self.corpus.offsets[:-1]


@pytest.fixture(scope="module")
def reference(collected: CollectedDemo) -> Reference:
    """Dense features of every layer at every corpus token, one sequence per forward pass
    (no batching, no padding)."""
    adapter, tokenizer, _ = load_adapter(str(collected.paths.checkpoint), "cpu", "float32")
    corpus = tokenize_traces(list(read_traces(collected.paths.corpus)), tokenizer, 1024)
    layers = list(range(adapter.n_layers))
    dense = {layer: [] for layer in layers}
    with torch.no_grad(), adapter.recording(layers) as captured:
        for i in range(corpus.n_sequences):
            adapter.model(input_ids=torch.from_numpy(corpus.sequence(i)).unsqueeze(0))
            for layer in layers:
                dense[layer].append(captured[layer][0].numpy())
    return Reference(corpus, {la: np.concatenate(v) for la, v in dense.items()})


def _reference_topk(acts: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    pos = np.nonzero(acts > 0)[0]
    order = np.lexsort((pos, -acts[pos]))[:k]
    return pos[order], acts[pos][order]


@pytest.mark.slow
def test_topk_counts_and_statistics_match_reference(
    collected: CollectedDemo, reference: Reference
) -> None:
    corpus, seq_starts = reference.corpus, reference.seq_starts
    features = pl.read_parquet(collected.run / "features.parquet")
    examples = pl.read_parquet(collected.run / "examples.parquet")
    params = CollectParams()
    compared_positions = 0
    for layer, acts in reference.dense.items():
        rows = features.filter(pl.col("layer") == layer).sort("index")
        np.testing.assert_array_equal(rows["count"].to_numpy(), (acts > 0).sum(0))
        np.testing.assert_allclose(rows["act_max"].to_numpy(), acts.max(0), atol=TOL)
        for r, name in enumerate(REGIONS):
            expected = ((acts > 0) & (corpus.regions == r)[:, None]).sum(0)
            np.testing.assert_array_equal(rows[f"region_{name}"].to_numpy(), expected)
        top = examples.filter((pl.col("layer") == layer) & (pl.col("kind") == "top"))
        for index in np.nonzero((acts > 0).any(0))[0]:
            mine = top.filter(pl.col("index") == index).sort("rank")
            ref_pos, ref_act = _reference_topk(acts[:, index], params.top_k)
            np.testing.assert_allclose(mine["activation"].to_numpy(), ref_act, atol=TOL)
            got_pos = seq_starts[mine["sequence"].to_numpy()] + mine["position"].to_numpy()
            # Positions must agree wherever the reference order is not a near-tie.
            gaps = np.abs(np.diff(np.concatenate([[np.inf], ref_act, [-np.inf]])))
            clear = (gaps[:-1] > TOL) & (gaps[1:] > TOL)
            all_acts = np.sort(acts[:, index][acts[:, index] > 0])[::-1]
            if (
                len(all_acts) > params.top_k
                and all_acts[params.top_k - 1] - all_acts[params.top_k] <= TOL
            ):
                clear[-1] = False
            np.testing.assert_array_equal(got_pos[clear], ref_pos[clear])
            compared_positions += int(clear.sum())
            # The context activations are the feature's own, around the example.
            for row in mine.head(2).iter_rows(named=True):
                p = seq_starts[row["sequence"]] + row["position"]
                lo = p - row["highlight"]
                ref_window = acts[lo : lo + len(row["acts"]), index]
                np.testing.assert_allclose(row["acts"], ref_window, atol=TOL)
    assert compared_positions > 5_000  # many exact positions were checked, not just values


@pytest.mark.slow
def test_random_sample_is_the_bottom_k_of_hashed_keys(
    collected: CollectedDemo, reference: Reference
) -> None:
    seq_starts = reference.seq_starts
    examples = pl.read_parquet(collected.run / "examples.parquet").filter(
        pl.col("kind") == "random"
    )
    params = CollectParams()
    for layer in (0, 3):
        acts = reference.dense[layer]
        pos, feat = np.nonzero(acts > 0)
        keys = hash_keys(params.seed, layer, torch.from_numpy(pos), torch.from_numpy(feat))
        keys = keys.numpy()
        mine = examples.filter(pl.col("layer") == layer)
        for index in np.unique(feat)[::7]:
            sel = feat == index
            order = np.lexsort((pos[sel], keys[sel]))[: params.n_random]
            expected = np.sort(pos[sel][order])
            rows = mine.filter(pl.col("index") == index)
            got = np.sort(seq_starts[rows["sequence"].to_numpy()] + rows["position"].to_numpy())
            np.testing.assert_array_equal(got, expected)
