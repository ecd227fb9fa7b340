"""The planted demo: a synthetic corpus, a locally trained tokenizer, and a tiny Qwen2
decoder with a transcoder adapter whose features have a known meaning.

Everything is deterministic from the seed and takes seconds on a CPU. The ground truth
(trigger tokens, measured precision and recall) is planted and measured on the corpus as
tokenized by the tokenizer ``collect`` loads from the saved checkpoint folder, not by the
one trained in memory (they agree; the builder does not rely on it). The random-weight
decoder is built with large token embeddings, so the residual stream at every layer is
dominated by the current token: features planted on token sets fire exactly there. A
random-weight model carries little context, so the demo's ``input_abstract`` reasoning
features fire on many different tokens that share one reasoning function (hedges,
checking words) rather than on a context.

The decoder's unembedding is then fitted to the corpus as a next-token predictor
(``fit_unembedding``), so the model writes corpus-like text, except the hesitation words
("Wait", "Hmm"), which the hybrid model (branch off) never learned to say. A planted
hesitation circuit says them, as in the paper's hesitation study: *template* features in
the first half of the layers fire on newlines and write a circuit direction; *hesitation
output* features in the second half fire on newlines, four times as strongly where the
circuit direction is written, and write a direction that only the hesitation words'
unembedding rows read. The adapter model starts many of its lines with "Wait" or "Hmm"
(about 55 per 1,000 tokens sampled at temperature 1); ablating the output features
brings that to the hybrid's rate (about 1), the output features alone added to the
hybrid bring back a fifth of it, and both groups all of it.
Every output feature promotes its words this way, through a direction reserved for
them, so its logit lens shows exactly those words.

Per layer of 256 features: 20 reasoning (about 8% of the alive ones, the circuit's among
them), 70 domain, 70 language, 80 uninterpretable (random token sets and random
directions), 16 dead.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from adapters.branch import AdapterModel, attach_branch, mlp_of, save_adapter
from adapters.checkpoint import TranscoderConfig
from adapters.planted import (
    PlantedEncoder,
    circuit_encoder,
    dead_encoder,
    random_decoder,
    random_direction_encoder,
    token_centroids,
    token_set_encoder,
)
from adapters.random_adapter import ModelShape
from adapters.random_adapter import random_decoder as random_causal_lm
from adapters.tiny_tokenizer import train_bpe_tokenizer
from adapters.tokenizer_loading import load_tokenizer
from collectors.batching import make_batch, plan_batches
from collectors.corpus import (
    BOS,
    EOS,
    PAD,
    SPECIAL_TOKENS,
    TokenizedCorpus,
    Trace,
    read_traces,
    segments,
    tokenize_traces,
)
from collectors.run_format import feature_id
from collectors.synthetic_corpus import write_corpus
from prompts import load_taxonomy, normalize_token

log = logging.getLogger(__name__)

GROUND_TRUTH = "ground_truth.json"


@dataclass(frozen=True)
class Spec:
    """What a planted feature is meant to be."""

    category: str
    subcategory: str | None = None
    mechanism: str | None = None
    domain_type: str | None = None
    triggers: tuple[str, ...] = ()
    promotes: tuple[str, ...] = ()
    kind: str = "token_set"  # token_set | random_tokens | random_direction | dead


def _r(sub: str, mech: str, triggers: tuple[str, ...], promotes: tuple[str, ...] = ()) -> Spec:
    return Spec("reasoning", sub, mech, None, triggers, promotes)


REASONING = [
    _r("hesitation", "input_simple", ("wait",)),
    _r("hesitation", "input_simple", ("hmm",)),
    _r("hesitation", "input_simple", ("wait", "hmm")),
    _r("self_correction", "input_simple", ("actually",)),
    _r("self_correction", "input_simple", ("mistake", "wrong")),
    _r("verification", "input_simple", ("check",)),
    _r("verification", "input_simple", ("verify", "confirm")),
    _r("planning", "input_simple", ("first",)),
    _r("planning", "input_simple", ("approach", "strategy")),
    _r("planning", "input_simple", ("alternatively",)),
    _r("answer_template", "input_simple", ("boxed",)),
    _r("answer_template", "input_simple", ("final",)),
    _r("hesitation", "input_abstract", ("maybe", "perhaps", "probably", "possibly", "seems")),
    _r("verification", "input_abstract", ("check", "verify", "confirm", "double", "sanity")),
    _r("self_correction", "input_abstract", ("actually", "mistake", "wrong", "oops", "instead")),
    _r("verification", "output", (":",), ("check", "verify")),
    _r("self_correction", "output", (",",), ("actually", "mistake")),
]
DOMAIN = (
    [
        Spec("domain", domain_type="math", triggers=t)
        for t in [
            ("=",),
            ("+",),
            ("x",),
            ("integer",),
            ("sum",),
            ("triangle", "area"),
            ("/",),
            ("*",),
        ]
    ]
    + [
        Spec("domain", domain_type="code", triggers=t)
        for t in [("def",), ("return",), ("print",), ("range", "len"), ("append",), ("xs",)]
    ]
    + [
        Spec("domain", domain_type="science", triggers=t)
        for t in [
            ("energy",),
            ("mass", "kg"),
            ("force",),
            ("velocity", "acceleration"),
            ("joules",),
        ]
    ]
)
LANGUAGE = [
    Spec("language", triggers=t)
    for t in [
        ("the",), ("of",), ("and",), (",",), (".",), ("so",), ("therefore", "thus"), ("is",),
        ("we",), ("to",), ("a",), ("this", "that"), ("it",), ("because",), ("then",), ("in",),
        ("for",), ("?",),
    ]
]  # fmt: skip
HESITATION_WORDS = ("wait", "hmm")
"""The words the hybrid model (branch off) never learned to say: only the planted
hesitation circuit below makes the adapter model say them."""
NEWLINE = "\n"
TEMPLATE = Spec("reasoning", "hesitation", "input_abstract", None, (NEWLINE,), kind="template")
HESITATION_OUTPUT = Spec(
    "reasoning", "hesitation", "output", None, (NEWLINE,), HESITATION_WORDS,
    kind="hesitation_output",
)  # fmt: skip
PER_LAYER = {"reasoning": 20, "domain": 70, "language": 70, "uninterpretable": 80, "dead": 16}
RANDOM_DIRECTIONS_PER_LAYER = 10
TEMPLATES_PER_LAYER = 1
OUTPUTS_PER_LAYER = 2
TEMPLATE_WRITE = 1.5
"""The norm of a template feature's decoder column (its write along the circuit's
direction), against a residual stream of norm about sqrt(d_model)."""
HESITATION_WRITE = 0.15
"""The norm of a hesitation output feature's decoder column (along the direction only
the hesitation words' unembedding rows read, ``fit_unembedding``)."""
UNSAID_WEIGHT = 0.01
OUTPUT_LOGIT = 5.0
"""How much the promoted words' logits rise per unit of their reserved direction in the
final normed hidden state."""
CIRCUIT_BOOST = 3.0
"""How much more strongly a hesitation output feature fires where the template features
have written the circuit direction than on its trigger alone."""
OUTPUT_WRITE = 0.15
"""The norm of the other output features' decoder columns."""


@dataclass(frozen=True)
class DemoShape:
    n_traces: int = 300
    n_layers: int = 4
    d_model: int = 128
    n_heads: int = 4
    n_kv_heads: int = 2
    intermediate: int = 256
    vocab_size: int = 1200
    max_length: int = 1024

    @property
    def n_features(self) -> int:
        return sum(PER_LAYER.values())


@dataclass(frozen=True)
class DemoPaths:
    corpus: Path
    checkpoint: Path
    ground_truth: Path


def _word_ids(tokenizer: Any) -> dict[str, list[int]]:
    """Normalized token text -> the ids that decode to it (e.g. 'wait': ['Wait', ' Wait'])."""
    words: dict[str, list[int]] = {}
    special = set(tokenizer.all_special_ids)
    for token_id in range(len(tokenizer)):
        if token_id in special:
            continue
        text = tokenizer.decode([token_id])
        key = normalize_token(text) or text  # pure whitespace keeps its raw text ("\n\n")
        words.setdefault(key, []).append(token_id)
    return words


def _tiny_qwen2(shape: DemoShape, vocab_size: int, seed: int) -> Any:
    decoder_shape = ModelShape(
        arch="qwen2", n_layers=shape.n_layers, d_model=shape.d_model,
        intermediate=shape.intermediate, n_heads=shape.n_heads, n_kv_heads=shape.n_kv_heads,
        vocab_size=vocab_size, max_positions=2 * shape.max_length,
    )  # fmt: skip
    model = random_causal_lm(decoder_shape, seed)
    with torch.no_grad():  # token-dominated residual stream: see the module docstring
        embeddings: Any = model.get_input_embeddings()
        embeddings.weight.normal_(0.0, 1.0)
    return model


class _StopForward(Exception):
    """Raised inside a hook to end a forward pass early."""


def _mlp_inputs(adapter: AdapterModel, corpus: TokenizedCorpus, layer: int) -> np.ndarray:
    """The input of layer ``layer``'s MLP at every corpus token [n_tokens, d_model], with
    the branch on for the layers already planted."""
    out = torch.zeros((corpus.n_tokens, adapter.config.d_model), dtype=torch.float64)
    grabbed: list[torch.Tensor] = []

    def grab(_module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        grabbed.append(args[0].detach())
        raise _StopForward  # later layers are not needed

    handle = mlp_of(adapter.model, layer).register_forward_pre_hook(grab)
    try:
        with torch.no_grad():
            for sequences in plan_batches(corpus.lengths(), 16384):
                batch = make_batch(corpus, sequences, adapter.device)
                grabbed.clear()
                with contextlib.suppress(_StopForward):
                    adapter.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
                x = grabbed[0].reshape(-1, grabbed[0].shape[-1])
                real = batch.positions >= 0
                out[batch.positions[real]] = x[real].double()
    finally:
        handle.remove()
    return out.numpy()


def hesitation_circuit(layer: int, n_layers: int) -> list[Spec]:
    """The planted hesitation circuit's features at ``layer``: template features in the
    first half of the layers (they fire on the newline before a paragraph and write one
    direction), hesitation output features in the second half (they read that direction
    and promote the hesitation words)."""
    if n_layers == 1:
        return [HESITATION_OUTPUT] * OUTPUTS_PER_LAYER
    if layer < n_layers // 2:
        return [TEMPLATE] * TEMPLATES_PER_LAYER
    return [HESITATION_OUTPUT] * OUTPUTS_PER_LAYER


def fit_unembedding(
    adapter: AdapterModel, corpus: TokenizedCorpus, promoted: dict[tuple[str, ...], list[int]],
    unsaid: list[int], seed: int, steps: int = 300,
) -> dict[tuple[str, ...], np.ndarray]:  # fmt: skip
    """Train the random decoder's unembedding as a next-token predictor of the corpus
    (on the final hidden states, the branch off), so that the hybrid model writes
    corpus-like text, and return the directions it reserves: the circuit's under ``()``
    (no token reads it) and one per group of ``promoted`` words (only those words'
    rows read it: an output feature writing it promotes exactly them).

    They are the directions the hidden states vary least along; the fit never sees them,
    so every token's row is orthogonal to all of them before the groups' rows gain
    theirs. The ``unsaid`` targets weigh ``UNSAID_WEIGHT`` in the fit, so the hybrid model
    says them about that many times less often than the corpus does."""
    hidden, targets = _final_states(adapter, corpus)
    centred = hidden - hidden.mean(axis=0)
    _, _, vt = np.linalg.svd(centred[:: max(1, len(centred) // 20000)], full_matrices=False)
    names: list[tuple[str, ...]] = [(), *promoted]
    directions = {name: vt[-1 - k].astype(np.float64) for k, name in enumerate(names)}
    reserved = torch.from_numpy(np.stack([directions[n] for n in names])).float()
    h = torch.from_numpy(hidden).float()
    h = h - (h @ reserved.T) @ reserved
    y = torch.from_numpy(targets)
    weights = torch.where(torch.from_numpy(np.isin(targets, unsaid)), UNSAID_WEIGHT, 1.0)
    head = adapter.model.get_output_embeddings()
    weight = torch.zeros(head.weight.shape, dtype=torch.float32, requires_grad=True)
    generator = torch.Generator().manual_seed(seed)
    optimiser = torch.optim.Adam([weight], lr=0.05)
    for _ in range(steps):
        rows = torch.randint(0, len(h), (min(8192, len(h)),), generator=generator)
        losses = torch.nn.functional.cross_entropy(h[rows] @ weight.T, y[rows], reduction="none")
        loss = (losses * weights[rows]).sum() / weights[rows].sum()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    with torch.no_grad():
        fitted = weight.detach()
        fitted = fitted - (fitted @ reserved.T) @ reserved
        for k, name in enumerate(names[1:], 1):
            fitted[promoted[name]] += OUTPUT_LOGIT * reserved[k]
        head.weight.copy_(fitted.to(head.weight.dtype))
    log.info("unembedding fit: cross-entropy %.3f on %d positions", loss.item(), len(h))
    return directions


def _final_states(adapter: AdapterModel, corpus: TokenizedCorpus) -> tuple[np.ndarray, np.ndarray]:
    """The final (normed) hidden state at every corpus token that has a next token in
    its sequence, and that next token."""
    ends = np.repeat(corpus.offsets[1:], corpus.lengths())
    has_next = np.arange(corpus.n_tokens) + 1 < ends
    out = np.zeros((corpus.n_tokens, adapter.config.d_model), dtype=np.float32)
    decoder = adapter.model.get_decoder()
    adapter.set_enabled(False)
    try:
        with torch.no_grad():
            for sequences in plan_batches(corpus.lengths(), 16384):
                batch = make_batch(corpus, sequences, adapter.device)
                states = decoder(
                    input_ids=batch.input_ids, attention_mask=batch.attention_mask
                ).last_hidden_state
                x = states.reshape(-1, states.shape[-1])
                real = batch.positions >= 0
                out[batch.positions[real].cpu().numpy()] = x[real].float().cpu().numpy()
    finally:
        adapter.set_enabled(True)
    positions = np.flatnonzero(has_next)
    return out[positions], corpus.token_ids[positions + 1]


def plan_layer(rng: random.Random, layer: int = 0, n_layers: int = 1) -> list[Spec]:
    """The shuffled list of specs for one layer."""
    specs: list[Spec] = hesitation_circuit(layer, n_layers)
    start = rng.randrange(len(REASONING))
    n_cycled = PER_LAYER["reasoning"] - len(specs)
    specs += [REASONING[(start + i) % len(REASONING)] for i in range(n_cycled)]
    specs += [DOMAIN[i % len(DOMAIN)] for i in range(PER_LAYER["domain"])]
    specs += [LANGUAGE[i % len(LANGUAGE)] for i in range(PER_LAYER["language"])]
    n_random_tokens = PER_LAYER["uninterpretable"] - RANDOM_DIRECTIONS_PER_LAYER
    specs += [Spec("uninterpretable", kind="random_tokens")] * n_random_tokens
    specs += [Spec("uninterpretable", kind="random_direction")] * RANDOM_DIRECTIONS_PER_LAYER
    specs += [Spec("dead", kind="dead")] * PER_LAYER["dead"]
    rng.shuffle(specs)
    return specs


def _random_token_pool(words: dict[str, list[int]], corpus: TokenizedCorpus) -> list[str]:
    """Corpus words with no meaning in the taxonomy (neither planted triggers nor any
    category's cue words), no numbers and no punctuation: the material of uninterpretable
    random-token features."""
    planted = {w for spec in REASONING + DOMAIN + LANGUAGE for w in spec.triggers + spec.promotes}
    planted |= set(load_taxonomy().cue_index())
    counts = np.bincount(corpus.token_ids, minlength=max(max(v) for v in words.values()) + 1)
    pool = [
        word
        for word, ids in words.items()
        if word not in planted and word.isalpha() and len(word) > 2 and counts[ids].sum() >= 5
    ]
    return sorted(pool)


def train_demo_tokenizer(traces: list[Trace], shape: DemoShape) -> Any:
    """The demo's byte-level BPE, trained in memory on the laid-out corpus."""
    texts = [text for trace in traces for text, _ in segments(trace)[0]]
    return train_bpe_tokenizer(texts, SPECIAL_TOKENS, shape.vocab_size, BOS, EOS, PAD)


def _saved_and_reloaded(adapter: AdapterModel, tokenizer: Any, folder: Path) -> Any:
    """Save the checkpoint and load its tokenizer back exactly as ``collect`` will."""
    save_adapter(adapter, tokenizer, folder)
    reloaded = load_tokenizer(folder)
    if len(reloaded) != len(tokenizer):
        raise ValueError(
            f"{folder}: the tokenizer reloads with {len(reloaded)} tokens, not {len(tokenizer)}"
        )
    return reloaded


def build_demo(out: Path, seed: int = 0, shape: DemoShape | None = None) -> DemoPaths:
    """Write ``corpus.jsonl``, ``model/`` (a checkpoint in the paper's format) and
    ``ground_truth.json`` under ``out``."""
    shape = shape or DemoShape()
    out.mkdir(parents=True, exist_ok=True)
    paths = DemoPaths(out / "corpus.jsonl", out / "model", out / GROUND_TRUTH)
    write_corpus(paths.corpus, shape.n_traces, seed)
    traces = list(read_traces(paths.corpus))
    trained = train_demo_tokenizer(traces, shape)
    model = _tiny_qwen2(shape, len(trained), seed)
    config = TranscoderConfig(shape.n_features, True, shape.n_layers, shape.d_model)
    adapter = attach_branch(model, config)
    tokenizer = _saved_and_reloaded(adapter, trained, paths.checkpoint)
    corpus = tokenize_traces(traces, tokenizer, shape.max_length)
    words = _word_ids(tokenizer)
    pool = _random_token_pool(words, corpus)
    groups = {spec.promotes for spec in [*REASONING, HESITATION_OUTPUT] if spec.promotes}
    promoted = {g: [i for w in g for i in words[w]] for g in sorted(groups)}
    reserved = fit_unembedding(adapter, corpus, promoted, promoted[HESITATION_WORDS], seed)
    circuit = reserved[()]
    reserved_basis = np.stack(list(reserved.values()))  # orthonormal rows
    rng = random.Random(seed)
    np_rng = np.random.default_rng(seed)
    truth: list[dict[str, Any]] = []
    for layer in range(shape.n_layers):
        x = _mlp_inputs(adapter, corpus, layer)
        centroids = token_centroids(x, corpus.token_ids, len(tokenizer))
        specs = plan_layer(rng, layer, shape.n_layers)
        reads_circuit = layer >= shape.n_layers // 2 and shape.n_layers > 1
        enc_w = np.zeros((shape.n_features, shape.d_model))
        enc_b = np.zeros(shape.n_features)
        dec_w = np.zeros((shape.d_model, shape.n_features))
        for index, spec in enumerate(specs):
            triggers = spec.triggers
            if spec.kind == "random_tokens":
                triggers = tuple(rng.sample(pool, 8))
            if spec.kind == "hesitation_output" and reads_circuit:
                ids = np.asarray([i for w in triggers for i in words[w]])
                amplitude = float(np_rng.uniform(2.0, 4.0))
                enc = circuit_encoder(
                    x, corpus.token_ids, centroids, ids, circuit, amplitude, CIRCUIT_BOOST
                )
            else:
                enc = _plant_encoder(
                    spec, triggers, words, x, corpus.token_ids, centroids, np_rng, reserved_basis
                )
            enc_w[index], enc_b[index] = enc.weight, enc.bias
            if spec.kind == "template":
                dec_w[:, index] = TEMPLATE_WRITE * circuit
            elif spec.promotes:
                noise = 0.05 * np_rng.standard_normal(shape.d_model) / np.sqrt(shape.d_model)
                column = reserved[spec.promotes] + noise
                norm = HESITATION_WRITE if spec.kind == "hesitation_output" else OUTPUT_WRITE
                dec_w[:, index] = norm * column / np.linalg.norm(column)
            else:  # off the reserved directions: no random column promotes planted words
                column = random_decoder(shape.d_model, np_rng, norm=1.0)
                column -= reserved_basis.T @ (reserved_basis @ column)
                dec_w[:, index] = 0.05 * column / np.linalg.norm(column)
            truth.append(
                asdict(spec)
                | {
                    "feature_id": feature_id(layer, index),
                    "layer": layer,
                    "index": index,
                    "triggers": list(triggers),
                    "promotes": list(spec.promotes),
                    "precision": round(enc.precision, 4),
                    "recall": round(enc.recall, 4),
                    "fire_rate": round(enc.fire_rate, 6),
                }
            )
        enc_mod, dec_mod = adapter.enc_dec(layer)
        with torch.no_grad():
            enc_mod.weight.copy_(torch.from_numpy(enc_w))
            enc_mod.bias.copy_(torch.from_numpy(enc_b))
            dec_mod.weight.copy_(torch.from_numpy(dec_w))
            dec_mod.bias.copy_(torch.from_numpy(0.001 * np_rng.standard_normal(shape.d_model)))
    save_adapter(adapter, tokenizer, paths.checkpoint)
    paths.ground_truth.write_text(json.dumps(truth, indent=1) + "\n", encoding="utf-8")
    return paths


def _plant_encoder(
    spec: Spec,
    triggers: tuple[str, ...],
    words: dict[str, list[int]],
    x: np.ndarray,
    tokens: np.ndarray,
    centroids: np.ndarray,
    rng: np.random.Generator,
    avoid: np.ndarray | None = None,
) -> PlantedEncoder:
    amplitude = float(rng.uniform(1.0, 5.0))
    planters: dict[str, Callable[[], PlantedEncoder]] = {
        "dead": lambda: dead_encoder(x, rng),
        "random_direction": lambda: random_direction_encoder(x, rng, 0.03, amplitude, avoid),
    }
    if spec.kind in planters:
        return planters[spec.kind]()
    missing = [w for w in triggers if w not in words]
    if missing:
        raise ValueError(f"planted trigger words are not single tokens: {missing}")
    ids = np.asarray([i for w in triggers for i in words[w]])
    return token_set_encoder(x, tokens, centroids, ids, amplitude)
