"""What the orders API takes (services/orders/placing.py) and config/orders.yaml
(services/orders/config.py): refusals name the field, totals are the API's own."""
from __future__ import annotations

import json
from datetime import datetime, timezone

import pytest

from bus.settings import ConfigError
from services.orders import config
from services.orders.placing import OrderRefused, cancel_reason, order_from

pytestmark = pytest.mark.unit

NOW = datetime(2026, 12, 7, 10, 0, tzinfo=timezone.utc)
STORES = {"S001", "S002"}


def body(**changes) -> bytes:
    order = {"order_id": "W-1", "customer_id": "C00001", "loyalty_card": "LC1", "pickup_store": "S001",
             "currency": "EUR", "points": 200, "paid_minor": 3798, "payment_reference": "PSP-1",
             "lines": [{"line_no": 1, "sku": "100001", "quantity": 2, "unit_price_minor": 1999}]}
    order.update(changes)
    return json.dumps(order).encode()


def refused(data: bytes, value: int = 1) -> tuple[int, str]:
    with pytest.raises(OrderRefused) as info:
        order_from(data, value, STORES, NOW)
    return info.value.status, str(info.value)


def test_an_order_is_priced_by_the_api_and_a_retry_hashes_the_same():
    order, digest = order_from(body(), 1, STORES, NOW)
    assert (order.total_minor, order.points_minor, order.paid_minor) == (3998, 200, 3798)
    assert order.lines[0].line_total_minor == 3998 and order.placed_at == NOW
    assert order_from(body(), 1, STORES, NOW)[1] == digest != order_from(body(points=100, paid_minor=3898), 1,
                                                                        STORES, NOW)[1]
    assert order_from(body(points=100, paid_minor=3798), 2, STORES, NOW)[0].points_minor == 200  # 2 cents a point


@pytest.mark.parametrize(("data", "status", "names"), [
    (body(paid_minor=3998), 400, "paid_minor"),
    (body(loyalty_card=None), 400, "points"),
    (body(pickup_store="S999"), 422, "pickup_store"),
    (body(points=5000, paid_minor=-1002), 400, "paid_minor"),  # points worth more than the order
    (body(points=3000, paid_minor=0), 400, "paid_minor"),
    (body(colour="red"), 400, "colour"),
    (body(lines=[{"line_no": 1, "sku": "1", "quantity": 1, "unit_price_minor": 1, "discount": 1}]), 400, "lines.0"),
    (body(lines=[]), 400, "lines"),
    (b"[1]", 400, "body"),
])
def test_refusals_name_the_field(data, status, names):
    got_status, message = refused(data)
    assert got_status == status and message.startswith(names), message


def test_cancel_takes_an_optional_reason_only():
    assert cancel_reason(b"") is None and cancel_reason(b'{"reason": "late"}') == "late"
    with pytest.raises(OrderRefused):
        cancel_reason(b'{"why": "late"}')


def test_config_is_refused_with_the_field_and_defaults_without_a_file(tmp_path):
    assert config.load(tmp_path / "none.yaml").pickup.collect_days == 3
    bad = tmp_path / "orders.yaml"
    bad.write_text("pickup:\n  collect_days: 9\n")
    with pytest.raises(ConfigError, match="orders.yaml:2: pickup.collect_days"):
        config.load(bad)
    bad.write_text("pickup: {collect_days: 5, reservation_grace_hours: 48}\nloyalty: {wait_seconds: 400}\n")
    with pytest.raises(ConfigError, match="7 days|604800"):
        config.load(bad)  # the hold would outlive what the platform holds
    bad.write_text("pickup: [1\n")
    with pytest.raises(ConfigError, match=r"orders.yaml:2: a \[list\] that is not closed"):
        config.load(bad)
