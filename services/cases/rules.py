"""Case types and their SLAs (config/cases.yaml), and the arithmetic of deadlines and ages.

Plain values and functions, unit-tested without a broker. A case's deadline is
its opening time (when the business outcome happened, as the sender says) plus
its type's SLA, fixed when the case is opened: a later change of the file does
not move the promise made for a case already open. A type the file does not
list takes `default_sla` (a case is never refused for its type: it would be a
business exception lost), and the service counts it so ops add the type.

An invalid file is refused, the service does not start, with the file's line and
the field path of each problem, as config/routes.yaml is.
"""
from __future__ import annotations

import re
from datetime import datetime, timedelta
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from bus import yaml_config
from contracts.cases import CaseType
from contracts.errors import RetailbusError

DURATION = r"^[1-9][0-9]*(s|m|h|d)$"
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}

# Age buckets of open cases (the `age` label of retailbus_cases_open): upper bounds in hours.
AGE_BUCKETS: tuple[tuple[str, float], ...] = (("0-1h", 1), ("1-4h", 4), ("4-24h", 24), ("1-3d", 72),
                                             ("3d+", float("inf")))


class CasesConfigError(RetailbusError):
    """Raised when config/cases.yaml is missing or invalid; names the line and the field."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def duration(text: str) -> timedelta:
    """`90s`, `30m`, `4h`, `2d` as a timedelta."""
    found = re.fullmatch(DURATION, text)
    if not found:
        raise ValueError(f"{text!r}: expected a whole number and a unit, e.g. 30m, 4h, 2d")
    return timedelta(**{_UNITS[found.group(1)]: int(text[:-1])})


class CaseTypeRule(Strict):
    """How one type of case is worked."""

    sla: str = Field(pattern=DURATION, description="time from the opening to the deadline: 30m, 4h, 2d")


class CasesConfig(Strict):
    default_sla: str = Field("24h", pattern=DURATION, description="the SLA of a case type not listed in `types`")
    types: dict[CaseType, CaseTypeRule] = Field(default_factory=dict, description="per case type")

    def sla(self, case_type: str) -> timedelta:
        rule = self.types.get(case_type)
        return duration(rule.sla if rule else self.default_sla)

    def known(self, case_type: str) -> bool:
        return case_type in self.types


def due_at(config: CasesConfig, case_type: str, opened_at: datetime) -> datetime:
    """The SLA deadline of a case of `case_type` opened at `opened_at`."""
    return opened_at + config.sla(case_type)


def age_bucket(opened_at: datetime, now: datetime) -> str:
    """The `age` label of an open case: the first bucket its age fits under."""
    hours = max(0.0, (now - opened_at).total_seconds() / 3600)
    return next(name for name, upper in AGE_BUCKETS if hours < upper)


def tally(rows: list[tuple[str, str, str]], now: datetime, types: set[str]
          ) -> tuple[dict[tuple[str, str], int], dict[str, int]]:
    """From (case type, opened at, due at) of the cases not resolved (ISO times): how many
    per (type, age bucket), and how many past their deadline per type. Every type of
    `types` and of the rows gets every bucket, 0 included: a gauge goes back to 0 when the
    last case of a type is resolved, instead of keeping its last count."""
    types = set(types) | {case_type for case_type, _, _ in rows}
    opened = {(case_type, name): 0 for case_type in types for name, _ in AGE_BUCKETS}
    late = dict.fromkeys(types, 0)
    for case_type, opened_at, due in rows:
        opened[(case_type, age_bucket(datetime.fromisoformat(opened_at), now))] += 1
        if now > datetime.fromisoformat(due):
            late[case_type] += 1
    return opened, late


# ---------------------------------------------------------------------- the file
def parse(text: str, source: str = "cases.yaml") -> CasesConfig:
    """The validated rules, or CasesConfigError naming each problem's line and field path."""
    return yaml_config.parse_model(text, CasesConfig, source, CasesConfigError)


def load(path: Path | str) -> CasesConfig:
    return yaml_config.load_model(path, CasesConfig, CasesConfigError)
