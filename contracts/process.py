"""What a service doing a process step answers when it refuses the step.

A process (bus/process) sends a command to a service and waits for its reply; a
refusal on the merits (the loyalty platform will not take points a member no longer
has) is an answer too, not a failure to retry: the service sends
`process.step_failed.v1` on its events exchange, correlated like a reply, and the
process fails the step at once (compensation, a case) instead of waiting for it.
"""
from __future__ import annotations

from typing import Annotated, ClassVar

from pydantic import BaseModel, ConfigDict, Field, StringConstraints


class ProcessStepFailedV1(BaseModel):
    """A command refused for good by the service that was to do it."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    TYPE: ClassVar[str] = "process.step_failed.v1"

    command_type: Annotated[str, StringConstraints(min_length=1, max_length=120)]
    command_id: Annotated[str, StringConstraints(min_length=1, max_length=40)] = Field(
        description="the refused command's message id")
    code: Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]{0,63}$")] = Field(
        description="machine-readable reason, e.g. insufficient_points")
    reason: str = Field(min_length=1, max_length=2000, description="what the service said, for the case")
