"""An open model run in-process with Hugging Face transformers: a :class:`LikelihoodBackend`.

The model and tokenizer load on first use, so that importing this module (and running
``labeler --help``) does not import torch. Model work runs in a worker thread, one call at
a time: concurrent callers wait for the lock instead of sharing the model.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from labeler.errors import UserError
from labeler.judges.backend import JudgeUnusable, OptionScores, Prompt, TextReply
from labeler.run.schemas import Usage


def render_prompt(tokenizer: Any, prompt: Prompt) -> str:
    """The prompt as the model reads it: the tokenizer's chat template with a generation
    prompt if it has one, else the system text, a blank line and the user text."""
    if getattr(tokenizer, "chat_template", None):
        messages = [
            {"role": "system", "content": prompt.system},
            {"role": "user", "content": prompt.user},
        ]
        return str(
            tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        )
    return f"{prompt.system}\n\n{prompt.user}\n"


def prompt_token_ids(tokenizer: Any, prompt: Prompt) -> list[int]:
    """Token ids of the rendered prompt. A chat template writes its own special tokens;
    the plain layout gets the tokenizer's usual ones (a BOS, for some)."""
    templated = bool(getattr(tokenizer, "chat_template", None))
    text = render_prompt(tokenizer, prompt)
    return list(tokenizer(text, add_special_tokens=not templated)["input_ids"])


def option_token_ids(tokenizer: Any, option: str) -> list[int]:
    """Token ids of an answer on its own, without special tokens."""
    return list(tokenizer(option, add_special_tokens=False)["input_ids"])


class HFBackend:
    """A causal LM from a local folder or a hub id, greedy generation and option scoring."""

    provider = "hf"

    def __init__(
        self,
        name: str,
        model_path: str,
        device: str = "auto",
        dtype: str = "auto",
        batch_size: int = 16,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, not {batch_size}")
        self.name = name
        self.model = model_path
        self.device = device
        self.dtype = dtype
        self.batch_size = batch_size
        self._lock = threading.Lock()
        self._loaded: tuple[Any, Any] | None = None

    def preflight(self) -> None:
        """Fail before any work when the model is neither a local folder nor shaped like a
        hub id (a hub model that cannot be fetched fails at its first call, and stops the
        labeling there)."""
        local = Path(self.model).expanduser()
        if local.exists():
            if not (local / "config.json").is_file():
                raise UserError(f"{self.name}: {local} holds no config.json; not a model folder")
        elif self.model.count("/") != 1 or self.model.startswith((".", "/", "~")):
            raise UserError(f"{self.name}: {self.model}: no such model folder")

    def _load(self) -> tuple[Any, Any]:
        """(model, tokenizer), loaded on the first call. Call with the lock held; a model
        that does not load makes the judge unusable."""
        if self._loaded is None:
            from adapters.branch import load_causal_lm
            from adapters.checkpoint import resolve_checkpoint

            try:
                folder = resolve_checkpoint(self.model)
                self._loaded = load_causal_lm(folder, self.device, self.dtype)
            except Exception as exc:  # many loader errors; each means "no model here"
                raise JudgeUnusable(
                    f"{self.model} does not load: {type(exc).__name__}: "
                    f"{str(exc).splitlines()[0] if str(exc) else ''}"
                ) from exc
        return self._loaded

    async def generate(self, prompt: Prompt, max_new_tokens: int) -> TextReply:
        """Free text, greedy."""
        return await asyncio.to_thread(self._generate, prompt, max_new_tokens)

    async def score_options(
        self, prompts: Sequence[Prompt], options: Sequence[str]
    ) -> OptionScores:
        """Mean log-probability per token of each option after each prompt."""
        return await asyncio.to_thread(self._score, list(prompts), list(options))

    async def aclose(self) -> None:
        self._loaded = None

    def _generate(self, prompt: Prompt, max_new_tokens: int) -> TextReply:
        import torch

        with self._lock:
            model, tokenizer = self._load()
            ids = prompt_token_ids(tokenizer, prompt)
            input_ids = torch.tensor([ids], device=model.device)
            with torch.inference_mode():
                out = model.generate(
                    input_ids=input_ids,
                    attention_mask=torch.ones_like(input_ids),
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=_pad_id(tokenizer),
                )
            new = out[0, len(ids) :].tolist()
            text = str(tokenizer.decode(new, skip_special_tokens=True))
        return TextReply(text, Usage(calls=1, input_tokens=len(ids), output_tokens=len(new)))

    def _score(self, prompts: list[Prompt], options: list[str]) -> OptionScores:
        with self._lock:
            model, tokenizer = self._load()
            prompt_ids = [prompt_token_ids(tokenizer, p) for p in prompts]
            option_ids = [option_token_ids(tokenizer, o) for o in options]
            empty = [o for o, ids in zip(options, option_ids, strict=True) if not ids]
            if empty:
                raise ValueError(f"options without any token cannot be scored: {empty}")
            pairs = [(i, j) for i in range(len(prompts)) for j in range(len(options))]
            # Longest first, so that each batch holds sequences of similar length.
            pairs.sort(key=lambda ij: len(prompt_ids[ij[0]]) + len(option_ids[ij[1]]), reverse=True)
            scores = [[0.0] * len(options) for _ in prompts]
            usage = Usage()
            for start in range(0, len(pairs), self.batch_size):
                batch = pairs[start : start + self.batch_size]
                seqs = [(prompt_ids[i], option_ids[j]) for i, j in batch]
                values = _score_batch(model, seqs, _pad_id(tokenizer))
                for (i, j), value in zip(batch, values, strict=True):
                    scores[i][j] = value
                n_tokens = sum(len(p) + len(o) for p, o in seqs)
                usage = usage + Usage(calls=1, input_tokens=n_tokens)
        return OptionScores(scores, usage)


def _pad_id(tokenizer: Any) -> int:
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    return 0


def _score_batch(model: Any, seqs: list[tuple[list[int], list[int]]], pad_id: int) -> list[float]:
    """Mean log-probability of each option's tokens after its prompt, in one right-padded
    forward pass. Logits are only computed at the positions that predict option tokens,
    when the model's forward supports ``logits_to_keep``."""
    import torch

    width = max(len(p) + len(o) for p, o in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    rows: list[int] = []
    cols: list[int] = []
    targets: list[int] = []
    for row, (prompt, option) in enumerate(seqs):
        seq = prompt + option
        input_ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
        rows += [row] * len(option)
        cols += range(len(prompt) - 1, len(seq) - 1)  # the logits at t predict token t + 1
        targets += option
    device = model.device
    kwargs: dict[str, Any] = {}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        keep = sorted(set(cols))
        where = {col: k for k, col in enumerate(keep)}
        kwargs["logits_to_keep"] = torch.tensor(keep, device=device)
        cols = [where[c] for c in cols]
    with torch.inference_mode():
        logits = model(
            input_ids=input_ids.to(device),
            attention_mask=mask.to(device),
            use_cache=False,
            **kwargs,
        ).logits
        picked = logits[torch.tensor(rows, device=device), torch.tensor(cols, device=device)]
        logprobs = picked.float().log_softmax(-1)
        token_lp = logprobs.gather(-1, torch.tensor(targets, device=device)[:, None])[:, 0]
        sums = torch.zeros(len(seqs), dtype=torch.float64, device=device)
        sums.index_add_(0, torch.tensor(rows, device=device), token_lp.double())
    counts = [len(option) for _, option in seqs]
    return [float(s) / n for s, n in zip(sums.tolist(), counts, strict=True)]
