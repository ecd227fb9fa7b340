"""What tokens cost: a price table (package data, overridable) and the cost of a usage."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from adapters.errors import UserError
from labeler.run.schemas import Usage

PRICES_ENV = "LABELER_PRICES"


class Price(BaseModel):
    """US dollars per million tokens."""

    model_config = ConfigDict(extra="forbid")

    input: float = Field(ge=0)
    cached_input: float = Field(ge=0)
    cache_write: float | None = Field(None, ge=0, description="default: the input price")
    output: float = Field(ge=0)

    def cost(self, usage: Usage) -> float:
        write = self.input if self.cache_write is None else self.cache_write
        dollars = (
            usage.input_tokens * self.input
            + usage.cached_tokens * self.cached_input
            + usage.cache_write_tokens * write
            + usage.output_tokens * self.output
        )
        return dollars / 1e6


class PriceFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    about: str = ""
    prices: dict[str, Price]


@dataclass(frozen=True)
class PriceTable:
    prices: dict[str, Price]

    def lookup(self, judge: str) -> Price | None:
        """The price of a judge name (``PROVIDER:MODEL``): an exact key first, then the
        longest matching ``PREFIX*`` key."""
        if judge in self.prices:
            return self.prices[judge]
        matches = [k for k in self.prices if k.endswith("*") and judge.startswith(k[:-1])]
        return self.prices[max(matches, key=len)] if matches else None

    def cost(self, judge: str, usage: Usage) -> float | None:
        price = self.lookup(judge)
        return None if price is None else price.cost(usage)


def _read(text: str, where: str) -> dict[str, Price]:
    try:
        return PriceFile.model_validate(json.loads(text)).prices
    except json.JSONDecodeError as exc:
        raise UserError(f"{where}: not valid JSON: {exc}") from exc
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        raise UserError(f"{where}: field {field}: {first['msg']}") from exc


def load_prices(path: Path | None = None) -> PriceTable:
    """The packaged table, overridden entry by entry by ``path`` or ``$LABELER_PRICES``
    (a JSON file of the same form: ``{"prices": {"openai:MODEL": {...}}}``)."""
    packaged = resources.files("labeler.judges").joinpath("prices.json").read_text("utf-8")
    prices = _read(packaged, "packaged prices.json")
    override = path or (Path(os.environ[PRICES_ENV]) if os.environ.get(PRICES_ENV) else None)
    if override is not None:
        if not override.exists():
            raise UserError(f"{override}: price file not found")
        prices |= _read(override.read_text("utf-8"), str(override))
    return PriceTable(prices)
