"""Money travels as integer minor units plus one ISO 4217 currency per message.

Floats cannot hold most decimal amounts exactly and strings invite locale bugs, so every
amount is a strict integer (a JSON number without a fraction; `1.0`, `"1"` and `true` are
refused) in a field named `*_minor`. The currency sits once on the message rather than on
each amount because a message never mixes currencies.
"""
from __future__ import annotations

from typing import Annotated

from pydantic import Field, StrictInt, StringConstraints

_INT64_MAX = 2**63 - 1

# Bounded to a signed 64-bit integer so every store (SQLite INTEGER, PostgreSQL BIGINT,
# the legacy ERP) can hold any amount a message carries without overflow.
MinorUnits = Annotated[StrictInt, Field(ge=-_INT64_MAX - 1, le=_INT64_MAX)]
NonNegativeMinor = Annotated[StrictInt, Field(ge=0, le=_INT64_MAX)]
Currency = Annotated[str, StringConstraints(pattern=r"^[A-Z]{3}$")]

# ISO 4217 currencies whose minor unit is not a hundredth (every other code has 2 decimals).
_DECIMALS = {**dict.fromkeys(("BIF", "CLP", "DJF", "GNF", "ISK", "JPY", "KMF", "KRW", "PYG", "RWF", "UGX",
                              "UYI", "VND", "VUV", "XAF", "XOF", "XPF"), 0),
             **dict.fromkeys(("BHD", "IQD", "JOD", "KWD", "LYD", "OMR", "TND"), 3),
             **dict.fromkeys(("CLF", "UYW"), 4)}


def decimals(currency: str) -> int:
    """How many digits of `currency`'s minor units follow the decimal point."""
    return _DECIMALS.get(currency, 2)


def format_money(minor: int, currency: str) -> str:
    """`15000, "EUR"` -> `150.00 EUR`, `1500, "JPY"` -> `1,500 JPY`: an amount as a person reads
    it, exact (integer arithmetic, no float), whatever the currency's minor unit."""
    places = decimals(currency)
    sign, value = ("-" if minor < 0 else ""), abs(minor)
    whole, fraction = divmod(value, 10 ** places)
    return f"{sign}{whole:,}" + (f".{fraction:0{places}d}" if places else "") + f" {currency}"
