"""Click and collect end to end (issue 20) with the real broker, services, demo ERP, loyalty
platform, CRM and two store agents: an order's whole path once, then the acceptance checks."""
from __future__ import annotations

import pytest

from tests.integration.orders_estate import OrdersEstate, order_body
from tests.integration.support import wait_for

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def estate(amqp_uri, tmp_path_factory):
    estate = OrdersEstate(tmp_path_factory.mktemp("orders"), amqp_uri)
    try:
        estate.start()
        yield estate
    finally:
        estate.close()


def settle(estate, order_id: str, statuses=("collected", "cancelled"), timeout: float = 90) -> dict:
    found = wait_for(lambda: (o := estate.order(order_id))["status"] in statuses and o, timeout, 0.2)
    assert found, (estate.order(order_id), estate.log("orders")[-3000:])
    return found


@pytest.mark.timeout(300)
def test_an_order_from_placed_to_collected(estate):
    estate.enrol("LC9000000001", 1000)
    estate.set_stock("S001", "100005", 10)
    status, body = estate.place(order_body("W-SMOKE-1", "S001", [("100005", 2, 1999)], card="LC9000000001",
                                           points=500))
    assert status == 202 and body["status"] == "accepted", body
    assert estate.place(order_body("W-SMOKE-1", "S001", [("100005", 2, 1999)], card="LC9000000001",
                                   points=500))[1]["duplicate"] is True
    settle(estate, "W-SMOKE-1", ("reserved",))
    assert estate.stock("S001", "100005")["AVAILABLE"] == 8
    assert wait_for(lambda: [t["ORDER_ID"] for t in estate.tasks("S001")] == ["W-SMOKE-1"], 60), estate.log("S001")
    assert estate.tasks("S002") == []  # the other store never sees it
    assert estate.report("S001", "picked", "W-SMOKE-1")[0] == 200
    settle(estate, "W-SMOKE-1", ("ready_for_pickup",))
    assert estate.report("S001", "collected", "W-SMOKE-1")[0] == 200
    done = settle(estate, "W-SMOKE-1")
    assert done["status"] == "collected" and done["points_earned"] == 39, done
    member = estate.member("LC9000000001")
    assert (member["balance"], member["held_points"]) == (1000 - 500 + 39, 0)
    assert estate.legacy("SELECT STATUS FROM ORD_HDR WHERE ORDER_NO = 'W-SMOKE-1'") == [("C",)]
    assert estate.legacy("SELECT ON_HAND FROM STK_LVL WHERE STORE_NO = 'S001' AND SKU = '100005'") == [(8,)]
    assert wait_for(lambda: estate.crm.rows("SELECT type, amount_minor FROM interactions WHERE reference = ?",
                                            "S001/W-SMOKE-1") == [("purchase", 3998)], 60)
