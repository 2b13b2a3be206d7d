"""customer.updated.v1 -> the legacy CUST_MST table.

The message is the whole record, so the newest `updated_at` wins and an older
or repeated update changes nothing (a replay is harmless even without the
inbox). A file chunk is applied in the worker's one transaction (`db.conn`):
each row key is claimed in RB_INBOX beside its upsert, so a redelivered chunk
applies no row twice.
"""
from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import Table, select
from sqlalchemy.engine import Connection

from contracts.batch import EventBatchV1
from contracts.customer import CustomerUpdatedV1
from contracts.envelope import CloudEvent
from legacy_wrappers.inbox import claim


def legacy_stamp(ts: datetime) -> str:
    """The legacy UPD_TS format: ISO UTC with microseconds, 26 characters, sortable."""
    return ts.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")


def upsert_customer(conn: Connection, cust: Table, customer: CustomerUpdatedV1) -> bool:
    """Write the record unless CUST_MST already holds one at least as new; True if written."""
    stamp = legacy_stamp(customer.updated_at)
    values = {"NAME": customer.name[:80], "EMAIL": customer.email, "PHONE": customer.phone,
              "LOYALTY_CARD": customer.loyalty_card, "UPD_TS": stamp}
    current = conn.execute(select(cust.c.UPD_TS).where(cust.c.CUST_NO == customer.customer_id)).first()
    if current is None:
        conn.execute(cust.insert().values(CUST_NO=customer.customer_id, **values))
        return True
    if current[0] >= stamp:
        return False
    conn.execute(cust.update().where(cust.c.CUST_NO == customer.customer_id).values(**values))
    return True


def apply_customer_batch(conn: Connection, cust: Table, consumer: str, batch: EventBatchV1,
                         event: CloudEvent) -> int:
    """Apply each row not applied before, in the caller's transaction; returns rows applied.

    Rows are typed first: one invalid row fails the chunk before anything is written.
    Each row's key is claimed in RB_INBOX right before its upsert, in the same
    transaction, so a redelivered chunk (or a chunk re-sent after the file
    wrapper resumed) applies no row twice.
    """
    applied = 0
    for item, customer in zip(batch.items, batch.typed_items()):
        if claim(conn, consumer, item.idempotencykey, event.id):
            upsert_customer(conn, cust, customer)
            applied += 1
    return applied


def trace_items(batch: EventBatchV1) -> list[dict]:
    """The chunk's rows for the journal: key, file row, customer id (`retailbus trace C0001`)."""
    return [{"key": item.idempotencykey, "row": item.row, "refs": [str(item.data.get("customer_id") or "")]}
            for item in batch.items]
