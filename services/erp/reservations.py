"""Stock reserved for click-and-collect orders (STK_RSV), and what is available to sell.

available = STK_LVL.ON_HAND minus the store's live reservations of the SKU (STATUS
'L' and EXPIRES_TS still ahead). Reserving reads the levels and inserts in the
caller's transaction while it holds the write lock on the store's stock rows (SQLite:
the worker's BEGIN IMMEDIATE; PostgreSQL: SELECT ... FOR UPDATE of the STK_LVL rows,
in key order as the postings take them), so two orders never both take the last unit.

Every change is per order and idempotent: reserving an order that has rows answers
them, releasing or collecting twice changes nothing the second time. Collection takes
the units off the shelf (ON_HAND down) as the reservation ends, in one transaction.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timezone

from sqlalchemy import Table, func, select, update
from sqlalchemy.engine import Connection

from legacy_wrappers.legacy_db import check_row

TABLE = "STK_RSV"
LIVE, COLLECTED, RELEASED = "L", "C", "R"


def stamp(at: datetime) -> str:
    """The legacy timestamp format (ISO UTC, microseconds, no zone): compared as text."""
    return at.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")


@dataclass(frozen=True)
class Level:
    """A line of an order's reservation with the store's levels of its SKU after the change."""
    sku: str
    quantity: int
    on_hand: int
    reserved: int

    def as_line(self) -> dict:
        return {"sku": self.sku, "quantity": self.quantity, "on_hand": self.on_hand, "reserved": self.reserved}


@dataclass(frozen=True)
class Outcome:
    """What a reservation came to: `levels` when reserved (now or before: `duplicate`),
    else `shortages` (sku, wanted, available) and nothing was written."""
    levels: list[Level]
    shortages: list[tuple[str, int, int]]
    duplicate: bool = False
    expires_at: str | None = None


def wanted(lines) -> dict[str, int]:
    """Units per SKU of (sku, quantity) pairs, a SKU on several lines summed."""
    out: dict[str, int] = defaultdict(int)
    for sku, quantity in lines:
        out[sku] += quantity
    return dict(out)


def levels(conn: Connection, stock: Table, rsv: Table, store: str, skus, now: datetime) -> dict[str, tuple[int, int]]:
    """SKU -> (on hand, reserved live) at `store`; a SKU the store has no stock row for is (0, reserved)."""
    skus = sorted(set(skus))
    s, r = stock.c, rsv.c
    on_hand = dict(conn.execute(select(s.SKU, s.ON_HAND).where(s.STORE_NO == store, s.SKU.in_(skus))).all())
    reserved = dict(conn.execute(
        select(r.SKU, func.sum(r.QTY)).where(r.STORE_NO == store, r.SKU.in_(skus), r.STATUS == LIVE,
                                             r.EXPIRES_TS > stamp(now)).group_by(r.SKU)).all())
    return {sku: (int(on_hand.get(sku, 0)), int(reserved.get(sku) or 0)) for sku in skus}


def available(conn: Connection, stock: Table, rsv: Table, store: str, sku: str, now: datetime) -> int:
    on_hand, reserved = levels(conn, stock, rsv, store, [sku], now)[sku]
    return on_hand - reserved


def _order_rows(conn: Connection, rsv: Table, order_id: str) -> list:
    r = rsv.c
    return conn.execute(select(r.RSV_ID, r.STORE_NO, r.SKU, r.QTY, r.STATUS, r.EXPIRES_TS)
                        .where(r.ORDER_NO == order_id).order_by(r.RSV_ID)).all()


def _with_levels(conn, stock, rsv, store: str, units: dict[str, int], now: datetime) -> list[Level]:
    found = levels(conn, stock, rsv, store, units, now)
    return [Level(sku, qty, *found[sku]) for sku, qty in sorted(units.items())]


def reserve(conn: Connection, stock: Table, rsv: Table, order_id: str, store: str, lines, expires_at: datetime,
            now: datetime) -> Outcome:
    """Reserve (sku, quantity) `lines` at `store` until `expires_at`, all or nothing."""
    existing = _order_rows(conn, rsv, order_id)
    if existing:
        units = wanted((row.SKU, row.QTY) for row in existing)
        return Outcome(_with_levels(conn, stock, rsv, existing[0].STORE_NO, units, now), [], duplicate=True,
                       expires_at=existing[0].EXPIRES_TS)
    units = wanted(lines)
    s = stock.c
    # PostgreSQL: lock the rows a posting would move, in the postings' order; SQLite holds the database's lock
    conn.execute(select(s.SKU).where(s.STORE_NO == store, s.SKU.in_(sorted(units))).order_by(s.SKU)
                 .with_for_update()).all()
    found = levels(conn, stock, rsv, store, units, now)
    shortages = [(sku, qty, found[sku][0] - found[sku][1]) for sku, qty in sorted(units.items())
                 if found[sku][0] - found[sku][1] < qty]
    if shortages:
        return Outcome([], shortages)
    at, until = stamp(now), stamp(expires_at)
    rows = [dict(ORDER_NO=order_id, STORE_NO=store, SKU=sku, QTY=qty, STATUS=LIVE, EXPIRES_TS=until,
                 CREATED_TS=at, UPD_TS=at) for sku, qty in sorted(units.items())]
    for row in rows:
        check_row(rsv, row)
    conn.execute(rsv.insert(), rows)
    return Outcome([Level(sku, qty, found[sku][0], found[sku][1] + qty) for sku, qty in sorted(units.items())],
                   [], expires_at=until)


def release(conn: Connection, stock: Table, rsv: Table, order_id: str, now: datetime) -> tuple[str | None, list[Level]]:
    """Give the order's live units back: (store, the released lines); none when nothing was live."""
    rows = [row for row in _order_rows(conn, rsv, order_id) if row.STATUS == LIVE]
    if not rows:
        return None, []
    r = rsv.c
    conn.execute(update(rsv).where(r.RSV_ID.in_([row.RSV_ID for row in rows]))
                 .values(STATUS=RELEASED, UPD_TS=stamp(now)))
    store = rows[0].STORE_NO
    return store, _with_levels(conn, stock, rsv, store, wanted((row.SKU, row.QTY) for row in rows), now)


def order_lines(conn: Connection, stock: Table, rsv: Table, order_id: str, now: datetime) -> tuple[str | None, list[Level]]:
    """(store, every line the order ever reserved with the store's levels now): what a repeated
    release or collection answers."""
    rows = _order_rows(conn, rsv, order_id)
    if not rows:
        return None, []
    return rows[0].STORE_NO, _with_levels(conn, stock, rsv, rows[0].STORE_NO, wanted((r.SKU, r.QTY) for r in rows), now)


class ReservationReleasedError(ValueError):
    """Raised when an order whose reservation was released is to be collected."""


def collect(conn: Connection, stock: Table, rsv: Table, order_id: str, now: datetime) -> tuple[str | None, list[Level]]:
    """The goods leave with the customer: the order's live units (expired too: they are in the
    customer's hands) come off ON_HAND and the reservation ends. (store, the lines); none when
    the order was collected before."""
    rows = _order_rows(conn, rsv, order_id)
    live = [row for row in rows if row.STATUS == LIVE]
    if not live:
        if any(row.STATUS == RELEASED for row in rows):
            raise ReservationReleasedError(f"order {order_id}: its reservation was released; it cannot be collected")
        return None, []
    at = stamp(now)
    r, s = rsv.c, stock.c
    conn.execute(update(rsv).where(r.RSV_ID.in_([row.RSV_ID for row in live])).values(STATUS=COLLECTED, UPD_TS=at))
    store = live[0].STORE_NO
    units = wanted((row.SKU, row.QTY) for row in live)
    for sku, qty in sorted(units.items()):  # key order, as postings move stock
        conn.execute(update(stock).where(s.STORE_NO == store, s.SKU == sku)
                     .values(ON_HAND=s.ON_HAND - qty, UPD_TS=at))
    return store, _with_levels(conn, stock, rsv, store, units, now)
