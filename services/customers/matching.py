"""Matching: whether two customer records (or golden records) are one customer.

Each configured key (matching.keys) is an attribute normalised so that
spellings of one value compare equal (`Ada@Example.ORG ` is `ada@example.org`,
`+49 (30) 123-45` is `+4930 12345`'s digits). Two sides **agree** on a key when
they share a value of it; they **conflict** on it when both have one and they
differ, unless the key allows many (a customer may hold several loyalty cards,
several customer numbers). The verdict:

- `match`: they agree on a key and conflict on none: one customer;
- `uncertain`: they agree on one key and conflict on another (one e-mail
  address, two phone numbers): a data steward decides, nothing is merged;
- `none`: they agree on nothing.

`customer_number` (the systems that share customer numbers) is a key of many
values: the record ids of those systems' records.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

from services.customers.config import CustomersConfig
from services.customers.model import Golden, Record

CUSTOMER_NUMBER = "customer_number"
Keys = dict[str, set[str]]
_NOT_CARD = re.compile(r"[\s\-]")
_NOT_DIGIT = re.compile(r"\D")


@lru_cache(maxsize=65536)  # a value is normalised again each time its golden record's keys are taken
def normalise(kind: str, value) -> str | None:
    if not isinstance(value, str) or not value.strip():
        return None
    value = value.strip()
    if kind == "email":
        return value.lower()
    if kind == "phone":
        digits = _NOT_DIGIT.sub("", value)
        return (("+" if value.startswith("+") else "") + digits) if digits else None
    if kind == "card":
        return _NOT_CARD.sub("", value).upper() or None
    return value.lower()


def value_keys(config: CustomersConfig, system: str, record_id: str, values: dict) -> Keys:
    """The key values of a record holding `values` (and its number, if it is a customer number)."""
    keys: Keys = {}
    for key in config.matching.keys:
        found = normalise(key.normalise, values.get(key.attribute))
        if found:
            keys[key.name] = {found}
    if system in config.matching.customer_number:
        keys[CUSTOMER_NUMBER] = {record_id}
    return keys


def golden_keys(config: CustomersConfig, golden: Golden, records: list[Record]) -> Keys:
    """A golden record's key values: its own value of a single-valued key; of a key of many,
    every value its records hold (each card of each member) and its customer numbers."""
    keys: Keys = {}
    for key in config.matching.keys:
        values = {normalise(key.normalise, golden.value(key.attribute))}
        if key.many:
            values |= {normalise(key.normalise, r.filled(key.attribute)) for r in records}
        values.discard(None)
        if values:
            keys[key.name] = values
    numbers = {r.record_id for r in records if r.system in config.matching.customer_number}
    if numbers:
        keys[CUSTOMER_NUMBER] = numbers
    return keys


@dataclass(frozen=True)
class Verdict:
    agree: tuple[str, ...]
    conflict: tuple[str, ...]

    @property
    def kind(self) -> str:
        if not self.agree:
            return "none"
        return "uncertain" if self.conflict else "match"


def _many(config: CustomersConfig) -> dict[str, bool]:
    many = {key.name: key.many for key in config.matching.keys}
    many[CUSTOMER_NUMBER] = True
    return many


def evaluate(config: CustomersConfig, a: Keys, b: Keys) -> Verdict:
    agree, conflict = [], []
    for name, many in _many(config).items():
        left, right = a.get(name), b.get(name)
        if not left or not right:
            continue
        if left & right:
            agree.append(name)
        elif not many:
            conflict.append(name)
    return Verdict(tuple(agree), tuple(conflict))

