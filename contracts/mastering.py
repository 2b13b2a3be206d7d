"""What the customer hub (services/customers) tells the estate about its golden records.

`customer.mastered.v1` carries, for the golden records changed by one unit of
work, what each system's records must now hold: only the attributes that
system consumes, and only where it does not hold them yet (a system's own
change is never sent back to it). Many writes travel in one message (a chunk
of the nightly file changes hundreds of records), in the order the hub made
them; each system API applies its writes in that order.

`customer.merged.v1` says two golden records were found to be one customer:
the retired id now stands for the survivor (every system's records of it are
written the survivor's id through `customer.mastered.v1`).

`consent.changed.v1` says a golden record's consent changed, as the rules
decided it (the CRM owns consent): for whoever must act on a consent.
"""
from __future__ import annotations

from typing import Annotated, ClassVar

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, StrictBool, StringConstraints

from contracts.customer import ConsentName, CustomerValues, Origin, RecordId

GoldenId = Annotated[str, StringConstraints(pattern=r"^G[0-9]{11}$")]
System = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]{0,31}$")]


class CustomerWrite(BaseModel):
    """What one system's record must hold now."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    system: System
    record_id: RecordId
    golden_id: GoldenId = Field(description="the golden record; the record's system stores it when it consumes it")
    origin: Origin = Field(description="the change that caused it: a system, a feed (crm_file), or `customers` "
                                       "(a merge)")
    create: bool = Field(False, description="the system has no such record yet: create it")
    write_golden_id: bool = Field(False, description="write golden_id to the record (it is new, or merged)")
    values: CustomerValues = Field(description="the attributes to write; null clears one")


class CustomerMasteredV1(BaseModel):
    TYPE: ClassVar[str] = "customer.mastered.v1"
    model_config = ConfigDict(extra="forbid", frozen=True)

    mastered_at: AwareDatetime = Field(description="when the hub committed these changes (propagation lag starts)")
    writes: list[CustomerWrite] = Field(min_length=1, max_length=5000)


class CustomerMergedV1(BaseModel):
    TYPE: ClassVar[str] = "customer.merged.v1"
    model_config = ConfigDict(extra="forbid", frozen=True)

    survivor: GoldenId
    retired: GoldenId
    matched_on: list[Annotated[str, StringConstraints(min_length=1, max_length=32)]] = Field(
        min_length=1, description="the matching keys the two records agree on")
    origin: Origin = Field(description="the change that showed they are one customer")
    merged_at: AwareDatetime


class ConsentChangedV1(BaseModel):
    TYPE: ClassVar[str] = "consent.changed.v1"
    model_config = ConfigDict(extra="forbid", frozen=True)

    golden_id: GoldenId
    consent: ConsentName
    granted: StrictBool | None = Field(description="null: no system holds a consent for it")
    origin: Origin = Field(description="the system (or feed) whose statement decided it")
    source_record: Annotated[str, StringConstraints(min_length=1, max_length=100)] = Field(
        description="`<system>:<record id>` of the deciding statement")
    changed_at: AwareDatetime = Field(description="the deciding system's time of the change")

