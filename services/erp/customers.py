"""customer.updated.v1 -> the legacy CUST_MST table.

The message is the whole record, so the newest `updated_at` wins and an older
or repeated update changes nothing (a replay is harmless even without the
inbox). A file chunk is applied in one transaction: its row keys are claimed
in RB_INBOX beside the upserts, so a redelivered chunk applies no row twice.
"""
from __future__ import annotations

import weakref
from datetime import datetime, timezone

from sqlalchemy import MetaData, Table, select
from sqlalchemy.engine import Connection, Engine

from contracts.batch import EventBatchV1
from contracts.customer import CustomerUpdatedV1
from contracts.envelope import CloudEvent
from services.bus.inbox import INBOX, ensure_inbox


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


def apply_customer_batch(engine: Engine, cust: Table, consumer: str, batch: EventBatchV1,
                         event: CloudEvent) -> int:
    """Apply each row not applied before, in one transaction; returns rows applied.

    Rows are typed first: one invalid row fails the chunk before anything is written.
    """
    customers = [(item.idempotencykey, batch.typed(item)) for item in batch.items]
    ensure_inbox(engine)
    now = datetime.now(timezone.utc).isoformat()
    with engine.begin() as conn:
        keys = [k for k, _ in customers]
        done = set(conn.execute(select(INBOX.c.IDEM_KEY).where(
            INBOX.c.CONSUMER == consumer, INBOX.c.IDEM_KEY.in_(keys))).scalars())
        fresh = [(k, c) for k, c in customers if k not in done]
        if fresh:
            conn.execute(INBOX.insert(), [{"CONSUMER": consumer, "IDEM_KEY": k, "MESSAGE_ID": event.id,
                                           "RECEIVED_TS": now} for k, _ in fresh])
        for _, customer in fresh:
            upsert_customer(conn, cust, customer)
    return len(fresh)


_CUST_MST: "weakref.WeakKeyDictionary[Engine, Table]" = weakref.WeakKeyDictionary()


def cust_mst(engine: Engine) -> Table:
    """CUST_MST as the legacy database really has it (reflected once per engine)."""
    if engine not in _CUST_MST:
        md = MetaData()
        md.reflect(engine, only=("CUST_MST",))
        _CUST_MST[engine] = md.tables["CUST_MST"]
    return _CUST_MST[engine]


def on_file_rows(engine: Engine, batch: EventBatchV1, event: CloudEvent) -> int | None:
    """The erp's share of file rows: customer rows; other row types are not its business."""
    if batch.item_type != CustomerUpdatedV1.TYPE:
        return None
    return apply_customer_batch(engine, cust_mst(engine), "erp.on_file_rows", batch, event)
