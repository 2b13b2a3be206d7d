"""A click-and-collect order's money in the legacy ERP: commitment, then revenue or reversal.

An order is paid before it is delivered, so its money is a liability until the customer
collects: the commitment document (ORD_HDR.DOC_NO) debits what the payment provider
authorised (1150, payments receivable, under the payment reference) and the points'
value (1300, the loyalty tender account the loyalty settlement clears when the points
are captured) and credits deferred revenue (2500). Exactly one closing document
follows (END_DOC_NO): on collection revenue is recognised (Dr 2500, Cr 4000), on
cancellation the commitment is reversed (the mirror of its rows). Debits equal
credits in every document; document numbers come from DOC_SEQ `ORD` like any
posting's. Each step is idempotent per order, and the closing steps exclude each
other: a collected order cannot be reversed, nor a reversed one collected.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime

from sqlalchemy import Table, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from contracts.orders import OrderPlacedV1
from legacy_wrappers.legacy_db import check_row
from services.erp import ledger
from services.erp.reservations import stamp

PAYMENTS_ACCOUNT = "1150"   # ecommerce payments receivable
LOYALTY_ACCOUNT = ledger.TENDER_ACCOUNTS["loyalty"]
DEFERRED_ACCOUNT = "2500"   # deferred revenue: paid, not yet delivered
REVENUE_ACCOUNT = ledger.REVENUE_ACCOUNT
SEQUENCE, PREFIX = "ORD", "O"
OPEN, COLLECTED, REVERSED = "O", "C", "X"
TABLES = ("ORD_HDR", "ORD_LIN", "STK_RSV")


@dataclass(frozen=True)
class OrderTables:
    header: Table
    lines: Table
    reservations: Table
    stock: Table
    gl: Table
    doc_seq: Table

    @classmethod
    def of(cls, t: dict[str, Table]) -> "OrderTables":
        return cls(t["ORD_HDR"], t["ORD_LIN"], t["STK_RSV"], t["STK_LVL"], t["GL_PST"], t["DOC_SEQ"])


class OrderClosedError(ValueError):
    """Raised when an order is to be closed the other way: collected after its reversal, or reversed
    after its collection. No retry changes that; a person must look."""


def _yyyymmdd(day: date) -> str:
    return day.isoformat().replace("-", "")


def _doc_no(conn: Connection, t: OrderTables) -> str:
    """The next `ORD` number, as the legacy posting program takes one (the UPDATE locks the counter)."""
    insert = (postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert)(t.doc_seq)
    conn.execute(insert.values(SEQ_NAME=SEQUENCE, NEXT_NO=1).on_conflict_do_nothing())  # a database from before orders
    c = t.doc_seq.c
    after = conn.execute(update(t.doc_seq).where(c.SEQ_NAME == SEQUENCE).values(NEXT_NO=c.NEXT_NO + 1)
                         .returning(c.NEXT_NO)).scalar_one()
    return f"{PREFIX}{after - 1:08d}"


def _gl(doc_no: str, day: str, rows: list[tuple[str, int, int]]) -> list[dict]:
    return [dict(DOC_NO=doc_no, ACCOUNT=account, POST_DATE=day, DR_CENTS=dr, CR_CENTS=cr)
            for account, dr, cr in rows if dr or cr]


def commitment_rows(paid: int, points_value: int, total: int) -> list[tuple[str, int, int]]:
    """(account, debit, credit) of an order's commitment."""
    return [(PAYMENTS_ACCOUNT, paid, 0), (LOYALTY_ACCOUNT, points_value, 0), (DEFERRED_ACCOUNT, 0, total)]


def header(conn: Connection, t: OrderTables, order_id: str):
    return conn.execute(select(t.header).where(t.header.c.ORDER_NO == order_id)).first()


def commit(conn: Connection, t: OrderTables, order: OrderPlacedV1, now: datetime) -> tuple[str, bool]:
    """The order document, its lines and its commitment in GL_PST: (DOC_NO, duplicate)."""
    found = header(conn, t, order.order_id)
    if found is not None:
        return found.DOC_NO, True
    doc_no = _doc_no(conn, t)
    day, at = _yyyymmdd(order.placed_at.date()), stamp(now)
    row = dict(ORDER_NO=order.order_id, DOC_NO=doc_no, STORE_NO=order.pickup_store, ORDER_DATE=day,
               CUST_NO=order.customer_id, LOYALTY_CARD=order.loyalty_card, TOTAL_CENTS=order.total_minor,
               POINTS=order.points, POINTS_CENTS=order.points_minor, PAID_CENTS=order.paid_minor,
               CURRENCY=order.currency, PAY_REF=order.payment_reference, STATUS=OPEN, CREATED_TS=at, UPD_TS=at)
    lines = [dict(ORDER_NO=order.order_id, LINE_NO=line.line_no, SKU=line.sku, QTY=line.quantity,
                  UNIT_PRICE_CENTS=line.unit_price_minor, LINE_CENTS=line.line_total_minor) for line in order.lines]
    check_row(t.header, row)
    for line in lines:
        check_row(t.lines, line)
    conn.execute(t.header.insert(), row)
    conn.execute(t.lines.insert(), lines)
    conn.execute(t.gl.insert(), _gl(doc_no, day, commitment_rows(order.paid_minor, order.points_minor,
                                                                 order.total_minor)))
    return doc_no, False


def _close(conn: Connection, t: OrderTables, order_id: str, status: str, day: date, now: datetime) -> tuple[str | None, bool]:
    found = header(conn, t, order_id)
    if found is None:
        return None, False  # never committed: nothing to recognise or reverse
    if found.STATUS == status:
        return found.END_DOC_NO, True
    if found.STATUS != OPEN:
        done = "collected" if found.STATUS == COLLECTED else "reversed"
        raise OrderClosedError(f"order {order_id} was {done} (document {found.END_DOC_NO})")
    doc_no = _doc_no(conn, t)
    post = _yyyymmdd(day)
    if status == COLLECTED:
        rows = [(DEFERRED_ACCOUNT, found.TOTAL_CENTS, 0), (REVENUE_ACCOUNT, 0, found.TOTAL_CENTS)]
    else:
        rows = [(account, cr, dr) for account, dr, cr in commitment_rows(found.PAID_CENTS, found.POINTS_CENTS,
                                                                         found.TOTAL_CENTS)]
    conn.execute(t.gl.insert(), _gl(doc_no, post, rows))
    conn.execute(update(t.header).where(t.header.c.ORDER_NO == order_id, t.header.c.STATUS == OPEN)
                 .values(STATUS=status, END_DOC_NO=doc_no, END_DATE=post, UPD_TS=stamp(now)))
    return doc_no, False


def recognise(conn: Connection, t: OrderTables, order_id: str, day: date, now: datetime) -> tuple[str | None, bool]:
    """Revenue of a collected order: (the closing DOC_NO, duplicate); (None, False) if never committed."""
    return _close(conn, t, order_id, COLLECTED, day, now)


def reverse(conn: Connection, t: OrderTables, order_id: str, day: date, now: datetime) -> tuple[str | None, bool]:
    """The commitment of a cancelled order taken back: as `recognise`."""
    return _close(conn, t, order_id, REVERSED, day, now)
