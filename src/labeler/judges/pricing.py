"""What tokens cost: a price table and the cost of a usage.

A judge name ``PROVIDER:MODEL`` is priced, for a price tier (``standard``, ``batch`` or
``flex``), from the first of these sources that knows it:

1. an override file (``--prices FILE`` or ``$LABELER_PRICES``), entry by entry; an entry
   may carry ``batch`` and ``flex`` prices, and a tier it does not give falls through;
2. the maintained ``genai-prices`` package, for ``openai:`` and ``anthropic:`` judges,
   from the data bundled with the installed version (never downloaded);
3. the packaged ``prices.json``, which holds the free judges (``hf:*``, ``heuristic``).

A judge none of them knows has no price: ``cost`` is ``None`` and its tokens are still
counted by the caller.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from decimal import Decimal
from functools import cache
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from labeler.errors import UserError
from labeler.run.schemas import Usage

if TYPE_CHECKING:
    from genai_prices.data_snapshot import DataSnapshot

PRICES_ENV = "LABELER_PRICES"

Tier = Literal["standard", "batch", "flex"]
"""How requests are sent: standard, the batch API (OpenAI, Anthropic), or OpenAI's flex
service tier. Each may have its own prices."""

TIERS: tuple[Tier, ...] = get_args(Tier)

# genai-prices' request context that selects a tier's prices (None: the standard ones).
_PRICE_CONTEXT: dict[Tier, dict[str, str] | None] = {
    "standard": None,
    "batch": {"processing": "batch"},
    "flex": {"service_tier": "flex"},
}
# Our provider prefix -> genai-prices' provider id. Other providers are not looked up:
# ``hf:`` runs locally, and genai-prices has no entry for it.
_GENAI_PROVIDERS = {"openai": "openai", "anthropic": "anthropic"}
# Dates in the price comments of those providers that say when prices were checked:
# "rates verified on 2026-10-14", "Verified against OpenAI on 2026-10-15",
# "batch price table as of 2026-10-14".
_CHECKED_RE = re.compile(
    r"\b(?:verified(?: against \S+)? on|as of) (\d{4}-\d{2}-\d{2})\b", re.IGNORECASE
)


class Price(BaseModel):
    """US dollars per million tokens, at one tier."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input: float = Field(ge=0, description="input not read from or written to a cache")
    cached_input: float = Field(ge=0, description="input read from the prompt cache")
    cache_write: float | None = Field(None, ge=0, description="default: the input price")
    output: float = Field(ge=0)

    @property
    def free(self) -> bool:
        """True when every kind of token costs nothing (a local model, the heuristic)."""
        return not (self.input or self.cached_input or self.cache_write or self.output)

    def cost(self, usage: Usage) -> float:
        """The dollars ``usage`` costs at these prices."""
        write = self.input if self.cache_write is None else self.cache_write
        dollars = (
            usage.input_tokens * self.input
            + usage.cached_tokens * self.cached_input
            + usage.cache_write_tokens * write
            + usage.output_tokens * self.output
        )
        return dollars / 1e6


class PriceEntry(Price):
    """A price file's entry: the standard prices, and optionally a tier's own."""

    batch: Price | None = None
    flex: Price | None = None

    def at(self, tier: Tier) -> Price | None:
        """The prices at ``tier``; a free entry is free at every tier, and ``None`` means
        this entry does not say (the next source is asked)."""
        if tier == "standard" or self.free:
            return Price(input=self.input, cached_input=self.cached_input,
                         cache_write=self.cache_write, output=self.output)  # fmt: skip
        return self.batch if tier == "batch" else self.flex


class PriceFile(BaseModel):
    """A price file: ``{"about": "...", "prices": {"PROVIDER:MODEL": {...}}}``."""

    model_config = ConfigDict(extra="forbid")

    about: str = ""
    prices: dict[str, PriceEntry]


def _match(entries: dict[str, PriceEntry], judge: str) -> PriceEntry | None:
    """The entry of ``judge``: an exact key first, then the longest matching ``PREFIX*``."""
    if judge in entries:
        return entries[judge]
    matches = [k for k in entries if k.endswith("*") and judge.startswith(k[:-1])]
    return entries[max(matches, key=len)] if matches else None


@dataclass(frozen=True)
class PriceTable:
    """Prices of judges: overrides, then genai-prices, then the packaged table.

    A judge's price at a tier is resolved once and kept, so ``lookup`` and ``cost`` are
    dictionary look-ups after the first call. ``override_path`` is only reported (in
    ``source``); ``use_genai_prices=False`` leaves genai-prices out altogether.
    """

    overrides: dict[str, PriceEntry] = field(default_factory=dict)
    packaged: dict[str, PriceEntry] = field(default_factory=dict)
    override_path: Path | None = None
    use_genai_prices: bool = True
    _resolved: dict[tuple[str, Tier], Price | None] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def lookup(self, judge: str, tier: Tier = "standard") -> Price | None:
        """The price of a judge name (``PROVIDER:MODEL``) at ``tier``, or ``None`` when no
        source knows it. In override and packaged tables, an exact key wins over the
        longest matching ``PREFIX*`` key."""
        try:
            return self._resolved[judge, tier]
        except KeyError:
            price = self._resolved[judge, tier] = self._resolve(judge, tier)
            return price

    def cost(self, judge: str, usage: Usage, tier: Tier = "standard") -> float | None:
        """The dollars ``usage`` costs ``judge`` at ``tier``; ``None`` for an unknown price."""
        price = self.lookup(judge, tier)
        return None if price is None else price.cost(usage)

    @property
    def as_of(self) -> str | None:
        """When the default prices were last checked (``YYYY-MM-DD``), per genai-prices'
        own notes; ``None`` when it says no date or is not used."""
        return _genai_checked_on() if self.use_genai_prices else None

    @property
    def source(self) -> str:
        """Where prices come from, in one line for users."""
        if not self.use_genai_prices:
            parts = ["packaged prices.json (free judges only)"]
        elif (checked := self.as_of) is None:
            parts = [f"genai-prices {_genai_version()}"]
        else:
            parts = [f"genai-prices {_genai_version()} (prices last checked {checked})"]
        if self.override_path is not None:
            parts.append(f"overrides from {self.override_path}")
        return "; ".join(parts)

    def _resolve(self, judge: str, tier: Tier) -> Price | None:
        if tier not in TIERS:
            raise ValueError(f"price tier {tier!r}: expected one of {', '.join(TIERS)}")
        entry = _match(self.overrides, judge)
        if entry is not None and (price := entry.at(tier)) is not None:
            return price
        provider, _, model = judge.partition(":")
        genai_id = _GENAI_PROVIDERS.get(provider) if self.use_genai_prices and model else None
        if genai_id is not None and (price := _genai_price(genai_id, model, tier)) is not None:
            return price
        entry = _match(self.packaged, judge)
        return None if entry is None else entry.at(tier)


@cache
def _genai_snapshot() -> DataSnapshot:
    """The price data bundled with the installed genai-prices, never an auto-updated
    download (so prices match the version and date that ``source`` reports)."""
    from genai_prices.data import providers
    from genai_prices.data_snapshot import DataSnapshot

    return DataSnapshot(providers=providers, from_auto_update=False)


@cache
def _genai_price(provider_id: str, model: str, tier: Tier) -> Price | None:
    """A model's prices at a tier from genai-prices, or ``None`` for a model it lacks.

    Each kind of token is priced by a one-token usage (genai-prices counts cache reads
    and writes inside ``input_tokens``, so the probes include them there). One token is
    below every long-context threshold, so a model priced by prompt length gets its base
    rate: our usages add up many calls, and their total says nothing about one prompt.
    A tier genai-prices has no rate for is priced at the standard rate (its own rule).
    """
    from genai_prices import Usage as GenaiUsage

    snapshot = _genai_snapshot()
    context = _PRICE_CONTEXT[tier]

    def dollars(**tokens: int) -> Decimal:
        calc = snapshot.calc(GenaiUsage(**tokens), model, provider_id, None, None, context)
        return calc.total_price

    try:
        fixed = dollars()  # a per-request fee, if any, is left out of the token prices
        per_token = {
            "input": dollars(input_tokens=1),
            "cached_input": dollars(input_tokens=1, cache_read_tokens=1),
            "cache_write": dollars(input_tokens=1, cache_write_tokens=1),
            "output": dollars(output_tokens=1),
        }
    except LookupError:
        return None
    return Price(**{kind: float((d - fixed) * 1_000_000) for kind, d in per_token.items()})


@cache
def _genai_version() -> str:
    from genai_prices import __version__

    return __version__


@cache
def _genai_checked_on() -> str | None:
    """The newest date on which genai-prices' notes say OpenAI or Anthropic prices were
    verified ("verified on 2026-10-14", "as of 2026-10-14"), or ``None``."""
    from genai_prices.data import providers

    dates = [
        found
        for provider in providers
        if provider.id in _GENAI_PROVIDERS.values()
        for comment in [provider.price_comments, *(m.price_comments for m in provider.models)]
        if comment
        for found in _CHECKED_RE.findall(comment)
    ]
    return max(dates, default=None)


def _read(text: str, where: str) -> dict[str, PriceEntry]:
    try:
        return PriceFile.model_validate(json.loads(text)).prices
    except json.JSONDecodeError as exc:
        raise UserError(f"{where}: not valid JSON: {exc}") from exc
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        raise UserError(f"{where}: field {loc}: {first['msg']}") from exc


def load_prices(path: Path | None = None) -> PriceTable:
    """The price table: genai-prices and the packaged free entries, overridden entry by
    entry by ``path`` or ``$LABELER_PRICES`` (a JSON file
    ``{"prices": {"openai:MODEL": {"input": ..., "cached_input": ..., "output": ...,
    "batch": {...}, "flex": {...}}}}``, dollars per million tokens)."""
    packaged = resources.files("labeler.judges").joinpath("prices.json").read_text("utf-8")
    override = path or (Path(os.environ[PRICES_ENV]) if os.environ.get(PRICES_ENV) else None)
    overrides: dict[str, PriceEntry] = {}
    if override is not None:
        if not override.is_file():
            raise UserError(f"{override}: price file not found")
        overrides = _read(override.read_text("utf-8"), str(override))
    return PriceTable(overrides, _read(packaged, "packaged prices.json"), override)
