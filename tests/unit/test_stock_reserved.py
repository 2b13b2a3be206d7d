"""The store's stock answers say what click-and-collect orders hold (routing/stock_cache.py): the
ERP's reserved and available levels, or the cache's as the erp's reservation events left them."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

import pytest

from contracts.envelope import CloudEvent
from contracts.erp import ErpStockChangedV1
from contracts.inventory import InventoryReleasedV1, InventoryReservedV1
from routing.stock_cache import StockCache, StockFeed, stock_answer

pytestmark = pytest.mark.unit

AT = datetime(2026, 12, 7, 10, 0, tzinfo=timezone.utc)


def reservation(kind, store, sku, on_hand, reserved, at):
    fields = dict(order_id="W-1", store_id=store, at=at,
                  lines=[{"sku": sku, "quantity": 2, "on_hand": on_hand, "reserved": reserved}])
    data = kind(**fields, expires_at=at + timedelta(days=3)) if kind is InventoryReservedV1 else \
        kind(**fields, reason="cancelled")
    return CloudEvent.new(kind.TYPE, "erp", data, idempotencykey=f"{kind.TYPE}:{at}")


class Channel:
    def __init__(self):
        self.acked = []

    def basic_ack(self, tag):
        self.acked.append(tag)


def deliver(feed, event):
    channel = Channel()
    feed._on_message(channel, SimpleNamespace(body=event.to_json(), delivery_tag=1, properties={}))
    assert channel.acked == [1]


def test_fresh_answer_carries_reserved_and_available():
    fresh = {"store_id": "S001", "sku": "100001", "on_hand": 10, "reserved": 3, "available": 7,
             "as_of": AT.isoformat()}
    status, body = stock_answer("S001", "100001", fresh, None, AT)
    assert status == 200 and (body["ON_HAND"], body["RESERVED"], body["AVAILABLE"], body["STALE"]) == (10, 3, 7, False)


def test_cache_follows_reservation_events_newest_first(tmp_path):
    cache = StockCache(tmp_path / "stock.db")
    feed = StockFeed("amqp://unused", "S001", cache)
    try:
        cache.put(ErpStockChangedV1(store_id="S001", sku="100001", on_hand=10, changed_at=AT))
        deliver(feed, reservation(InventoryReservedV1, "S001", "100001", 10, 2, AT + timedelta(seconds=1)))
        deliver(feed, reservation(InventoryReservedV1, "S002", "100001", 10, 9, AT + timedelta(seconds=2)))  # not ours
        deliver(feed, reservation(InventoryReleasedV1, "S001", "100001", 10, 0, AT + timedelta(seconds=5)))
        deliver(feed, reservation(InventoryReservedV1, "S001", "100001", 10, 4, AT + timedelta(seconds=3)))  # older
        assert cache.get("100001")[2] == 0
        deliver(feed, reservation(InventoryReservedV1, "S001", "100001", 10, 2, AT + timedelta(seconds=6)))
        cache.put(ErpStockChangedV1(store_id="S001", sku="100001", on_hand=8, changed_at=AT + timedelta(seconds=7)))
        status, body = stock_answer("S001", "100001", None, cache.get("100001"), AT + timedelta(seconds=10))
        assert status == 200 and (body["ON_HAND"], body["RESERVED"], body["AVAILABLE"], body["STALE"]) == (8, 2, 6, True)
        # a SKU first seen through a reservation starts at the event's on hand
        deliver(feed, reservation(InventoryReservedV1, "S001", "100002", 5, 2, AT))
        assert cache.get("100002")[0::2] == (5, 2)
    finally:
        cache.close()
