"""What the store agent takes onto the bus path (worker_factory, a real outbox file):
the same sale sent on the legacy path and as a CloudEvent is compared by meaning,
a 'sale' of only negative lines is refused, quantities and amounts are bounded."""
from __future__ import annotations

import json

import pytest
from ulid import ULID

from contracts.envelope import CloudEvent
from contracts.pos import Limits
from bus.settings import AgentSettings
from tests.unit.test_store_agent import (  # noqa: F401 (fixtures)
    answer, auth_required, keys, legacy_sale, outbox, request, service, stock, store)

pytestmark = pytest.mark.unit

KEY = "pos.sale.v1:S001:S001-07-000001"


def cloudevent_sale(**data_changes) -> dict:
    """The sale of `legacy_sale()` as a POS that speaks the contract writes it: optional
    fields left out (no occurred_at, loyalty_card, customer_id, discount_minor, reference)."""
    data = {"store_id": "S001", "terminal_id": "07", "pos_txn_id": "S001-07-000001",
            "business_day": "2026-11-27", "currency": "EUR", "total_minor": 3998,
            "lines": [{"line_no": 1, "sku": "100001", "quantity": 2, "unit_price_minor": 1999,
                       "line_total_minor": 3998}],
            "tenders": [{"kind": "card", "amount_minor": 3998}]}
    data.update(data_changes)
    return {"specversion": "1.0", "id": str(ULID()), "source": "store/S001/pos/07", "type": "pos.sale.v1",
            "time": "2026-11-27T10:15:00Z", "idempotencykey": KEY,
            "data": {key: data[key] for key in reversed(list(data))}}  # another key order; absent stays absent


def post_event(service, envelope: dict):
    return answer(service.post_event(request("/v1/events", data=json.dumps(envelope),
                                             content_type="application/cloudevents+json")))


def without_time(sale: dict) -> dict:
    return {key: value for key, value in sale.items() if key != "TXN_TIME"}


def test_a_sale_sent_on_the_legacy_path_then_as_a_cloudevent_is_one_sale(service, outbox):
    status, first = answer(service.post_sale(request(body=without_time(legacy_sale()))))
    assert status == 200
    status, second = post_event(service, cloudevent_sale())
    assert status == 202, second
    assert second == {"id": first["REF"], "duplicate": True}
    assert len(outbox.unsent(10)) == 1


def test_a_cloudevent_then_the_same_sale_on_the_legacy_path_is_one_sale(service, outbox):
    status, first = post_event(service, cloudevent_sale())
    assert status == 202 and first["duplicate"] is False
    status, second = answer(service.post_sale(request(body={**without_time(legacy_sale()), "DISC": 0,
                                                            "LOYALTY_CARD": ""})))
    assert status == 200 and second["DUPLICATE"] is True and second["REF"] == first["id"]
    status, third = post_event(service, cloudevent_sale(loyalty_card=None, customer_id=None, occurred_at=None))
    assert status == 202 and third["duplicate"] is True  # null spelled out: the same meaning
    [entry] = outbox.unsent(10)
    assert CloudEvent.from_json(entry.body).data["loyalty_card"] is None  # stored as the contract reads it


def test_a_different_sale_under_the_same_key_is_still_409(service, outbox):
    post_event(service, cloudevent_sale())
    status, body = post_event(service, cloudevent_sale(loyalty_card="LC1"))
    assert status == 409 and "different content" in body["MESSAGE"]
    assert len(outbox.unsent(10)) == 1


def negative_sale() -> dict:
    return legacy_sale(lines=[{"SKU": "100001", "QTY": -2, "PRICE": 1999, "LINE": -3998}])


def test_a_sale_whose_every_line_is_negative_is_refused_as_a_disguised_return(service, outbox):
    status, body = answer(service.post_sale(request(body=negative_sale())))
    assert status == 400 and body["MESSAGE"].startswith("TOTAL:") and "pos.return.v1" in body["MESSAGE"]
    lines = [{"line_no": 1, "sku": "100001", "quantity": -2, "unit_price_minor": 1999, "line_total_minor": -3998}]
    status, body = post_event(service, cloudevent_sale(lines=lines, total_minor=-3998,
                                                       tenders=[{"kind": "card", "amount_minor": -3998}]))
    assert status == 400 and "data.total_minor" in body["MESSAGE"] and "return" in body["MESSAGE"]
    assert outbox.unsent(10) == []


def test_a_sale_correcting_one_line_with_a_negative_one_is_still_a_sale(service, outbox):
    lines = [{"SKU": "100001", "QTY": 3, "PRICE": 1999, "LINE": 5997},
             {"SKU": "100001", "QTY": -1, "PRICE": 1999, "LINE": -1999}]
    status, _ = answer(service.post_sale(request(body=legacy_sale(lines=lines))))
    assert status == 200 and len(outbox.unsent(10)) == 1


@pytest.mark.parametrize("qty", [2_147_483_648, -2_147_483_648, 100_001])
def test_a_quantity_beyond_the_bounds_is_400_naming_the_field(service, outbox, qty):
    sale = legacy_sale(lines=[{"SKU": "100001", "QTY": qty, "PRICE": 1, "LINE": qty}])
    status, body = answer(service.post_sale(request(body=sale)))
    assert status == 400 and body["MESSAGE"].startswith("LINES[1].QTY:"), body
    lines = [{"line_no": 1, "sku": "100001", "quantity": qty, "unit_price_minor": 1, "line_total_minor": qty}]
    status, body = post_event(service, cloudevent_sale(lines=lines, total_minor=qty,
                                                       tenders=[{"kind": "card", "amount_minor": qty}]))
    assert status == 400 and "data.lines.0.quantity" in body["MESSAGE"], body
    assert outbox.unsent(10) == []


def test_an_amount_beyond_the_limit_is_400_naming_the_field(service, outbox):
    sale = legacy_sale(lines=[{"SKU": "100001", "QTY": 1, "PRICE": 100_000_001, "LINE": 100_000_001}])
    status, body = answer(service.post_sale(request(body=sale)))
    assert status == 400 and body["MESSAGE"].startswith("LINES[1].PRICE:") and "100000000" in body["MESSAGE"]
    assert outbox.unsent(10) == []


def test_ops_set_the_limits(service, store, outbox):
    store.config = AgentSettings(auth_required=False, limits=Limits(max_quantity=500_000))
    sale = legacy_sale(lines=[{"SKU": "100001", "QTY": 250_000, "PRICE": 2, "LINE": 500_000}])
    status, _ = answer(service.post_sale(request(body=sale)))
    assert status == 200 and len(outbox.unsent(10)) == 1


def test_a_cloudevent_whose_id_is_a_uuid_is_400_saying_a_ulid_is_needed(service, outbox):
    status, body = post_event(service, {**cloudevent_sale(), "id": "123e4567-e89b-12d3-a456-426614174000"})
    assert status == 400 and "id: " in body["MESSAGE"] and "must be a ULID" in body["MESSAGE"]
    assert "a UUID is not taken" in body["MESSAGE"] and outbox.unsent(10) == []
