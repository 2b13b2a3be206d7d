"""STK_LVL, the legacy stock table <-> our contracts: the one place for this table.

Legacy timestamps are naive ISO UTC strings; contracts carry aware datetimes.
A change event carries the level, not a delta, so replays and reordering
cannot drift a consumer; its key names the row version (timestamp and level),
so a consumer deduplicating by idempotencykey drops only true repeats.
"""
from __future__ import annotations

import hashlib
from datetime import datetime, timezone

from sqlalchemy import Table, select
from sqlalchemy.engine import Connection

from contracts.envelope import CloudEvent
from contracts.erp import ErpStockChangedV1, ErpStockChangesV1, StockChange
from legacy_wrappers.legacy_db import check_row

TABLE = "STK_LVL"
KEY = ("STORE_NO", "SKU")
SOURCE = "legacy/erp/STK_LVL"
CHUNK = 500  # items per erp.stock_changes.v1 (the contract allows 5,000)


def legacy_time(stamp: str) -> datetime:
    return datetime.fromisoformat(stamp).replace(tzinfo=timezone.utc)


def stock_level(conn: Connection, stock: Table, store_id: str, sku: str) -> dict | None:
    check_row(stock, {"STORE_NO": store_id, "SKU": sku})
    c = stock.c
    row = conn.execute(select(c.ON_HAND, c.UPD_TS).where(c.STORE_NO == store_id, c.SKU == sku)).first()
    if row is None:
        return None
    return {"store_id": store_id, "sku": sku, "on_hand": row.ON_HAND,
            "as_of": legacy_time(row.UPD_TS).isoformat()}


def stock_change(row: dict, deleted: bool = False) -> StockChange:
    """A captured row version; validated here, so a row the contract refuses is named alone."""
    data = ErpStockChangedV1(store_id=row["STORE_NO"], sku=row["SKU"], on_hand=row["ON_HAND"],
                             changed_at=legacy_time(row["UPD_TS"]), deleted=deleted)
    key = f"{ErpStockChangedV1.TYPE}:{row['STORE_NO']}:{row['SKU']}:{row['UPD_TS']}:{row['ON_HAND']}"
    return StockChange.model_construct(idempotencykey=key, change=data)


def stock_changes(items: list[StockChange]) -> list[CloudEvent]:
    """`erp.stock_changes.v1` envelopes of up to CHUNK items; a chunk's key names its items."""
    events = []
    for start in range(0, len(items), CHUNK):
        chunk = items[start:start + CHUNK]
        digest = hashlib.sha256("\n".join(i.idempotencykey for i in chunk).encode()).hexdigest()
        events.append(CloudEvent.new(ErpStockChangesV1.TYPE, SOURCE, ErpStockChangesV1.model_construct(items=chunk),
                                     subject=TABLE, idempotencykey=f"{ErpStockChangesV1.TYPE}:{digest[:32]}"))
    return events
