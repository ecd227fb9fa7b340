"""The in-process open-model backend against a tiny random-weight Qwen2 built here."""

from __future__ import annotations

import asyncio
import random
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from adapters.random_adapter import ModelShape, random_decoder
from adapters.tiny_tokenizer import train_bpe_tokenizer
from collectors.corpus import BOS, EOS, PAD, SPECIAL_TOKENS
from labeler.errors import UserError
from labeler.judges.backend import JudgeUnusable, LikelihoodBackend, Prompt
from labeler.judges.hf_backend import HFBackend, option_token_ids, render_prompt

TEXT = (
    "the model checks each step before it answers and then it waits because the sum of "
    "two numbers is not always what we expect so we verify the result again maybe later "
    "absolutely not yes no perhaps first second third answer question feature token"
)
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
PROMPTS = [
    Prompt("detect", "You judge features.", "Does it fire?"),
    Prompt("detect", "You judge features.", "The token is the sum of two numbers. Answer:"),
    Prompt(
        "classify",
        "You judge features carefully and answer with one word.",
        "the model checks each step before it answers and then it waits because the sum "
        "of two numbers is not always what we expect. Which category?",
    ),
]
OPTIONS = ["yes", "Yes!", " maybe later", " absolutely not, perhaps"]


@dataclass(frozen=True)
class TinyModel:
    folder: Path
    model: Any
    tokenizer: Any


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    rng = random.Random(0)
    words = TEXT.split()
    texts = [" ".join(rng.choice(words) for _ in range(30)) + "." for _ in range(20)]
    tokenizer = train_bpe_tokenizer(texts, SPECIAL_TOKENS, 400, BOS, EOS, PAD)
    shape = ModelShape(
        n_layers=2, d_model=32, intermediate=64, n_heads=4, n_kv_heads=2,
        vocab_size=len(tokenizer), max_positions=512,
    )  # fmt: skip
    model = random_decoder(shape, seed=0)
    folder = tmp_path_factory.mktemp("tiny") / "model"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return TinyModel(folder, model, tokenizer)


def _backend(folder: Path, batch_size: int = 16) -> HFBackend:
    return HFBackend(f"hf:{folder}", str(folder), "cpu", "float32", batch_size)


def _reference_mean_logprob(model: Any, prompt_ids: list[int], option_ids: list[int]) -> float:
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt_ids + option_ids])).logits[0]
    logprobs = torch.log_softmax(logits.double(), dim=-1)
    start = len(prompt_ids) - 1
    picked = [float(logprobs[start + k, t]) for k, t in enumerate(option_ids)]
    return sum(picked) / len(picked)


def test_is_a_likelihood_backend(tiny: TinyModel) -> None:
    backend = _backend(tiny.folder)
    assert isinstance(backend, LikelihoodBackend)
    assert (backend.provider, backend.model, backend.name) == (
        "hf",
        str(tiny.folder),
        f"hf:{tiny.folder}",
    )


def test_score_options_matches_per_pair_reference(tiny: TinyModel) -> None:
    tok = tiny.tokenizer
    assert tok.chat_template is None
    prompt_ids = [tok(f"{p.system}\n\n{p.user}\n")["input_ids"] for p in PROMPTS]
    option_ids = [tok(o, add_special_tokens=False)["input_ids"] for o in OPTIONS]
    assert len({len(ids) for ids in prompt_ids}) == len(PROMPTS)
    assert len({len(ids) for ids in option_ids}) == len(OPTIONS)

    backend = _backend(tiny.folder, batch_size=3)
    scores = asyncio.run(backend.score_options(PROMPTS, OPTIONS))

    expected = [[_reference_mean_logprob(tiny.model, p, o) for o in option_ids] for p in prompt_ids]
    assert len(scores.logprobs) == len(PROMPTS)
    for got_row, want_row in zip(scores.logprobs, expected, strict=True):
        assert got_row == pytest.approx(want_row, abs=1e-4)
    n_pairs = len(PROMPTS) * len(OPTIONS)
    assert scores.usage.calls == -(-n_pairs // 3)
    real_tokens = sum(len(p) + len(o) for p in prompt_ids for o in option_ids)
    assert scores.usage.input_tokens == real_tokens
    assert scores.usage.output_tokens == 0

    one_batch = asyncio.run(_backend(tiny.folder, batch_size=64).score_options(PROMPTS, OPTIONS))
    assert one_batch.usage.calls == 1
    for got_row, want_row in zip(one_batch.logprobs, expected, strict=True):
        assert got_row == pytest.approx(want_row, abs=1e-4)


def test_generate_is_greedy_and_counts_tokens(tiny: TinyModel) -> None:
    prompt = PROMPTS[1]
    backend = _backend(tiny.folder)
    reply = asyncio.run(backend.generate(prompt, max_new_tokens=5))
    assert isinstance(reply.text, str)
    n_prompt = len(tiny.tokenizer(f"{prompt.system}\n\n{prompt.user}\n")["input_ids"])
    assert reply.usage.calls == 1
    assert reply.usage.input_tokens == n_prompt
    assert 1 <= reply.usage.output_tokens <= 5
    again = asyncio.run(backend.generate(prompt, max_new_tokens=5))
    assert again.text == reply.text


def test_chat_template_renders_system_and_user(tiny: TinyModel, tmp_path: Path) -> None:
    folder = tmp_path / "chat"
    shutil.copytree(tiny.folder, folder)
    tiny.tokenizer.chat_template = CHAT_TEMPLATE
    try:
        tiny.tokenizer.save_pretrained(folder)
        prompt = PROMPTS[0]
        text = render_prompt(tiny.tokenizer, prompt)
    finally:
        tiny.tokenizer.chat_template = None
    assert prompt.system in text and prompt.user in text
    assert text.index(prompt.system) < text.index(prompt.user)
    assert text.endswith("<|im_start|>assistant\n")
    assert render_prompt(tiny.tokenizer, prompt) == f"{prompt.system}\n\n{prompt.user}\n"

    # The backend over that folder reads the templated prompt.
    reply = asyncio.run(_backend(folder).generate(prompt, max_new_tokens=2))
    assert reply.usage.input_tokens == len(
        tiny.tokenizer(text, add_special_tokens=False)["input_ids"]
    )


def test_concurrent_callers_never_share_the_model(tiny: TinyModel) -> None:
    backend = _backend(tiny.folder, batch_size=2)
    model, tokenizer = backend._load()
    active = 0
    most = 0
    guard = threading.Lock()

    def enter(_module: Any, _args: Any) -> None:
        nonlocal active, most
        with guard:
            active += 1
            most = max(most, active)
        time.sleep(0.01)

    def leave(_module: Any, _args: Any, _out: Any) -> None:
        nonlocal active
        with guard:
            active -= 1

    handles = [model.register_forward_pre_hook(enter), model.register_forward_hook(leave)]

    async def many() -> list[Any]:
        return await asyncio.gather(
            *(backend.score_options(PROMPTS[:2], OPTIONS[:2]) for _ in range(3)),
            backend.generate(PROMPTS[0], max_new_tokens=2),
        )

    try:
        results = asyncio.run(many())
    finally:
        for handle in handles:
            handle.remove()
    assert most == 1
    assert results[0].logprobs == results[1].logprobs == results[2].logprobs
    assert option_token_ids(tokenizer, "yes") == tiny.tokenizer("yes")["input_ids"]


def test_missing_model_path_fails_the_preflight_and_makes_the_judge_unusable(
    tmp_path: Path,
) -> None:
    missing = tmp_path / "no_such_model"
    backend = HFBackend("hf:missing", str(missing), "cpu", "float32")
    with pytest.raises(UserError, match=r"hf:missing: .*no_such_model: no such model folder"):
        backend.preflight()
    with pytest.raises(JudgeUnusable, match="no_such_model does not load"):
        asyncio.run(backend.score_options(PROMPTS[:1], ["yes"]))


def test_empty_option_is_refused(tiny: TinyModel) -> None:
    with pytest.raises(ValueError, match="without any token"):
        asyncio.run(_backend(tiny.folder).score_options(PROMPTS[:1], ["yes", ""]))
