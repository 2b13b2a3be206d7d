"""Hop records of the message journal (`retailbus trace`): the bus's own bookkeeping.

One `journal.hops.v1` message carries a batch of hops from one process. A hop
names a message (`id`, `correlationid`, `subject`) or, for a batch hop (a
chunk of file rows, a written batch file), its `items`: one per row, with
the row's key, its row or line number in the file, and the other names it
can be found by (`refs`: a customer id, a sale's correlation id ...).
"""
from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field


class HopItem(BaseModel):
    model_config = ConfigDict(extra="forbid")

    key: str = Field(min_length=1, max_length=200)
    row: int | None = Field(None, ge=0, description="row (line) number in the file")
    refs: list[str] = Field(default_factory=list)


class Hop(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str | None = Field(None, max_length=200)
    correlationid: str | None = Field(None, max_length=200)
    subject: str | None = Field(None, max_length=200)
    hop: str = Field(min_length=1, max_length=40, description="accepted, forwarded, consumed, posted ...")
    outcome: str = Field(min_length=1, max_length=40)
    time: float = Field(description="seconds since the epoch (UTC)")
    service: str = Field("", max_length=80)
    detail: dict[str, Any] = Field(default_factory=dict)
    items: list[HopItem] = Field(default_factory=list)


class JournalHopsV1(BaseModel):
    """A batch of hop records from one process."""

    model_config = ConfigDict(extra="forbid")
    TYPE: ClassVar[str] = "journal.hops.v1"

    hops: list[Hop] = Field(min_length=1)
