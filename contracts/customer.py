"""Customer master data as the CRM and the nightly legacy export know it.

The message carries the whole record, not a patch, so the last update wins and a
replay is harmless. Empty legacy columns must be mapped to None by the producer: an
empty string is not a valid email.
"""
from __future__ import annotations

from typing import Annotated, ClassVar

from pydantic import AwareDatetime, BaseModel, ConfigDict, StringConstraints

# A shape check only: deliverability is the CRM's business, not the bus's.
Email = Annotated[str, StringConstraints(max_length=254, pattern=r"^[^@\s]+@[^@\s]+\.[^@\s]+$")]


class CustomerUpdatedV1(BaseModel):
    TYPE: ClassVar[str] = "customer.updated.v1"
    model_config = ConfigDict(extra="forbid", frozen=True)

    customer_id: Annotated[str, StringConstraints(min_length=1, pattern=r"\S")]
    name: Annotated[str, StringConstraints(min_length=1, pattern=r"\S")]
    email: Email | None = None
    phone: str | None = None
    loyalty_card: str | None = None
    updated_at: AwareDatetime
