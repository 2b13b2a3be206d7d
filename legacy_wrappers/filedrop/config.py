"""`config/filedrops.yaml` as pydantic models: what ops declare per drop.

Layouts (CSV dialect or fixed-width positions, field types), header/trailer
records, the completion rule and the bad-row policy live here, so a new feed
is a config change, not code. Errors name the field path.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from bus import yaml_config
from bus.settings import ConfigError

DEFAULT_PATH = Path("config/filedrops.yaml")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FieldSpec(Strict):
    """One column. `start`/`end` (1-based, inclusive) only for fixed-width layouts."""

    name: str = Field(pattern=r"^[a-z_][a-z0-9_]*$")
    type: Literal["str", "int", "date", "timestamp"] = "str"
    required: bool = True
    max_length: int | None = Field(None, ge=1)
    start: int | None = Field(None, ge=1)
    end: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _positions(self):
        if (self.start is None) != (self.end is None):
            raise ValueError("give both start and end, or neither")
        if self.start is not None and self.end < self.start:
            raise ValueError("end must not be before start")
        return self


class CsvDialect(Strict):
    delimiter: str = Field(",", min_length=1, max_length=1)
    quotechar: str = Field('"', min_length=1, max_length=1)
    header_row: bool = True  # a first line of column names, skipped


class ControlRecord(Strict):
    """A header or trailer line recognised by its first characters.

    A trailer's `count` is the number of data rows; `total` is the sum of the
    data rows' `total_of` field. `count`/`total` are CSV column indexes
    (0-based) for CSV layouts, `[start, end]` positions for fixed-width.
    """

    prefix: str = Field(min_length=1)
    count: int | tuple[int, int] | None = None
    total: int | tuple[int, int] | None = None
    total_of: str | None = None

    @model_validator(mode="after")
    def _total(self):
        if (self.total is None) != (self.total_of is None):
            raise ValueError("total and total_of go together")
        return self


class Completion(Strict):
    """When a file is complete: its `<name><marker_suffix>` exists, it was renamed
    from a `<name><temp_suffix>` (so any matching name is complete), or its size
    and mtime did not change for `stable_seconds`."""

    rule: Literal["marker", "rename", "stable"]
    marker_suffix: str = ".done"
    temp_suffix: str = ".tmp"
    stable_seconds: float = Field(2.0, gt=0)


class DropIn(Strict):
    folder: Path
    pattern: str = "*"
    format: Literal["csv", "fixed"]
    encoding: str = "utf-8"
    csv: CsvDialect = CsvDialect()
    fields: list[FieldSpec] = Field(min_length=1)
    header: ControlRecord | None = None
    trailer: ControlRecord | None = None
    completion: Completion
    on_bad_rows: Literal["reject_file", "skip_rows"] = "reject_file"
    chunk_rows: int = Field(500, ge=1, le=5000)
    inflight_chunks: int = Field(8, ge=1, le=64)
    poll_seconds: float = Field(0.5, gt=0)
    max_attempts: int = Field(3, ge=1)

    @model_validator(mode="after")
    def _layout(self):
        names = [f.name for f in self.fields]
        if len(set(names)) != len(names):
            raise ValueError("field names must be unique")
        if self.format == "fixed" and any(f.start is None for f in self.fields):
            raise ValueError("fixed-width fields need start and end")
        if self.trailer and self.trailer.total_of and self.trailer.total_of not in names:
            raise ValueError(f"trailer.total_of {self.trailer.total_of!r} is not a field")
        return self


class DropOut(Strict):
    """An outbound batch file for a legacy job (fixed-width records)."""

    folder: Path
    prefix: str = Field(pattern=r"^[A-Za-z0-9_-]+$")
    suffix: str = ".dat"
    fields: list[FieldSpec] = Field(min_length=1)
    header_prefix: str = "H"
    trailer_prefix: str = "T"
    total_of: str | None = None
    roll_rows: int = Field(1000, ge=1)
    roll_seconds: float = Field(5.0, gt=0)
    marker_suffix: str = ".done"

    @model_validator(mode="after")
    def _layout(self):
        if any(f.start is None for f in self.fields):
            raise ValueError("outbound fields need start and end")
        if self.total_of and self.total_of not in [f.name for f in self.fields]:
            raise ValueError(f"total_of {self.total_of!r} is not a field")
        return self


class FileDrops(Strict):
    ledger: Path = Path("var/filedrops.db")
    inbound: dict[str, DropIn] = Field(default_factory=dict)
    outbound: dict[str, DropOut] = Field(default_factory=dict)


class FileDropConfigError(ConfigError):
    """Raised when filedrops.yaml is invalid: names the drop, the field and the reason."""


def load(path: Path | str, root: Path | None = None) -> FileDrops:
    """Read and validate; relative folders are taken from `root` (the project root)."""
    path = Path(path)
    drops = yaml_config.load_model(path, FileDrops, FileDropConfigError)
    return absolute(drops, root or path.resolve().parent.parent)


def absolute(drops: FileDrops, root: Path) -> FileDrops:
    def fix(p: Path) -> Path:
        return p if p.is_absolute() else (root / p)
    return drops.model_copy(update={
        "ledger": fix(drops.ledger),
        "inbound": {k: d.model_copy(update={"folder": fix(d.folder)}) for k, d in drops.inbound.items()},
        "outbound": {k: d.model_copy(update={"folder": fix(d.folder)}) for k, d in drops.outbound.items()},
    })


def for_container(config: dict) -> FileDrops:
    """The drops of a nameko container: FILEDROPS_CONFIG or config/filedrops.yaml under the root."""
    from bus.settings import retailbus_settings

    root = retailbus_settings(config).root
    path = Path(config.get("FILEDROPS_CONFIG") or root / DEFAULT_PATH)
    return load(path if path.is_absolute() else root / path, root)
