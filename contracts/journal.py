"""Hop records of the message journal (`retailbus trace`): the bus's own bookkeeping.

One `journal.hops.v1` message carries a batch of hops from one process. A hop
names a message (`id`, `correlationid`, `subject`) or, for a batch hop (a
chunk of file rows, a written batch file), its `items`: one per row, with
the row's key, its row or line number in the file, and the other names it
can be found by (`refs`: a customer id, a sale's correlation id ...).

A chunk of an inbound file's rows goes compactly as `file_rows` instead:
the file's sha256, the row numbers as runs and each row's business name.
Its items are derived (`key` is `<sha256>:<row>`, as the rows' idempotency
keys), so the files service sends ~13 bytes a row rather than a dict per
row; the journal service stores either form the same way.
"""
from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, model_validator


class HopItem(BaseModel):
    model_config = ConfigDict(extra="forbid")

    key: str = Field(min_length=1, max_length=200)
    row: int | None = Field(None, ge=0, description="row (line) number in the file")
    refs: list[str] = Field(default_factory=list)


class FileRows(BaseModel):
    """Rows of one file, in file order: `runs` of consecutive row numbers (first and
    last, inclusive; a skipped bad row splits a run) and one business name per row."""

    model_config = ConfigDict(extra="forbid")

    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    runs: list[tuple[NonNegativeInt, NonNegativeInt]] = Field(min_length=1)
    names: list[str | None]

    @model_validator(mode="after")
    def _one_name_per_row(self):
        if any(first > last for first, last in self.runs):
            raise ValueError("runs: a run's first row comes after its last")
        rows = sum(last - first + 1 for first, last in self.runs)
        if rows != len(self.names):
            raise ValueError(f"names: {len(self.names)} names for {rows} rows")
        return self

    def items(self) -> list[HopItem]:
        """The per-row items these rows stand for."""
        rows = (n for first, last in self.runs for n in range(first, last + 1))
        prefix = self.sha256 + ":"
        return [HopItem.model_construct(key=f"{prefix}{n}", row=n, refs=[name] if name else [])
                for n, name in zip(rows, self.names)]


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
    file_rows: FileRows | None = Field(None, description="a chunk of file rows, instead of `items`")

    def all_items(self) -> list[HopItem]:
        """The hop's items, whichever form they came in."""
        return self.items + (self.file_rows.items() if self.file_rows else [])


class JournalHopsV1(BaseModel):
    """A batch of hop records from one process."""

    model_config = ConfigDict(extra="forbid")
    TYPE: ClassVar[str] = "journal.hops.v1"

    hops: list[Hop] = Field(min_length=1)
