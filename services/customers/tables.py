"""The customer hub's own tables (CUSTOMERS_DB_URI), beside its inbox and outbox.

Attribute detail is JSON (one row per golden record and per source record):
a chunk of the nightly file touches hundreds of records, and reading and
writing one row each is what keeps the hub at thousands of records a second.
`CUS_KEY` is the matching index (one row per key value of a golden record);
`CUS_HISTORY` every change of a golden record, never updated.
"""
from __future__ import annotations

from sqlalchemy import Column, Index, Integer, MetaData, String, Table, Text

metadata = MetaData()

GOLDEN = Table(
    "CUS_GOLDEN", metadata,
    Column("GOLDEN_ID", String(12), primary_key=True),
    Column("VERSION", Integer, nullable=False),
    Column("STATUS", String(8), nullable=False),        # active | retired
    Column("SURVIVOR", String(12)),                     # retired: the golden record it was merged into
    Column("VALUES_JSON", Text, nullable=False),        # {attribute: [value, origin, record, at, rule]}
    Column("CREATED_AT", String(32), nullable=False),
    Column("UPDATED_AT", String(32), nullable=False),
)

RECORDS = Table(
    "CUS_RECORD", metadata,
    Column("SYSTEM", String(32), primary_key=True),
    Column("RECORD_ID", String(64), primary_key=True),
    Column("GOLDEN_ID", String(12), nullable=False),
    Column("STATE_JSON", Text, nullable=False),         # {attribute: [held, latest, filled]} (model.AttrState)
    Column("UPDATED_AT", String(32), nullable=False),
    Index("IX_CUS_RECORD_GOLDEN", "GOLDEN_ID"),
)

KEYS = Table(
    "CUS_KEY", metadata,
    Column("KEY_NAME", String(32), primary_key=True),
    Column("KEY_VALUE", String(254), primary_key=True),
    Column("GOLDEN_ID", String(12), primary_key=True),
    Index("IX_CUS_KEY_GOLDEN", "GOLDEN_ID"),
)

HISTORY = Table(
    "CUS_HISTORY", metadata,
    Column("ID", Integer, primary_key=True, autoincrement=True),
    Column("GOLDEN_ID", String(12), nullable=False),
    Column("AT", String(32), nullable=False),            # when the hub recorded it
    Column("KIND", String(16), nullable=False),          # changed | linked | created | merged | retired | case
    Column("ORIGIN", String(32), nullable=False),
    Column("RECORD", String(100)),                       # `<system>:<record id>` whose change it was
    Column("EVENT_ID", String(40)),
    Column("DETAIL_JSON", Text, nullable=False),
    Index("IX_CUS_HISTORY_GOLDEN", "GOLDEN_ID", "ID"),
)

CASES = Table(
    "CUS_CASE", metadata,                                # steward cases this hub opened (case.opened.v1)
    Column("CASE_ID", String(128), primary_key=True),
    Column("GOLDEN_A", String(12), nullable=False),
    Column("GOLDEN_B", String(12), nullable=False),
    Column("DETAIL", String(2000), nullable=False),
    Column("OPENED_AT", String(32), nullable=False),
)

SEQUENCE = Table(
    "CUS_SEQ", metadata,                                 # the next golden number
    Column("NAME", String(16), primary_key=True),
    Column("NEXT_NO", Integer, nullable=False),
)
