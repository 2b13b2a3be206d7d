"""Messages of the bus's own control plane."""
from __future__ import annotations

from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field


class RouteTableAppliedV1(BaseModel):
    """A route table applied by ops: the YAML text itself, so every agent
    validates exactly what was audited."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    TYPE: ClassVar[str] = "routing.table_applied.v1"

    version: int = Field(ge=1)
    table: str = Field(min_length=1, max_length=1_000_000)
    reason: str
