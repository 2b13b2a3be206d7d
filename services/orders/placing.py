"""What ecommerce sends to `POST /v1/orders`, checked and turned into `order.placed.v1`.

The client states the order as the customer saw it at checkout: lines with their unit
prices, the points to redeem and what its payment provider authorised (`paid_minor`,
under `payment_reference`). The API computes the line totals, the total and the
points' value at the point value of config/loyalty.yaml, and refuses an order whose
payment does not cover the rest: what the ERP books is what the customer paid. Every
refusal names the field, as the contract's errors do.

    {"order_id": "W-1001", "customer_id": "C00001", "loyalty_card": "LC0000000001",
     "pickup_store": "S001", "currency": "EUR", "points": 500, "paid_minor": 3498,
     "payment_reference": "PSP-AUTH-77",
     "lines": [{"line_no": 1, "sku": "100001", "quantity": 2, "unit_price_minor": 1999}]}
"""
from __future__ import annotations

import json
from datetime import datetime

from pydantic import ValidationError

from contracts.errors import error_paths
from contracts.orders import OrderPlacedV1
from contracts.errors import RetailbusError
from services.orders.book import request_hash

FIELDS = {"order_id", "customer_id", "loyalty_card", "pickup_store", "currency", "points", "paid_minor",
          "payment_reference", "lines"}
LINE_FIELDS = {"line_no", "sku", "quantity", "unit_price_minor"}
MAX_BODY = 64 * 1024


class OrderRefused(RetailbusError):
    """An order (or a cancellation) the API refuses: `status` is the HTTP answer."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _json_object(body: bytes) -> dict:
    if len(body) > MAX_BODY:
        raise OrderRefused(413, f"body: larger than {MAX_BODY} bytes")
    try:
        data = json.loads(body or b"null")
    except (ValueError, RecursionError) as exc:
        raise OrderRefused(400, f"body: invalid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise OrderRefused(400, "body: expected a JSON object")
    return data


def order_from(body: bytes, point_value_minor: int, stores: set[str], now: datetime) -> tuple[OrderPlacedV1, str]:
    """(the order, the hash of the request that makes a retry the same order)."""
    data = _json_object(body)
    unknown = sorted(set(data) - FIELDS)
    if unknown:
        raise OrderRefused(400, f"{unknown[0]}: not a field of an order")
    lines = data.get("lines")
    if not isinstance(lines, list) or not lines:
        raise OrderRefused(400, "lines: a non-empty list of {line_no, sku, quantity, unit_price_minor}")
    for n, line in enumerate(lines):
        if not isinstance(line, dict) or set(line) - LINE_FIELDS:
            raise OrderRefused(400, f"lines.{n}: an object of {', '.join(sorted(LINE_FIELDS))} only")
    quantity = lambda x: x.get("quantity") if isinstance(x.get("quantity"), int) else 0  # noqa: E731
    price = lambda x: x.get("unit_price_minor") if isinstance(x.get("unit_price_minor"), int) else 0  # noqa: E731
    priced = [{**line, "line_total_minor": quantity(line) * price(line)} for line in lines]
    points = data.get("points", 0)
    total = sum(line["line_total_minor"] for line in priced)
    points_minor = points * point_value_minor if isinstance(points, int) and not isinstance(points, bool) else 0
    fields = {**data, "lines": priced, "total_minor": total, "points": points, "points_minor": points_minor,
              "placed_at": now}
    try:
        order = OrderPlacedV1.model_validate(fields)
    except ValidationError as exc:
        raise OrderRefused(400, "; ".join(f"{path}: {msg}" for path, msg in error_paths(exc))) from None
    if order.pickup_store not in stores:
        raise OrderRefused(422, f"pickup_store: {order.pickup_store} is not a store of this estate "
                                f"({', '.join(sorted(stores))})")
    return order, request_hash(data)


def cancel_reason(body: bytes) -> str | None:
    """`POST /v1/orders/{id}/cancel` takes an empty body or {"reason": "..."}."""
    if not body.strip():
        return None
    data = _json_object(body)
    if set(data) - {"reason"} or not isinstance(data.get("reason", ""), (str, type(None))):
        raise OrderRefused(400, "body: {\"reason\": \"...\"} (optional) and nothing else")
    return (data.get("reason") or None) and data["reason"][:200]
