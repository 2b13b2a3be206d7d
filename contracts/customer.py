"""Customer master data as the estate's systems hold it.

`customer.updated.v1` is the record as the CRM's nightly export knew it until
customer mastering (services/customers): a whole record, last update wins.
Nothing emits it any more; it stays registered so a message still queued or
parked in a dead-letter queue can be read.

`customer.updated.v2` is one system's record after a change there, with the
change's origin (the system, or the CRM's nightly file) and the system's own
time of the change. It carries only the attributes that system holds
(`values`: an attribute left out is one the system does not hold; null is one
it holds empty), so the customer hub can tell "empty here" from "not mine".

`crm.customer_exported.v1` is one row of the CRM's nightly export file, flat
as the file is (consents as Y/N).
"""
from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import (AwareDatetime, BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, StrictBool,
                      StringConstraints, model_serializer)

# A shape check only: deliverability is the CRM's business, not the bus's.
Email = Annotated[str, StringConstraints(max_length=254, pattern=r"^[^@\s]+@[^@\s]+\.[^@\s]+$")]


def _text(max_length: int):
    return Annotated[str, StringConstraints(min_length=1, max_length=max_length, pattern=r"\S")]


RecordId = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^\S+$")]
Origin = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]{0,31}$")]
YesNo = Annotated[str, StringConstraints(pattern=r"^[YN]$")]

CONSENTS = ("consent_marketing_email", "consent_sms", "consent_data_sharing")


class CustomerUpdatedV1(BaseModel):
    TYPE: ClassVar[str] = "customer.updated.v1"
    model_config = ConfigDict(extra="forbid", frozen=True)

    customer_id: Annotated[str, StringConstraints(min_length=1, pattern=r"\S")]
    name: Annotated[str, StringConstraints(min_length=1, pattern=r"\S")]
    email: Email | None = None
    phone: str | None = None
    loyalty_card: str | None = None
    updated_at: AwareDatetime


class CustomerValues(BaseModel):
    """The mastered attributes, each optional: a field left out is not held by the sender,
    null is held empty. Written out with only the fields that were given."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: _text(80) | None = None
    email: Email | None = None
    phone: _text(30) | None = None
    loyalty_card: _text(20) | None = Field(None, description="the customer's (main) loyalty card")
    billing_address: _text(200) | None = None
    tax_id: _text(20) | None = None
    household_id: _text(32) | None = Field(None, description="the loyalty programme's household")
    reward_preference: _text(32) | None = Field(None, description="how the member likes rewards: points, vouchers…")
    consent_marketing_email: StrictBool | None = None
    consent_sms: StrictBool | None = None
    consent_data_sharing: StrictBool | None = None

    @model_serializer(mode="wrap")
    def _given_only(self, handler: SerializerFunctionWrapHandler) -> dict:
        data = handler(self)
        return {name: value for name, value in data.items() if name in self.model_fields_set}

    def given(self) -> dict:
        """{attribute: value} of the attributes the sender gave."""
        return {name: getattr(self, name) for name in self.model_fields_set}


ATTRIBUTES: tuple[str, ...] = tuple(CustomerValues.model_fields)


class CustomerUpdatedV2(BaseModel):
    """One system's customer record after a change there, with where the change came from."""

    TYPE: ClassVar[str] = "customer.updated.v2"
    model_config = ConfigDict(extra="forbid", frozen=True)

    origin: Origin = Field(description="who changed it: a system (crm, erp, loyalty) or a feed of one (crm_file)")
    record_id: RecordId = Field(description="the record's key in its system: CRM id, ERP CUST_NO, loyalty card")
    changed_at: AwareDatetime = Field(description="the system's own time of the change")
    values: CustomerValues = Field(description="the attributes the record holds, as they are now")


class CrmCustomerExportedV1(BaseModel):
    """One row of the CRM's nightly customer export (config/filedrops.yaml `customers`)."""

    TYPE: ClassVar[str] = "crm.customer_exported.v1"
    model_config = ConfigDict(extra="forbid", frozen=True)

    customer_id: Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^\S+$")]
    name: _text(80)
    email: Email | None = None
    phone: _text(30) | None = None
    loyalty_card: _text(20) | None = None
    updated_at: AwareDatetime = Field(description="when the CRM last changed the record")
    consent_marketing_email: YesNo | None = None
    consent_sms: YesNo | None = None
    consent_data_sharing: YesNo | None = None

    def given(self) -> dict:
        """The row as the attributes the CRM holds, `CustomerValues.given()`'s shape (a consent
        column left empty: not held). The row's constraints are CustomerValues' own."""
        given = {"name": self.name, "email": self.email, "phone": self.phone, "loyalty_card": self.loyalty_card}
        given.update({c: getattr(self, c) == "Y" for c in CONSENTS if getattr(self, c) is not None})
        return given


ConsentName = Literal["marketing_email", "sms", "data_sharing"]
