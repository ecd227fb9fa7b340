"""Factories of the built-in judges, registered under their name prefixes."""

from __future__ import annotations

from labeler.errors import UnknownJudgeError, UserError
from labeler.judges.base import Judge, JudgeOptions
from labeler.judges.heuristic import HeuristicJudge
from labeler.judges.llm_judge import JudgeSettings, LLMJudge
from labeler.judges.pricing import load_prices
from labeler.judges.retry import RetryPolicy


def _model_of(name: str) -> str:
    prefix, _, model = name.partition(":")
    if not model.strip():
        raise UnknownJudgeError(f"judge {name!r} names no model; write {prefix}:MODEL")
    return model


# Flex capacity comes back in minutes rather than seconds: its 429s wait longer.
FLEX_BASE_DELAY_S = 10.0
FLEX_MAX_DELAY_S = 300.0


def _llm_judge(name: str, backend: object, options: JudgeOptions) -> LLMJudge:
    settings = JudgeSettings(n_examples=options.n_examples, logprobs=options.logprobs,
                             seed=options.seed, scorers=options.scorers,
                             explain_from=options.explain_from,
                             resamples=options.resamples)  # fmt: skip
    retry = RetryPolicy(max_attempts=options.max_attempts)
    if options.service_tier == "flex":
        retry = RetryPolicy(max_attempts=options.max_attempts, base_delay=FLEX_BASE_DELAY_S,
                            max_delay=FLEX_MAX_DELAY_S)  # fmt: skip
    return LLMJudge(
        name,
        backend,  # type: ignore[arg-type]
        settings,
        retry,
        load_prices(options.prices),
    )


def heuristic_judge(name: str, options: JudgeOptions) -> Judge:
    if name != "heuristic":
        raise UnknownJudgeError(f"judge {name!r}: the heuristic judge takes no model")
    return HeuristicJudge(
        name,
        scorers=options.scorers,
        seed=options.seed,
        explain_from=options.explain_from,
        resamples=options.resamples,
    )


def _require(module: str, judge: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise UserError(
            f"judge {judge!r} needs the {module} package: pip install 'transcoder-labeler[llm]'"
        )


def openai_judge(name: str, options: JudgeOptions) -> Judge:
    from labeler.judges.openai_backend import OpenAIBackend

    _require("openai", name)
    backend = OpenAIBackend(
        name, _model_of(name), api=options.openai_api, base_url=options.base_url,
        timeout=options.timeout_s, max_output_tokens=options.max_output_tokens,
        service_tier=options.service_tier,
    )  # fmt: skip
    return _llm_judge(name, backend, options)


def anthropic_judge(name: str, options: JudgeOptions) -> Judge:
    from labeler.judges.anthropic_backend import AnthropicBackend

    _require("anthropic", name)
    if options.service_tier == "flex":
        raise UserError(f"judge {name!r}: --service-tier flex is OpenAI's; Anthropic has none")
    backend = AnthropicBackend(
        name, _model_of(name), timeout=options.timeout_s,
        max_output_tokens=options.max_output_tokens,
    )  # fmt: skip
    return _llm_judge(name, backend, options)


def hf_judge(name: str, options: JudgeOptions) -> Judge:
    from labeler.judges.hf_backend import HFBackend

    _require("transformers", name)
    backend = HFBackend(name, _model_of(name), device=options.device, dtype=options.dtype)
    return _llm_judge(name, backend, options)
