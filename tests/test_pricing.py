"""The price table: genai-prices by tier, overrides per tier, the free entries, errors."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from labeler.errors import UserError
from labeler.judges.pricing import PRICES_ENV, TIERS, PriceTable, Tier, load_prices
from labeler.run.schemas import Usage

MILLION = 1_000_000
IN_OUT = Usage(input_tokens=MILLION, output_tokens=MILLION)


@pytest.fixture(autouse=True)
def _no_env_prices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PRICES_ENV, raising=False)


def _override(tmp_path: Path, prices: dict[str, Any]) -> PriceTable:
    path = tmp_path / "prices.json"
    path.write_text(json.dumps({"prices": prices}))
    return load_prices(path)


@pytest.mark.parametrize(
    ("tier", "dollars"), [("standard", 2.25), ("batch", 1.125), ("flex", 1.125)]
)
def test_gpt_5_mini_costs_what_genai_prices_says_at_each_tier(tier: Tier, dollars: float) -> None:
    assert load_prices().cost("openai:gpt-5-mini", IN_OUT, tier) == pytest.approx(dollars)


def test_the_tier_defaults_to_standard() -> None:
    table, mini = load_prices(), "openai:gpt-5-mini"
    assert table.cost(mini, IN_OUT) == table.cost(mini, IN_OUT, "standard")
    assert table.lookup(mini) == table.lookup(mini, "standard")


def test_claude_haiku_batch_is_half_the_standard_price() -> None:
    table = load_prices()
    standard = table.cost("anthropic:claude-haiku-4-5", IN_OUT)
    assert standard is not None
    assert standard == pytest.approx(6.00)
    assert table.cost("anthropic:claude-haiku-4-5", IN_OUT, "batch") == pytest.approx(standard / 2)


def test_dated_model_names_are_priced_as_their_model() -> None:
    table = load_prices()
    haiku = table.lookup("anthropic:claude-haiku-4-5")
    assert haiku is not None
    assert table.lookup("anthropic:claude-haiku-4-5-20251001") == haiku
    assert table.lookup("openai:gpt-5-mini-2025-08-07") == table.lookup("openai:gpt-5-mini")


@pytest.mark.parametrize(
    ("usage", "dollars"),
    [
        (Usage(cached_tokens=MILLION), 0.10),
        (Usage(cache_write_tokens=MILLION), 1.25),
        (Usage(input_tokens=MILLION), 1.00),
        (Usage(output_tokens=MILLION), 5.00),
    ],
)
def test_cache_reads_and_writes_are_priced(usage: Usage, dollars: float) -> None:
    assert load_prices().cost("anthropic:claude-haiku-4-5", usage) == pytest.approx(dollars)


def test_openai_cache_writes_cost_the_input_price() -> None:
    price = load_prices().lookup("openai:gpt-5-mini")
    assert price is not None
    assert price.cost(Usage(cache_write_tokens=MILLION)) == pytest.approx(0.25)
    assert price.cost(Usage(cached_tokens=MILLION)) == pytest.approx(0.025)


def test_a_long_context_model_gets_its_base_rate() -> None:
    # claude-sonnet-4-5 charges more for prompts over 200k tokens; a usage totals many
    # calls, so the base rate applies however large it is.
    cost = load_prices().cost("anthropic:claude-sonnet-4-5", IN_OUT)
    assert cost == pytest.approx(3.00 + 15.00)


def test_an_override_wins_for_its_tier_and_falls_through_for_a_tier_it_lacks(
    tmp_path: Path,
) -> None:
    table = _override(tmp_path, {"openai:gpt-5-mini": {
        "input": 1.0, "cached_input": 0.5, "output": 3.0,
        "batch": {"input": 0.5, "cached_input": 0.25, "output": 1.5},
    }})  # fmt: skip
    assert table.cost("openai:gpt-5-mini", IN_OUT) == pytest.approx(4.0)
    assert table.cost("openai:gpt-5-mini", IN_OUT, "batch") == pytest.approx(2.0)
    assert table.cost("openai:gpt-5-mini", IN_OUT, "flex") == pytest.approx(1.125)  # genai-prices
    nano = load_prices().cost("openai:gpt-5-nano", IN_OUT)
    assert nano is not None
    assert table.cost("openai:gpt-5-nano", IN_OUT) == nano  # not overridden


def test_an_override_tier_of_a_model_nobody_else_knows_is_unknown(tmp_path: Path) -> None:
    table = _override(tmp_path, {"openai:fake-model": {"input": 1.0, "cached_input": 0.1,
                                                       "output": 4.0}})  # fmt: skip
    assert table.cost("openai:fake-model", IN_OUT) == pytest.approx(5.0)
    assert table.lookup("openai:fake-model", "batch") is None


def test_prefix_keys_match_and_the_longest_wins(tmp_path: Path) -> None:
    table = _override(tmp_path, {
        "openai:my-*": {"input": 1.0, "cached_input": 0.0, "output": 1.0},
        "openai:my-big-*": {"input": 2.0, "cached_input": 0.0, "output": 2.0},
        "openai:my-big-one": {"input": 3.0, "cached_input": 0.0, "output": 3.0},
    })  # fmt: skip
    assert table.cost("openai:my-small", IN_OUT) == pytest.approx(2.0)
    assert table.cost("openai:my-big-two", IN_OUT) == pytest.approx(4.0)
    assert table.cost("openai:my-big-one", IN_OUT) == pytest.approx(6.0)


def test_a_free_override_is_free_at_every_tier(tmp_path: Path) -> None:
    table = _override(tmp_path, {"openai:Qwen/*": {"input": 0, "cached_input": 0, "output": 0}})
    for tier in TIERS:
        assert table.cost("openai:Qwen/Qwen2.5-7B-Instruct", IN_OUT, tier) == 0.0


@pytest.mark.parametrize("judge", ["hf:Qwen/Qwen2.5-0.5B-Instruct", "heuristic"])
@pytest.mark.parametrize("tier", TIERS)
def test_local_judges_are_free_at_every_tier(judge: str, tier: Tier) -> None:
    assert load_prices().cost(judge, IN_OUT, tier) == 0.0


@pytest.mark.parametrize(
    "judge", ["openai:no-such-model", "anthropic:claude-no-such", "mistral:large", "nobody"]
)
def test_an_unknown_model_has_no_price(judge: str) -> None:
    table = load_prices()
    for tier in TIERS:
        assert table.lookup(judge, tier) is None
        assert table.cost(judge, IN_OUT, tier) is None


def test_an_unknown_tier_is_refused() -> None:
    with pytest.raises(ValueError, match="price tier"):
        load_prices().lookup("openai:gpt-5-mini", "priority")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("entry", "field"),
    [
        ({"input": 1.0, "output": 2.0}, "prices.openai:x.cached_input"),
        ({"input": -1.0, "cached_input": 0.0, "output": 2.0}, "prices.openai:x.input"),
        ({"input": 1.0, "cached_input": 0.0, "output": 2.0, "flex": {"input": 1.0}},
         "prices.openai:x.flex.cached_input"),
        ({"input": 1.0, "cached_input": 0.0, "output": 2.0, "priority": {}},
         "prices.openai:x.priority"),
    ],
)  # fmt: skip
def test_a_malformed_override_names_the_file_and_field(
    tmp_path: Path, entry: dict[str, Any], field: str
) -> None:
    with pytest.raises(UserError) as raised:
        _override(tmp_path, {"openai:x": entry})
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith(f"{tmp_path / 'prices.json'}: field {field}: ")


def test_an_override_that_is_not_json_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "prices.json"
    path.write_text("{nope")
    with pytest.raises(UserError, match=re.escape(f"{path}: not valid JSON")):
        load_prices(path)


def test_a_missing_override_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "nowhere.json"
    with pytest.raises(UserError, match=re.escape(f"{missing}: price file not found")):
        load_prices(missing)
    monkeypatch.setenv(PRICES_ENV, str(missing))
    with pytest.raises(UserError, match=re.escape(f"{missing}: price file not found")):
        load_prices()


def test_the_environment_variable_gives_the_override(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "env.json"
    path.write_text(json.dumps({"prices": {"openai:gpt-5-mini": {
        "input": 9.0, "cached_input": 0.0, "output": 0.0}}}))  # fmt: skip
    monkeypatch.setenv(PRICES_ENV, str(path))
    table = load_prices()
    assert table.cost("openai:gpt-5-mini", Usage(input_tokens=MILLION)) == pytest.approx(9.0)
    assert table.source.endswith(f"; overrides from {path}")


def test_source_and_as_of_say_where_the_prices_come_from_and_when(tmp_path: Path) -> None:
    import genai_prices

    table = load_prices()
    assert table.as_of is not None
    assert re.fullmatch(r"20\d\d-[01]\d-[0-3]\d", table.as_of)
    version = genai_prices.__version__
    assert table.source == f"genai-prices {version} (prices last checked {table.as_of})"
    overridden = _override(tmp_path, {})
    assert overridden.source.endswith(f"; overrides from {tmp_path / 'prices.json'}")
    assert "\n" not in overridden.source


def test_without_genai_prices_only_the_free_entries_are_known() -> None:
    table = PriceTable(packaged=load_prices().packaged, use_genai_prices=False)
    assert table.lookup("openai:gpt-5-mini") is None
    assert table.cost("heuristic", IN_OUT) == 0.0
    assert table.as_of is None
    assert "genai-prices" not in table.source
