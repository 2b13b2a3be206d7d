"""Rows of legacy batch files (`event.batch.v1`, services/files) the erp applies, by row type.

`APPLIERS` is the one list of the row types the erp applies: the warehouse stock
snapshot goes to STK_LVL (here), which the erp's change capture then announces
to the stores' stock caches like any other stock change. The CRM's customer
export is mastered by the customer hub first (services/customers), whose
golden records reach CUST_MST as `customer.mastered.v1` (customer_sync.py):
its chunks are `ELSEWHERE`, acked here. A chunk of a row type listed in
neither is not "someone else's business" to be acked: it is parked
(`UnappliedRowsError`), and the files service refuses to start with a drop
whose rows nobody applies (services/files/appliers.py), so the configuration
error shows at start.

A snapshot row states the level a store held at `changed_at`. It is applied
when it is newer than the row's last change: a sale booked after the count is
not undone by a file that arrives late (such a row is counted as stale and
logged). The row is written with the time of the write (UPD_TS), not the
count's, so change capture (which follows UPD_TS) sees it. A store/SKU the ERP
did not hold yet is created: the warehouse's snapshot is master data.
"""
from __future__ import annotations

import logging
from datetime import datetime, timezone

from prometheus_client import Counter
from sqlalchemy import Table, delete, insert, select, update
from sqlalchemy.engine import Connection

from contracts.batch import EventBatchV1
from contracts.customer import CrmCustomerExportedV1
from contracts.envelope import CloudEvent
from contracts.erp import ErpStockChangedV1
from contracts.errors import RetailbusError
from legacy_wrappers.inbox import claim
from legacy_wrappers.legacy_db import check_row
from services.erp import stock

log = logging.getLogger(__name__)

CONSUMER = "erp.on_file_rows"
STALE = Counter("retailbus_stock_snapshot_stale_total",
                "Stock snapshot rows not applied: the store's stock changed after the count", ["store"])


class UnappliedRowsError(RetailbusError):
    """A file chunk's row type is one the erp does not apply (a drop configured without an applier)."""


def _stamp(ts: datetime) -> str:
    return ts.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")


def apply_stock_row(conn: Connection, table: Table, row: ErpStockChangedV1, now: str) -> bool:
    """Set the store/SKU to the counted level unless it changed after the count; True if written."""
    c = table.c
    check_row(table, {"STORE_NO": row.store_id, "SKU": row.sku})
    key = (c.STORE_NO == row.store_id) & (c.SKU == row.sku)
    current = conn.execute(select(c.UPD_TS).where(key)).scalar()
    if current is not None and current > _stamp(row.changed_at):
        STALE.labels(row.store_id).inc()
        log.warning("stock snapshot row %s/%s counted at %s is older than the row's last change (%s): skipped",
                    row.store_id, row.sku, row.changed_at.isoformat(), current,
                    extra={"id": f"{row.store_id}/{row.sku}", "correlationid": None})
        return False
    if row.deleted:
        conn.execute(delete(table).where(key))
    elif current is None:
        conn.execute(insert(table).values(STORE_NO=row.store_id, SKU=row.sku, ON_HAND=row.on_hand, UPD_TS=now))
    else:
        conn.execute(update(table).where(key).values(ON_HAND=row.on_hand, UPD_TS=now))
    return True


def apply_stock_batch(conn: Connection, tables: dict[str, Table], batch: EventBatchV1, event: CloudEvent) -> int:
    """Each row not taken before, its key claimed in RB_INBOX beside its write; rows taken."""
    table, now, taken = tables[stock.TABLE], _stamp(datetime.now(timezone.utc)), 0
    for item, row in zip(batch.items, batch.typed_items()):
        if claim(conn, CONSUMER, item.idempotencykey, event.id):
            apply_stock_row(conn, table, row, now)
            taken += 1
    return taken


# row type -> (the legacy table it reaches, its applier)
APPLIERS = {
    ErpStockChangedV1.TYPE: (stock.TABLE, apply_stock_batch),
}
# row type -> the service that applies it (the erp acks its chunks)
ELSEWHERE = {CrmCustomerExportedV1.TYPE: "customers"}


def table_of(batch: EventBatchV1) -> str:
    """The legacy table a chunk's rows go to; UnappliedRowsError when the erp applies none."""
    if batch.item_type not in APPLIERS:
        raise UnappliedRowsError(f"item_type: the erp applies no {batch.item_type!r} rows (it applies "
                                 f"{', '.join(sorted(APPLIERS))}); a file drop is configured that nothing applies")
    return APPLIERS[batch.item_type][0]


def apply(conn: Connection, tables: dict[str, Table], batch: EventBatchV1, event: CloudEvent) -> int:
    """Apply a chunk's rows in the caller's transaction; returns how many were new (0: a repeat)."""
    table_of(batch)
    return APPLIERS[batch.item_type][1](conn, tables, batch, event)


def trace_items(batch: EventBatchV1) -> list[dict]:
    """The chunk's rows for the journal: key, file row, and the row's business name."""
    return [{"key": item.idempotencykey, "row": item.row,
             "refs": [f"{item.data.get('store_id') or ''}/{item.data.get('sku') or ''}"]}
            for item in batch.items]
