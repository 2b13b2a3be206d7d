"""Business exception cases: what any service sends when a business outcome needs a person.

The dead-letter queue is for messages the bus could not handle; a case is for a
business outcome it handled but cannot settle alone (an over-redemption, a return
outside policy, a compensation that failed). Any service opens one by publishing
`case.opened.v1`; the cases service owns the workbench. The case id is the sender's
dedup key, so a redelivered or replayed opening is one case.
"""
from __future__ import annotations

from typing import Annotated, ClassVar

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, StringConstraints

from contracts.pos import StoreId

CaseType = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]{0,47}$")]
CaseId = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$")]


class CaseOpenedV1(BaseModel):
    """A business exception case to work. `case_id` is deterministic in what caused it
    (for example `return_over_quantity:S001-R-0042`), so opening it twice is one case."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    TYPE: ClassVar[str] = "case.opened.v1"

    case_id: CaseId
    case_type: CaseType = Field(description="sets the SLA (config/cases.yaml) and the queue it is worked in")
    store_id: StoreId | None = None
    process: str | None = Field(None, max_length=64, description="process name, when a process opened it")
    process_id: str | None = Field(None, max_length=128, description="process instance id, for `cases retry`")
    transaction_id: str | None = Field(None, max_length=128, description="the business transaction (sale, return, order)")
    summary: str = Field(min_length=1, max_length=2000, description="what happened, for the person working the case")
    opened_at: AwareDatetime


class ProcessStepRetryV1(BaseModel):
    """A command from the workbench: run a process instance's failed step again."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    TYPE: ClassVar[str] = "process.step_retry.v1"

    process: str = Field(min_length=1, max_length=64)
    process_id: str = Field(min_length=1, max_length=128)
    case_id: CaseId
    requested_by: str = Field(min_length=1, max_length=64, description="OS user who asked")
