"""config/customers.yaml: system-of-record boundaries, survivorship and matching, validated.

Ops decide here which system owns which attributes (the owner's word wins), in
which order the others count when the owner has said nothing, what each system
consumes, and on which keys records are matched to one customer. The file is
refused as a whole, each problem on its own line with the file's line number
and the field path in words (as config/routes.yaml is); the service does not
start on a file it refuses.
"""
from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Annotated, Literal

from nameko.extensions import DependencyProvider
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from bus import yaml_config
from bus.settings import retailbus_settings
from contracts.customer import ATTRIBUTES
from contracts.errors import RetailbusError

DEFAULT_PATH = Path("config/customers.yaml")
Name = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]{0,31}$")]


class CustomersConfigError(RetailbusError, ValueError):
    """config/customers.yaml cannot be used; says where and why."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SystemSpec(Strict):
    """A system whose records hold customers: what the hub writes to them."""

    consumes: tuple[str, ...] = Field(description="attributes written to its records when the golden record "
                                                  "holds other values")
    golden_id: bool = Field(True, description="its records are told their golden id (and the survivor's after "
                                              "a merge)")
    create: bool = Field(False, description="a golden record without a record here gets one, keyed by its "
                                            "customer number (else its golden id)")


class Group(Strict):
    """Attributes one system owns: its most recent word on them wins."""

    owner: Name = Field(description="the system of record")
    attributes: tuple[str, ...] = Field(min_length=1)
    owner_clears: bool = Field(False, description="the owner's empty value clears the golden one; otherwise "
                                                  "an empty value never overwrites a value")


class MatchKey(Strict):
    name: Name
    attribute: str
    normalise: Literal["email", "phone", "card", "text"] = Field(
        description="email: trimmed, lower case; phone: digits only (a leading + kept); card: upper case, no "
                    "spaces or dashes; text: trimmed, lower case")
    many: bool = Field(False, description="a customer may hold several (cards): a different value is no conflict")


class Matching(Strict):
    keys: tuple[MatchKey, ...] = Field(min_length=1)
    customer_number: tuple[Name, ...] = Field(
        (), description="systems that share customer numbers (the ERP account of CRM customer C1 is C1): "
                        "records with one number are one customer, a key of its own (`customer_number`)")


class CustomersConfig(Strict):
    systems: dict[Name, SystemSpec] = Field(min_length=1)
    origins: dict[Name, Name] = Field(description="origin of a change -> the system it speaks for (crm_file: crm)")
    groups: dict[Name, Group] = Field(min_length=1, description="every attribute in exactly one group")
    priority: tuple[Name, ...] = Field(description="every system once, first counts most when no owner spoke")
    matching: Matching

    @model_validator(mode="after")
    def _consistent(self):
        problems = []
        systems = set(self.systems)
        for name, spec in self.systems.items():
            problems += [f"systems.{name}.consumes: unknown attribute '{a}' (known: {', '.join(ATTRIBUTES)})"
                         for a in spec.consumes if a not in ATTRIBUTES]
        for origin, system in self.origins.items():
            if system not in systems:
                problems.append(f"origins.{origin}: unknown system '{system}' (known: {', '.join(sorted(systems))})")
        seen: dict[str, str] = {}
        for name, group in self.groups.items():
            if group.owner not in systems:
                problems.append(f"groups.{name}.owner: unknown system '{group.owner}'")
            for attribute in group.attributes:
                if attribute not in ATTRIBUTES:
                    problems.append(f"groups.{name}.attributes: unknown attribute '{attribute}'")
                elif attribute in seen:
                    problems.append(f"groups.{name}.attributes: '{attribute}' is in group {seen[attribute]} already")
                seen[attribute] = name
        missing = [a for a in ATTRIBUTES if a not in seen]
        if missing:
            problems.append(f"groups: no group owns {', '.join(missing)}")
        if sorted(self.priority) != sorted(systems):
            problems.append(f"priority: must list every system once ({', '.join(sorted(systems))})")
        for key in self.matching.keys:
            if key.attribute not in ATTRIBUTES:
                problems.append(f"matching.keys[{key.name}].attribute: unknown attribute '{key.attribute}'")
        problems += [f"matching.customer_number: unknown system '{s}'" for s in self.matching.customer_number
                     if s not in systems]
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @cached_property
    def owners(self) -> dict[str, Group]:
        """attribute -> its group: looked up for every attribute of every record, so computed once."""
        return {a: g for g in self.groups.values() for a in g.attributes}

    @cached_property
    def ranks(self) -> dict[str, int]:
        return {system: n for n, system in enumerate(self.priority)}

    def owner_of(self, attribute: str) -> Group:
        return self.owners[attribute]

    def rank(self, system: str) -> int:
        return self.ranks[system]


def parse(text: str, source: str = "customers.yaml") -> CustomersConfig:
    """The validated config, or CustomersConfigError naming each problem's line."""
    return yaml_config.parse_model(text, CustomersConfig, source, CustomersConfigError)


def load(path: Path | str) -> CustomersConfig:
    return yaml_config.load_model(path, CustomersConfig, CustomersConfigError)


class CustomerRules(DependencyProvider):
    """The validated config/customers.yaml (RETAILBUS.customers.rules), read at start: a
    change takes a restart, as a change of who owns what should be deliberate."""

    def setup(self):
        settings = retailbus_settings(self.container.config)
        self.config = load(settings.path(settings.customers.rules))

    def get_dependency(self, worker_ctx):
        return self.config
