"""Survivorship: which of the systems' values a golden attribute takes, and why.

The rules of config/customers.yaml, as one pure function of what the linked
records said (never of the order their changes arrived in, so any
interleaving of the same changes ends in the same golden record):

1. **owner**: the attribute's group has an owner; the owner's most recent
   non-empty value wins (its most recent value, empty or not, when the group
   says `owner_clears`). Several records of the owner (two CRM profiles after
   a merge): the most recent wins.
2. otherwise the systems' non-empty values by **priority** (the first system
   of `priority` first), then the **most recent** among the equally ranked;
   `only` when one record has a value at all.

A record's empty value never counts unless the owner's does (rule 1): an
empty value never overwrites a value. A withdrawn consent (`false`) is a value,
not an empty one: an older grant from any source cannot bring it back, since
only the owner's most recent word counts.
"""
from __future__ import annotations

from services.customers.config import CustomersConfig
from services.customers.model import Decided, Record, Said


def _candidate(record: Record, said: Said | None) -> tuple[Record, Said] | None:
    return None if said is None else (record, said)


def decide(config: CustomersConfig, attribute: str, records: list[Record]) -> Decided | None:
    """The golden value of `attribute` from `records` (None: no system said anything usable)."""
    group = config.owner_of(attribute)
    if len(records) == 1:  # most golden records have one record: the rules reduce to this
        record = records[0]
        state = record.attrs.get(attribute)
        owner = record.system == group.owner
        said = None if state is None else state.latest if owner and group.owner_clears else state.filled
        return None if said is None else Decided(said.value, said.origin, record.ref, said.at,
                                                  "owner" if owner else "only")
    owner = [c for r in records if r.system == group.owner and attribute in r.attrs
             for c in [_candidate(r, r.attrs[attribute].latest if group.owner_clears
                                  else r.attrs[attribute].filled)] if c]
    if owner:
        record, said = max(owner, key=lambda c: (c[1].at, c[1].origin, c[0].record_id))
        return Decided(said.value, said.origin, record.ref, said.at, "owner")
    others = [c for r in records if attribute in r.attrs
              for c in [_candidate(r, r.attrs[attribute].filled)] if c]
    if not others:
        return None
    ranked = sorted(others, key=lambda c: (c[1].at, c[1].origin, c[0].record_id), reverse=True)  # latest first
    ranked.sort(key=lambda c: config.rank(c[0].system))  # stable: the latest first within a rank
    (record, said), rest = ranked[0], ranked[1:]
    if not rest:
        rule = "only"
    elif config.rank(rest[0][0].system) > config.rank(record.system):
        rule = "priority"
    else:
        rule = "most_recent"
    return Decided(said.value, said.origin, record.ref, said.at, rule)

