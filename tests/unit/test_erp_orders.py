"""services/erp/reservations.py and orders.py on a real SQLite file with the legacy ERP's schema:
availability is on hand minus live reservations, a reservation is all or nothing, an order's
commitment is closed exactly once (revenue or reversal) and every document balances."""
from __future__ import annotations

from datetime import date, datetime, timedelta, timezone

import pytest
import sqlalchemy as sa

from contracts.orders import OrderPlacedV1
from demo.legacy_erp import postings
from demo.legacy_erp.schema import DEMO_ON_HAND, create_schema, engine_for, seed_demo_data
from services.erp import orders, reservations

pytestmark = pytest.mark.unit

NOW = datetime(2026, 12, 7, 10, 0, tzinfo=timezone.utc)
LATER = NOW + timedelta(days=3)


def order(order_id="W-1", store="S001", lines=(("100001", 2, 1000),), points=300, card="LC1") -> OrderPlacedV1:
    items = [{"line_no": n, "sku": sku, "quantity": q, "unit_price_minor": p, "line_total_minor": q * p}
             for n, (sku, q, p) in enumerate(lines, start=1)]
    total = sum(i["line_total_minor"] for i in items)
    return OrderPlacedV1(order_id=order_id, customer_id="C00001", loyalty_card=card, pickup_store=store,
                         currency="EUR", lines=items, total_minor=total, points=points, points_minor=points,
                         paid_minor=total - points, payment_reference="PSP-1", placed_at=NOW)


@pytest.fixture
def db(tmp_path):
    engine = engine_for(f"sqlite:///{tmp_path / 'erp.db'}")
    create_schema(engine)
    with engine.begin() as conn:
        seed_demo_data(conn)
        conn.execute(sa.text("UPDATE STK_LVL SET ON_HAND = 5 WHERE SKU = '100001'"))
    md = sa.MetaData()
    md.reflect(engine, only=("STK_LVL", "STK_RSV", "ORD_HDR", "ORD_LIN", "GL_PST", "DOC_SEQ"))
    yield engine, orders.OrderTables.of(dict(md.tables))
    engine.dispose()


def reserve(conn, t, order_id, lines, now=NOW, until=LATER, store="S001"):
    return reservations.reserve(conn, t.stock, t.reservations, order_id, store, lines, until, now)


def available(conn, t, sku="100001", now=NOW, store="S001"):
    return reservations.available(conn, t.stock, t.reservations, store, sku, now)


def test_reservations_take_availability_all_or_nothing_and_once(db):
    engine, t = db
    with engine.begin() as conn:
        first = reserve(conn, t, "W-1", [("100001", 2), ("100001", 1)])
        assert [(lv.sku, lv.quantity, lv.on_hand, lv.reserved) for lv in first.levels] == [("100001", 3, 5, 3)]
        assert available(conn, t) == 2
        again = reserve(conn, t, "W-1", [("100001", 3)])
        assert again.duplicate and available(conn, t) == 2  # a repeated command reserves nothing more
        short = reserve(conn, t, "W-2", [("100002", 1), ("100001", 3)])
        assert short.shortages == [("100001", 3, 2)] and not short.levels
        assert available(conn, t, "100002") == DEMO_ON_HAND  # the line that would fit was not reserved either
        assert reserve(conn, t, "W-3", [("100001", 2)]).levels
        assert available(conn, t) == 0
        assert reserve(conn, t, "W-4", [("NOSUCH", 1)]).shortages == [("NOSUCH", 1, 0)]
        # an expired reservation stops counting; the legacy ERP's stock answer says the same
        assert available(conn, t, now=LATER + timedelta(seconds=1)) == 5
        assert postings.stock_answer(conn, "S001", "100001", NOW) == {
            "STORE": "S001", "SKU": "100001", "ON_HAND": 5, "RESERVED": 5, "AVAILABLE": 0}


def test_release_and_collect_end_a_reservation_once(db):
    engine, t = db
    with engine.begin() as conn:
        reserve(conn, t, "W-1", [("100001", 2)])
        reserve(conn, t, "W-2", [("100001", 1)])
        store, released = reservations.release(conn, t.stock, t.reservations, "W-1", NOW)
        assert store == "S001" and [(lv.quantity, lv.on_hand, lv.reserved) for lv in released] == [(2, 5, 1)]
        assert reservations.release(conn, t.stock, t.reservations, "W-1", NOW) == (None, [])
        with pytest.raises(reservations.ReservationReleasedError):
            reservations.collect(conn, t.stock, t.reservations, "W-1", NOW)
        # collected after its expiry: the goods are in the customer's hands, on hand goes down anyway
        late = LATER + timedelta(hours=1)
        store, taken = reservations.collect(conn, t.stock, t.reservations, "W-2", late)
        assert [(lv.quantity, lv.on_hand, lv.reserved) for lv in taken] == [(1, 4, 0)]
        assert reservations.collect(conn, t.stock, t.reservations, "W-2", late) == (None, [])
        assert available(conn, t) == 4


def balances(conn, t) -> dict[str, int]:
    rows = conn.execute(sa.select(t.gl.c.ACCOUNT, sa.func.sum(t.gl.c.DR_CENTS - t.gl.c.CR_CENTS))
                        .group_by(t.gl.c.ACCOUNT)).all()
    return {account: int(net) for account, net in rows if net}


def test_commitment_then_exactly_one_closing_document(db):
    engine, t = db
    with engine.begin() as conn:
        placed = order("W-1", lines=(("100001", 2, 1000), ("100002", 1, 500)), points=300)
        doc, duplicate = orders.commit(conn, t, placed, NOW)
        assert (doc, duplicate) == ("O00000001", False)
        assert orders.commit(conn, t, placed, NOW) == (doc, True)
        assert balances(conn, t) == {"1150": 2200, "1300": 300, "2500": -2500}
        assert orders.recognise(conn, t, "W-1", date(2026, 12, 8), NOW) == ("O00000002", False)
        assert orders.recognise(conn, t, "W-1", date(2026, 12, 8), NOW) == ("O00000002", True)
        assert balances(conn, t) == {"1150": 2200, "1300": 300, "4000": -2500}
        with pytest.raises(orders.OrderClosedError):
            orders.reverse(conn, t, "W-1", date(2026, 12, 8), NOW)

        orders.commit(conn, t, order("W-2", points=0, card=None), NOW)
        assert orders.reverse(conn, t, "W-2", date(2026, 12, 9), NOW) == ("O00000004", False)
        assert orders.reverse(conn, t, "W-2", date(2026, 12, 9), NOW)[1] is True
        with pytest.raises(orders.OrderClosedError):
            orders.recognise(conn, t, "W-2", date(2026, 12, 9), NOW)
        assert orders.reverse(conn, t, "W-never", date(2026, 12, 9), NOW) == (None, False)
        assert balances(conn, t) == {"1150": 2200, "1300": 300, "4000": -2500}  # W-2 nets to nothing
        per_doc = conn.execute(sa.select(t.gl.c.DOC_NO, sa.func.sum(t.gl.c.DR_CENTS), sa.func.sum(t.gl.c.CR_CENTS))
                               .group_by(t.gl.c.DOC_NO)).all()
        assert len(per_doc) == 4 and all(dr == cr for _, dr, cr in per_doc)
        head = orders.header(conn, t, "W-2")
        assert (head.STATUS, head.END_DOC_NO, head.END_DATE, head.PAY_REF) == ("X", "O00000004", "20261209", "PSP-1")
