"""The experience API's order book (RB_ORDER): every order as the customer sees it.

An order is written here with its `order.placed.v1` in the API's transactional outbox,
in one transaction, before the API answers: accepted means durably recorded, and the
order process is told exactly once. Its status then only moves forward, from what the
estate announces: accepted -> reserved (the ERP reserved its stock) -> ready_for_pickup
(the store picked it) -> collected or cancelled (with the reason), which the order
process closes here (`order.close.v1`). A message arriving late (a reservation after the
pick) never moves an order back. Plain functions over SQLAlchemy Core, in the caller's
transaction.
"""
from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone

from sqlalchemy import BigInteger, Column, Index, Integer, MetaData, String, Table, Text, func, select, update
from sqlalchemy.engine import Connection

from contracts.orders import OrderPlacedV1

STATES = ("accepted", "reserved", "ready_for_pickup", "collected", "cancelled")
RANK = {"accepted": 0, "reserved": 1, "ready_for_pickup": 2, "collected": 3, "cancelled": 3}
SINCE = {"accepted": "ACCEPTED_AT", "reserved": "RESERVED_AT", "ready_for_pickup": "READY_AT"}

metadata = MetaData()
ORDERS = Table(
    "RB_ORDER", metadata,
    Column("ORDER_ID", String(40), primary_key=True),
    Column("CLIENT", String(16), nullable=False),          # the ecommerce client that placed it (signed)
    Column("CUSTOMER_ID", String(12), nullable=False),
    Column("STORE_ID", String(8), nullable=False),
    Column("CURRENCY", String(3), nullable=False),
    Column("TOTAL_MINOR", BigInteger, nullable=False),
    Column("POINTS", Integer, nullable=False),
    Column("POINTS_MINOR", BigInteger, nullable=False),
    Column("PAID_MINOR", BigInteger, nullable=False),
    Column("PAYMENT_REF", String(64), nullable=False),
    Column("REQUEST_HASH", String(64), nullable=False),    # what makes a retry the same order
    Column("BUSINESS_DAY", String(10), nullable=False),    # the day it was accepted (UTC)
    Column("STATUS", String(20), nullable=False),
    Column("REASON", String(40)),
    Column("DETAIL", String(500)),
    Column("ACCEPTED_AT", String(40), nullable=False),
    Column("RESERVED_AT", String(40)),
    Column("READY_AT", String(40)),
    Column("CLOSED_AT", String(40)),
    Column("CANCEL_REQUESTED_AT", String(40)),
    Column("REVENUE_DOC_NO", String(12)),
    Column("POINTS_EARNED", Integer),
    Column("BODY", Text, nullable=False),                  # the order.placed.v1 data
    Column("UPDATED_AT", String(40), nullable=False),
    Index("IX_RB_ORDER_STATUS", "STATUS", "UPDATED_AT"),
    Index("IX_RB_ORDER_DAY", "BUSINESS_DAY"),
)
C = ORDERS.c


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat()


def request_hash(request: dict) -> str:
    return hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()


def get(conn: Connection, order_id: str):
    return conn.execute(select(ORDERS).where(C.ORDER_ID == order_id)).first()


def record(conn: Connection, order: OrderPlacedV1, client: str, digest: str) -> None:
    at = order.placed_at.isoformat()
    conn.execute(ORDERS.insert().values(
        ORDER_ID=order.order_id, CLIENT=client, CUSTOMER_ID=order.customer_id, STORE_ID=order.pickup_store,
        CURRENCY=order.currency, TOTAL_MINOR=order.total_minor, POINTS=order.points, POINTS_MINOR=order.points_minor,
        PAID_MINOR=order.paid_minor, PAYMENT_REF=order.payment_reference, REQUEST_HASH=digest,
        BUSINESS_DAY=order.placed_at.astimezone(timezone.utc).date().isoformat(), STATUS="accepted",
        ACCEPTED_AT=at, BODY=json.dumps(order.model_dump(mode="json")), UPDATED_AT=at))


def advance(conn: Connection, order_id: str, status: str, at: datetime) -> bool:
    """Move an open order forward to `status` (reserved, ready_for_pickup); False when it is
    there or past it already, or is not ours."""
    lower = [s for s in STATES if RANK[s] < RANK[status]]
    stamp = {SINCE[status]: at.isoformat()} if status in SINCE else {}
    return conn.execute(update(ORDERS).where(C.ORDER_ID == order_id, C.STATUS.in_(lower))
                        .values(STATUS=status, UPDATED_AT=now_iso(), **stamp)).rowcount == 1


def request_cancel(conn: Connection, order_id: str) -> bool:
    """Note the customer's cancellation; False when noted before."""
    return conn.execute(update(ORDERS).where(C.ORDER_ID == order_id, C.CANCEL_REQUESTED_AT.is_(None))
                        .values(CANCEL_REQUESTED_AT=now_iso(), UPDATED_AT=now_iso())).rowcount == 1


def close(conn: Connection, order_id: str, outcome: str, at: datetime, reason: str | None, detail: str,
          revenue_doc_no: str | None, points_earned: int) -> bool:
    """Close an open order (collected or cancelled); False when it was closed before."""
    return conn.execute(update(ORDERS).where(C.ORDER_ID == order_id, C.STATUS.not_in(("collected", "cancelled")))
                        .values(STATUS=outcome, REASON=reason, DETAIL=detail, CLOSED_AT=at.isoformat(),
                                REVENUE_DOC_NO=revenue_doc_no, POINTS_EARNED=points_earned,
                                UPDATED_AT=now_iso())).rowcount == 1


def view(row) -> dict:
    """The order as the customer sees it (`GET /v1/orders/{id}`)."""
    return {"order_id": row.ORDER_ID, "status": row.STATUS, "reason": row.REASON, "detail": row.DETAIL,
            "pickup_store": row.STORE_ID, "currency": row.CURRENCY, "total_minor": row.TOTAL_MINOR,
            "points": row.POINTS, "points_minor": row.POINTS_MINOR, "paid_minor": row.PAID_MINOR,
            "accepted_at": row.ACCEPTED_AT, "reserved_at": row.RESERVED_AT, "ready_at": row.READY_AT,
            "closed_at": row.CLOSED_AT, "cancel_requested": row.CANCEL_REQUESTED_AT is not None,
            "points_earned": row.POINTS_EARNED}


def counts(conn: Connection) -> dict[str, int]:
    return {status: int(n) for status, n in conn.execute(select(C.STATUS, func.count()).group_by(C.STATUS))}


def stuck(conn: Connection, sla: dict[str, float], now: datetime) -> dict[str, int]:
    """Per open state, the orders in it longer than its SLA (seconds)."""
    out = {}
    for status, column in SINCE.items():
        before = datetime.fromtimestamp(now.timestamp() - sla[status], timezone.utc).isoformat()
        out[status] = int(conn.execute(select(func.count()).where(C.STATUS == status, C[column] < before)).scalar())
    return out


def accepted_on(conn: Connection, day: str) -> list:
    """(order id, store, status, total, points) of the orders accepted on `day` (YYYY-MM-DD)."""
    return conn.execute(select(C.ORDER_ID, C.STORE_ID, C.STATUS, C.TOTAL_MINOR, C.POINTS, C.REASON)
                        .where(C.BUSINESS_DAY == day).order_by(C.ORDER_ID)).all()
