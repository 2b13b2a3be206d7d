"""Click and collect with the order process and the erp each killed with SIGKILL mid-run (and
started again, as `retailbus up` would): every order completes once. No instance is doubled, no
document, reservation, GL row or loyalty booking is written twice, stock and points add up."""
from __future__ import annotations

import random

import eventlet
import pytest

from tests.integration.orders_estate import OrdersEstate, order_body
from tests.integration.support import wait_for

pytestmark = pytest.mark.chaos

ORDERS = 120


@pytest.fixture
def estate(amqp_uri, tmp_path):
    estate = OrdersEstate(tmp_path, amqp_uri)
    try:
        estate.start()
        yield estate
    finally:
        estate.close()


@pytest.mark.timeout(900)
def test_process_service_and_erp_killed_mid_run_every_order_completes_once(estate):
    rng = random.Random(7)
    for store in ("S001", "S002"):
        estate.set_stock(store, "100013", 150)
    cards = [f"LC93{n:08d}" for n in range(10)]
    for card in cards:
        estate.enrol(card, 5000)
    orders = {}
    for n in range(ORDERS):
        card = cards[n % len(cards)] if n % 3 else None
        orders[f"W-KILL-{n:03d}"] = order_body(f"W-KILL-{n:03d}", ("S001", "S002")[n % 2],
                                               [("100013", rng.randint(1, 2), 1200)], card=card,
                                               points=100 if card else 0)
    running = [True]

    def associate(store: str):
        while running[0]:
            for task in estate.tasks(store):
                estate.report(store, "collected", task["ORDER_ID"])
            eventlet.sleep(0.3)

    helpers = [eventlet.spawn(associate, s) for s in ("S001", "S002")]
    pool = eventlet.GreenPool(8)
    placed = pool.imap(lambda body: estate.place(body)[0], orders.values())
    for n, status in enumerate(placed):
        assert status in (200, 202)
        if n in (30, 80):  # mid-stream: the process, then the process and the erp together
            estate.kill("orders")
            if n == 80:
                estate.kill("erp")
            eventlet.sleep(1)
            estate.start("orders", *(("erp",) if n == 80 else ()))
    try:
        done = wait_for(lambda: all(estate.order(o)["status"] in ("collected", "cancelled") for o in orders), 600, 2)
    finally:
        running[0] = False
        for helper in helpers:
            helper.wait()
    final = {o: estate.order(o) for o in orders}
    assert done, {o: f["status"] for o, f in final.items() if f["status"] not in ("collected", "cancelled")}
    collected = {o for o, f in final.items() if f["status"] == "collected"}
    assert len(collected) == ORDERS, {f["reason"] for f in final.values() if f["status"] == "cancelled"}
    # once: one instance, one reservation row, one commitment and one revenue document (with their GL rows) each
    assert estate.process_states() == {"completed": ORDERS}
    assert estate.legacy("SELECT count(*), count(DISTINCT ORDER_NO) FROM STK_RSV WHERE ORDER_NO LIKE 'W-KILL-%'") \
        == [(ORDERS, ORDERS)]
    assert estate.legacy("SELECT count(*), count(DISTINCT DOC_NO), count(DISTINCT END_DOC_NO) FROM ORD_HDR "
                         "WHERE ORDER_NO LIKE 'W-KILL-%' AND STATUS = 'C'") == [(ORDERS, ORDERS, ORDERS)]
    with_points = sum(1 for o in orders.values() if o["points"])
    [(rows,)] = estate.legacy("SELECT count(*) FROM GL_PST WHERE DOC_NO IN (SELECT DOC_NO FROM ORD_HDR WHERE "
                              "ORDER_NO LIKE 'W-KILL-%' UNION SELECT END_DOC_NO FROM ORD_HDR WHERE ORDER_NO LIKE "
                              "'W-KILL-%')")
    assert rows == ORDERS * 2 + with_points + ORDERS * 2  # commitment: 1150, 2500 (+1300); revenue: 2500, 4000
    units = {s: sum(o["lines"][0]["quantity"] for o in orders.values() if o["pickup_store"] == s) for s in ("S001", "S002")}
    assert estate.legacy("SELECT STORE_NO, ON_HAND FROM STK_LVL WHERE SKU = '100013' ORDER BY 1") == [
        ("S001", 150 - units["S001"]), ("S002", 150 - units["S002"])]
    # the loyalty platform booked each order's redemption and earning once
    for card in cards:
        mine = [o for o, body in orders.items() if body.get("loyalty_card") == card]
        member = estate.member(card)
        earned = sum(final[o]["points_earned"] for o in mine)
        assert (member["balance"], member["held_points"]) == (5000 - 100 * len(mine) + earned, 0), (card, member)
    [(redeems, distinct)] = estate.platform.rows("SELECT count(*), count(DISTINCT reference) FROM ledger "
                                                 "WHERE type = 'REDEEM' AND reference LIKE '%/W-KILL-%'")
    assert redeems == distinct == with_points
