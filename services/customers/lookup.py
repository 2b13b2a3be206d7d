"""Finding and reading a golden record for people (`retailbus customers show`).

A customer is found by whatever someone has at hand: the golden id, any
system's record id (a CRM customer number, an ERP account, a loyalty card), or
an e-mail address, phone number or card as the matching keys normalise them.
A retired golden record leads to the one it was merged into.
"""
from __future__ import annotations

from dataclasses import dataclass

import orjson
from sqlalchemy import select
from sqlalchemy.engine import Connection

from services.customers import matching
from services.customers.config import CustomersConfig
from services.customers.tables import GOLDEN, HISTORY, KEYS, RECORDS


@dataclass
class GoldenView:
    golden_id: str
    version: int
    status: str
    retired: list[str]                      # the ids that led here (a name given was merged into this one)
    records: list[str]                      # `<system>:<record id>`
    attributes: list[tuple]                 # (attribute, value, origin, record, at, rule)
    history: list[tuple]                    # (at, kind, origin, record, detail)


def find(conn: Connection, config: CustomersConfig, name: str) -> list[str]:
    """The golden ids `name` leads to (most often one)."""
    found = set(conn.execute(select(GOLDEN.c.GOLDEN_ID).where(GOLDEN.c.GOLDEN_ID == name)).scalars())
    found |= set(conn.execute(select(RECORDS.c.GOLDEN_ID).where(RECORDS.c.RECORD_ID == name)).scalars())
    for key in config.matching.keys:
        value = matching.normalise(key.normalise, name)
        if value:
            found |= set(conn.execute(select(KEYS.c.GOLDEN_ID).where(KEYS.c.KEY_NAME == key.name,
                                                                     KEYS.c.KEY_VALUE == value)).scalars())
    return sorted(found)


def view(conn: Connection, golden_id: str) -> GoldenView:
    retired = []
    row = conn.execute(select(GOLDEN).where(GOLDEN.c.GOLDEN_ID == golden_id)).one()
    while row.STATUS == "retired":
        retired.append(row.GOLDEN_ID)
        row = conn.execute(select(GOLDEN).where(GOLDEN.c.GOLDEN_ID == row.SURVIVOR)).one()
    records = [f"{r.SYSTEM}:{r.RECORD_ID}" for r in conn.execute(
        select(RECORDS.c.SYSTEM, RECORDS.c.RECORD_ID).where(RECORDS.c.GOLDEN_ID == row.GOLDEN_ID)
        .order_by(RECORDS.c.SYSTEM, RECORDS.c.RECORD_ID))]
    attributes = [(name, *decided) for name, decided in orjson.loads(row.VALUES_JSON).items()]
    history = [(h.AT, h.KIND, h.ORIGIN, h.RECORD, orjson.loads(h.DETAIL_JSON)) for h in conn.execute(
        select(HISTORY).where(HISTORY.c.GOLDEN_ID.in_([row.GOLDEN_ID, *retired])).order_by(HISTORY.c.ID))]
    return GoldenView(row.GOLDEN_ID, row.VERSION, row.STATUS, retired, records, sorted(attributes), history)


def describe(kind: str, detail: dict) -> str:
    """A history entry's detail in words."""
    if kind == "changed":
        return "; ".join(f"{a}: {c['from']!r} -> {c['to']!r} ({c['rule']}, {c['source']})" for a, c in detail.items())
    if kind == "merged":
        return f"merged {detail['retired']} into this (matched on {', '.join(detail['matched_on'])})"
    if kind == "retired":
        return f"merged into {detail['survivor']} (matched on {', '.join(detail['matched_on'])})"
    if kind == "case":
        return (f"steward case {detail['case_id']}: agree on {', '.join(detail['agree'])}, differ on "
                f"{', '.join(detail['conflict'])}")
    if kind == "created":
        parts = [f"{a}: {value!r}" for a, value in detail.get("values", {}).items()]
        parts += [f"records made: {', '.join(detail['created_in'])}"] if detail.get("created_in") else []
        parts += [f"steward cases with {', '.join(detail['cases'])}"] if detail.get("cases") else []
        return "; ".join(parts)
    if kind == "linked":
        return "created in its system by the hub" if detail.get("created") else \
            f"matched on {', '.join(detail.get('matched_on', []))}"
    return ""
