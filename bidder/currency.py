"""Currency conversion through a configurable rate table (USD per unit of each currency)."""
from __future__ import annotations

import json
import math
import os

MICROS = 1_000_000


class CurrencyError(ValueError):
    """A rate table that cannot be read."""


class Rates:
    """USD value of one unit of each known currency; USD itself is always 1."""

    def __init__(self, usd_per_unit: dict[str, float]) -> None:
        for code, rate in usd_per_unit.items():
            if len(code) != 3 or not code.isalpha() or not (rate > 0 and math.isfinite(rate)):
                raise CurrencyError(f"rate {code}={rate!r}: need a 3-letter ISO-4217 code and a "
                                    "positive rate (USD per unit)")
        self._rates = {code.upper(): float(rate) for code, rate in usd_per_unit.items()}
        self._rates["USD"] = 1.0

    @classmethod
    def parse(cls, spec: str) -> "Rates":
        """``EUR=1.08,JPY=0.0067`` or the path of a JSON object ``{"EUR": 1.08}``."""
        if spec and os.path.isfile(spec):
            with open(spec, encoding="utf-8") as fh:
                try:
                    return cls({k: float(v) for k, v in json.load(fh).items()})
                except (ValueError, AttributeError) as exc:
                    raise CurrencyError(f"{spec}: expected a JSON object of CUR: rate ({exc})")
        table: dict[str, float] = {}
        for item in filter(None, (part.strip() for part in (spec or "").split(","))):
            code, sep, rate = item.partition("=")
            try:
                table[code.strip()] = float(rate)
            except ValueError:
                raise CurrencyError(f"currency rate {item!r}: write it as CUR=RATE, e.g. EUR=1.08")
            if not sep:
                raise CurrencyError(f"currency rate {item!r}: write it as CUR=RATE, e.g. EUR=1.08")
        return cls(table)

    def knows(self, code: str) -> bool:
        return code in self._rates

    def usd_per_unit(self, code: str) -> float:
        return self._rates[code]

    def to_usd(self, amount: float, code: str) -> float:
        return amount * self._rates[code]

    def from_usd(self, amount_usd: float, code: str) -> float:
        return amount_usd / self._rates[code]


def to_micros(amount: float) -> int:
    """Money as integer micros (1e-6 units), rounded half away from zero."""
    return int(math.floor(abs(amount) * MICROS + 0.5)) * (1 if amount >= 0 else -1)
