"""Stock look-ups that still answer when the ERP or the bus cannot.

`GET /erp/stock` first asks the ERP (`erp.stock_level` over nameko RPC,
bounded by `agent.stock_rpc_timeout`). When that fails or times out, the
answer comes from the agent's local cache, marked `STALE` with the age of
the data. The cache is fed by the erp's stock change events on the store's
own durable queue (`store_agent-<STORE>.stock_changed`: each agent must see
every change, so agents do not compete on one queue); other stores' rows
are skipped. Events carry the new level, not a delta, and an older change
never overwrites a newer one, so replays and reordering cannot drift.

Both answers say what click-and-collect orders hold: `RESERVED` (units reserved
live at the store) and `AVAILABLE` (on hand minus reserved). The cache learns
the reserved level from the erp's `inventory.reserved.v1` / `inventory.released.v1`
on the same queue (each line carries the store's level after the change). A
reservation that lapses at its expiry announces nothing: the cache counts it
until the order process releases it (no-show), which is the cached answer's
staleness, marked as such.
"""
from __future__ import annotations

import logging
import random
import sqlite3
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import amqp
import eventlet
from nameko.exceptions import RpcTimeout
from nameko.standalone.rpc import ClusterRpcProxy
from pydantic import ValidationError

from contracts.envelope import CloudEvent
from contracts.erp import ErpStockChangedV1, ErpStockChangesV1
from contracts.errors import ContractError
from contracts.inventory import InventoryReleasedV1, InventoryReservedV1
from bus import topology
from bus.publisher import connection_params

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS stock (
    sku        TEXT PRIMARY KEY,
    on_hand    INTEGER,
    changed_at TEXT NOT NULL,
    deleted    INTEGER NOT NULL DEFAULT 0
);
"""
# Columns added after the first release: existing caches are migrated on open.
COLUMNS = {"reserved": "INTEGER NOT NULL DEFAULT 0", "reserved_at": "TEXT"}


# What the stock feed binds (and so what its broker user may read on erp.events).
FEED_TYPES = (ErpStockChangesV1.TYPE, ErpStockChangedV1.TYPE, InventoryReservedV1.TYPE, InventoryReleasedV1.TYPE)
RESERVATIONS = {InventoryReservedV1.TYPE: InventoryReservedV1, InventoryReleasedV1.TYPE: InventoryReleasedV1}


def stock_queue(store_id: str) -> str:
    return f"store_agent-{store_id}.stock_changed"


class StockCache:
    """The last known on-hand level per SKU of one store (a SQLite file)."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(SCHEMA)
        have = {row[1] for row in self._db.execute("PRAGMA table_info(stock)")}
        for column, kind in COLUMNS.items():
            if column not in have:
                self._db.execute(f"ALTER TABLE stock ADD COLUMN {column} {kind}")

    def put(self, change: ErpStockChangedV1) -> bool:
        """Record the change unless a newer one is already there; True if it was applied."""
        at = change.changed_at.astimezone(timezone.utc).isoformat()
        cur = self._db.execute(
            "INSERT INTO stock (sku, on_hand, changed_at, deleted) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (sku) DO UPDATE SET on_hand = excluded.on_hand, "
            "changed_at = excluded.changed_at, deleted = excluded.deleted "
            "WHERE excluded.changed_at >= stock.changed_at",
            (change.sku, change.on_hand, at, int(change.deleted)))
        return cur.rowcount == 1

    def put_reserved(self, sku: str, on_hand: int, reserved: int, at: datetime) -> bool:
        """The store's live reservations of `sku` as of `at`, unless a newer level is there; a SKU
        not cached yet starts at the event's on hand."""
        at_text = at.astimezone(timezone.utc).isoformat()
        cur = self._db.execute(
            "INSERT INTO stock (sku, on_hand, changed_at, reserved, reserved_at) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT (sku) DO UPDATE SET reserved = excluded.reserved, reserved_at = excluded.reserved_at "
            "WHERE stock.reserved_at IS NULL OR excluded.reserved_at >= stock.reserved_at",
            (sku, on_hand, at_text, reserved, at_text))
        return cur.rowcount == 1

    def get(self, sku: str) -> tuple[int, datetime, int] | None:
        """(on hand, as of, reserved) of `sku`, None when it was never seen."""
        row = self._db.execute(
            "SELECT on_hand, changed_at, reserved FROM stock WHERE sku = ? AND deleted = 0", (sku,)).fetchone()
        return (row[0], datetime.fromisoformat(row[1]), row[2]) if row else None

    def close(self):
        self._db.close()


class StockFeed:
    """Consumes `erp.stock_changes.v1` (and single `erp.stock_changed.v1`) into the
    cache; reconnects with backoff."""

    def __init__(self, uri: str, store_id: str, cache: StockCache, queue_type: str = "classic"):
        self.uri = uri
        self.queue_type = queue_type
        self.store_id = store_id
        self.cache = cache
        self.queue = stock_queue(store_id)
        self.exchange = topology.events_exchange("erp")
        self.connected = False
        self._running = False

    def run(self):
        self._running = True
        backoff = 0.5
        while self._running:
            conn = None
            try:
                conn = amqp.Connection(**connection_params(self.uri, 5))
                conn.connect()
                channel = conn.channel()
                channel.basic_qos(0, 100, False)
                topology.declare_exchange(channel, self.exchange)
                topology.declare_queue(channel, self.queue, self.queue_type)
                for message_type in FEED_TYPES:
                    channel.queue_bind(self.queue, self.exchange, message_type)
                channel.basic_consume(self.queue, callback=partial(self._on_message, channel))
                self.connected, backoff = True, 0.5
                while self._running:
                    try:
                        conn.drain_events(timeout=1)
                    except TimeoutError:
                        pass
                    conn.heartbeat_tick()
                self.connected = False
                conn.close()
            except BaseException as exc:
                self.connected = False
                if conn is not None:
                    conn.collect()
                if not isinstance(exc, Exception):
                    # killed (the container kills its managed threads right after stop()):
                    # the socket is dropped above, or the broker would keep this consumer,
                    # and the messages prefetched to it, until the heartbeat times out
                    raise
                if not self._running:
                    return
                log.warning("stock feed disconnected (%s); retrying in %.1fs", exc, backoff)
                eventlet.sleep(backoff * (0.5 + random.random()))
                backoff = min(backoff * 2, 15.0)

    def stop(self):
        self._running = False

    def _on_message(self, channel, message: amqp.Message):
        try:
            event = CloudEvent.from_json(message.body)
            if event.type in RESERVATIONS:
                reservation, changes = RESERVATIONS[event.type].model_validate(event.data), []
            else:
                reservation = None
                changes = ([item.change for item in ErpStockChangesV1.model_validate(event.data).items]
                           if event.type == ErpStockChangesV1.TYPE else [ErpStockChangedV1.model_validate(event.data)])
        except (ContractError, ValidationError) as exc:
            # a cache cannot hold what it cannot read; the ERP stays the truth
            log.error("skipping unreadable stock change: %s", exc,
                      extra={"id": message.properties.get("message_id"), "correlationid": None})
        else:
            for change in changes:
                if change.store_id == self.store_id:
                    self.cache.put(change)
            if reservation is not None and reservation.store_id == self.store_id:
                for line in reservation.lines:
                    self.cache.put_reserved(line.sku, line.on_hand, line.reserved, reservation.at)
        channel.basic_ack(message.delivery_tag)


def ask_erp(uri: str, store_id: str, sku: str, timeout: float) -> dict | None:
    """`erp.stock_level` over RPC; raises an Exception on timeout or when the bus is down.

    The timeout raises nameko's `RpcTimeout`, never eventlet's `Timeout` itself: that
    is a BaseException, so it would escape the caller's `except Exception` (the cache
    answer) and kill the worker with the POS request left unanswered. It fires when
    the erp is down but its durable `rpc-erp` queue is still bound (any broker an erp
    has ever run on): the request is routed there, not refused as UnknownService."""
    with eventlet.Timeout(timeout, RpcTimeout(f"erp.stock_level: no answer within {timeout}s")):
        with ClusterRpcProxy({"AMQP_URI": uri}, timeout=timeout) as rpc:
            return rpc.erp.stock_level(store_id, sku)


def stock_answer(store_id: str, sku: str, fresh: dict | None, cached, now: datetime) -> tuple[int, dict]:
    """The legacy answer: the ERP's when it answered, else the cache's marked stale."""
    if fresh is not None:
        reserved = fresh.get("reserved", 0)
        return 200, {"STORE": store_id, "SKU": sku, "ON_HAND": fresh["on_hand"], "RESERVED": reserved,
                     "AVAILABLE": fresh["on_hand"] - reserved, "STALE": False, "AS_OF": fresh.get("as_of")}
    if cached is None:
        return 503, {"STATUS": "ERROR", "MESSAGE": f"STORE/SKU: the ERP cannot answer and no cached "
                                                   f"stock level exists for {store_id}/{sku}"}
    on_hand, as_of, reserved = cached
    return 200, {"STORE": store_id, "SKU": sku, "ON_HAND": on_hand, "RESERVED": reserved,
                 "AVAILABLE": on_hand - reserved, "STALE": True,
                 "AS_OF": as_of.isoformat(), "AGE_SECONDS": round((now - as_of).total_seconds(), 1)}
