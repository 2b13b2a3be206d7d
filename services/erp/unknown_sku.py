"""Stock moves of a SKU the ERP holds no stock row for, at that store: exceptions, not rows.

The legacy posting program books a sale of a SKU it never heard of by inventing
its STK_LVL row at the move (negative on hand): a typo at the till, a SKU not yet
listed, becomes master data nobody sees. The bus path does not invent the row.
The document still posts (the money changed hands: header, lines, tenders, GL),
and each move it could not make is recorded in RB_UNKNOWN_SKU (ours, beside the
legacy tables, in the posting's transaction), counted in
`retailbus_unknown_sku_total{store}` and logged once per posting. Ops list the
open ones (`SELECT * FROM RB_UNKNOWN_SKU`), set the SKU up in the ERP's master
data, and book or drop the recorded moves there.
"""
from __future__ import annotations

import logging

from prometheus_client import Counter
from sqlalchemy import Column, Integer, MetaData, String, Table

from legacy_wrappers.prepared import Prepared

log = logging.getLogger(__name__)

UNKNOWN_SKUS = Counter("retailbus_unknown_sku_total",
                       "Stock moves of a posted sale or return whose store has no stock row for the SKU",
                       ["store"])

metadata = MetaData()
TABLE = Table(
    "RB_UNKNOWN_SKU", metadata,
    Column("ID", Integer, primary_key=True, autoincrement=True),
    Column("STORE_NO", String(8), nullable=False),
    Column("SKU", String(20), nullable=False),
    Column("DOC_NO", String(12), nullable=False),
    Column("QTY", Integer, nullable=False),  # the units the document would have added (negative: a sale)
    Column("SEEN_TS", String(26), nullable=False),
)
INSERT = Prepared(TABLE.insert())


def rows(moves: list[tuple[str, str, str, int]], now: str) -> list[dict]:
    """RB_UNKNOWN_SKU rows of (doc_no, store, sku, units) moves."""
    return [{"STORE_NO": store, "SKU": sku, "DOC_NO": doc_no, "QTY": units, "SEEN_TS": now}
            for doc_no, store, sku, units in moves]


def committed(moves: list[tuple[str, str, str, int]]) -> None:
    """Count and log the moves once their posting committed."""
    for doc_no, store, sku, units in moves:
        UNKNOWN_SKUS.labels(store).inc()
        log.warning("%s: store %s holds no stock row for SKU %s; %+d units recorded in RB_UNKNOWN_SKU",
                    doc_no, store, sku, units, extra={"id": doc_no, "correlationid": None})
