"""Read the three sides of a store's click-and-collect day (read-only): the experience API's
accepted orders (its database, ORDERS_API_DB_URI), the legacy ERP's order documents (ORD_HDR,
demo/legacy_erp/schema.py is the contract) and the loyalty service's holds for those orders."""
from __future__ import annotations

from datetime import date

from sqlalchemy import BigInteger, Column, Engine, Integer, MetaData, String, Table, select

from services.loyalty.tables import HOLDS
from services.orders.book import ORDERS
from services.reconcile.orders import ApiOrder, ErpOrder

ORD_HDR = Table("ORD_HDR", MetaData(), Column("ORDER_NO", String(40)), Column("DOC_NO", String(12)),
                Column("STORE_NO", String(8)), Column("ORDER_DATE", String(8)), Column("TOTAL_CENTS", BigInteger),
                Column("POINTS", Integer), Column("POINTS_CENTS", BigInteger), Column("STATUS", String(1)),
                Column("END_DOC_NO", String(12)), Column("END_DATE", String(8)), Column("UPD_TS", String(26)))


def api_orders(engine: Engine, store: str, day: date) -> list[ApiOrder]:
    c = ORDERS.c
    with engine.connect() as conn:
        rows = conn.execute(select(c.ORDER_ID, c.STATUS, c.TOTAL_MINOR, c.POINTS).where(
            c.STORE_ID == store, c.BUSINESS_DAY == day.isoformat())).all()
    return [ApiOrder(*row) for row in rows]


def erp_orders(legacy: Engine, store: str, day: date, also: set[str]) -> list[ErpOrder]:
    """The ERP's documents of the orders placed at `store` on `day`, and of `also` (the API's
    orders of the day, should the ERP date one otherwise); none before the ERP had any."""
    c = ORD_HDR.c
    with legacy.connect() as conn:
        if not legacy.dialect.has_table(conn, ORD_HDR.name):
            return []
        wanted = sorted(also)
        rows = conn.execute(select(c.ORDER_NO, c.STATUS, c.TOTAL_CENTS, c.POINTS, c.DOC_NO, c.END_DOC_NO, c.UPD_TS)
                            .where(c.STORE_NO == store, c.ORDER_DATE == day.strftime("%Y%m%d"))).all()
        for n in range(0, len(wanted), 500):
            rows += conn.execute(select(c.ORDER_NO, c.STATUS, c.TOTAL_CENTS, c.POINTS, c.DOC_NO, c.END_DOC_NO,
                                        c.UPD_TS).where(c.ORDER_NO.in_(wanted[n:n + 500]))).all()
    return list({row[0]: ErpOrder(*row) for row in rows}.values())


def stores_with_orders(engine: Engine, day: date) -> set[str]:
    with engine.connect() as conn:
        return set(conn.execute(select(ORDERS.c.STORE_ID).where(ORDERS.c.BUSINESS_DAY == day.isoformat())
                                .distinct()).scalars())


def captured(loyalty: Engine, store: str, orders: set[str]) -> dict[str, list[int]]:
    """Order -> the points of each of its holds the loyalty service captured."""
    out: dict[str, list[int]] = {}
    wanted = sorted(orders)
    h = HOLDS.c
    with loyalty.connect() as conn:
        for n in range(0, len(wanted), 500):
            for order_id, points in conn.execute(select(h.POS_TXN_ID, h.POINTS).where(
                    h.STORE_ID == store, h.STATUS == "captured", h.POS_TXN_ID.in_(wanted[n:n + 500]))):
                out.setdefault(order_id, []).append(int(points))
    return out


def collected_points(legacy: Engine, store: str, day: date) -> dict[str, int]:
    """Order -> the points' value (cents) of the orders whose revenue the ERP recognised on `day`:
    what those orders paid with points, as a sale's LOYALTY tender (GL 1300) says it for a till's."""
    c = ORD_HDR.c
    with legacy.connect() as conn:
        if not legacy.dialect.has_table(conn, ORD_HDR.name):
            return {}
        return {order: int(cents) for order, cents in conn.execute(select(c.ORDER_NO, c.POINTS_CENTS).where(
            c.STORE_NO == store, c.STATUS == "C", c.END_DATE == day.strftime("%Y%m%d"), c.POINTS_CENTS > 0))}
