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
