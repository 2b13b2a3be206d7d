"""The hub's picture of the estate, as plain objects: source records and golden records.

A source record is one system's record of a customer (the CRM's C1, the ERP's
account C1, the loyalty member LC1), linked to one golden record. For each
attribute it keeps:

- what the system itself said last (`latest`) and last said non-empty
  (`filled`), with the system's time and the origin: the survivorship rules
  read only these, so the golden value is a function of what the systems said,
  whatever order their changes arrived in;
- what the record holds now as far as the hub knows (`held`), said by the
  system or written by the hub. A change the system reports with the value it
  already holds is no change: that is how a system's own change coming back
  (an echo of the hub's write, or the nightly file repeating the CRM's API
  change) is recognised and never taken as a new statement.

Times are ISO 8601 UTC strings of one fixed shape, so they compare as text.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

HUB = "hub"  # `held.by` of a value the hub wrote


def stamp(when: datetime) -> str:
    """A time as the hub stores and compares it: UTC, microseconds, `Z` (isoformat: strftime took
    twice as long, once a file row)."""
    return when.astimezone(timezone.utc).replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


@dataclass(slots=True)
class Said:
    value: Any
    at: str
    origin: str


@dataclass(slots=True)
class AttrState:
    held: Said | None = None      # origin: the system's origin, or HUB
    latest: Said | None = None
    filled: Said | None = None

    @classmethod
    def from_json(cls, data: list) -> AttrState:
        saids = []
        for said in data:
            saids.append(saids[-1] if said == 0 else None if said is None else Said(*said))
        return cls(*saids)


def states_json(attrs: dict[str, AttrState]) -> dict:
    """{attribute: [held, latest, filled]}, each [value, at, origin] or None; 0 for the one before
    it (a record's own statement is usually all three). One function for a record's attributes,
    not a method per attribute: two records a new customer, a dozen attributes each."""
    out = {}
    for attribute, state in attrs.items():
        held, latest, filled = state.held, state.latest, state.filled
        out[attribute] = [
            None if held is None else [held.value, held.at, held.origin],
            0 if latest is held else None if latest is None else [latest.value, latest.at, latest.origin],
            0 if filled is latest else None if filled is None else [filled.value, filled.at, filled.origin]]
    return out



@dataclass(slots=True)
class Record:
    system: str
    record_id: str
    golden_id: str
    attrs: dict[str, AttrState] = field(default_factory=dict)
    new: bool = False
    ref: str = field(init=False, repr=False, compare=False)  # `<system>:<record id>`, asked ~13 times a row

    def __post_init__(self):
        self.ref = f"{self.system}:{self.record_id}"

    def filled(self, attribute: str):
        state = self.attrs.get(attribute)
        return None if state is None or state.filled is None else state.filled.value


@dataclass(slots=True)
class Decided:
    """A golden attribute: the value, who said it and when, and the rule that chose it."""

    value: Any
    origin: str
    record: str       # `<system>:<record id>`
    at: str
    rule: str         # owner | priority | most_recent | only

    def to_json(self) -> list:
        return [self.value, self.origin, self.record, self.at, self.rule]


@dataclass(slots=True)
class Golden:
    golden_id: str
    version: int = 0
    status: str = "active"                      # active | retired
    survivor: str | None = None
    values: dict[str, Decided] = field(default_factory=dict)
    created: str = ""
    new: bool = False

    def value(self, attribute: str):
        decided = self.values.get(attribute)
        return None if decided is None else decided.value
