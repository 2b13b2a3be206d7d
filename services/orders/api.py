"""`orders_api`: the experience API ecommerce places click-and-collect orders through.

    POST /v1/orders                 an order -> 202 accepted, once durably recorded
    GET  /v1/orders/{id}            its status as the customer sees it
    POST /v1/orders/{id}/cancel     the customer cancels -> 202 (the store confirms it)

Clients sign every call like the tills sign theirs (routing/edge_auth.py: an HMAC of
timestamp, nonce, method, path and body with the client's key, `retailbus orders keys
add --client ID`); a byte-identical retry of a signed write gets the first answer
(routing/answers.py). An order is the client's: its id is the client's own (a retry
with the same id and body is the same order; another body is refused 409), and only
the client that placed it reads or cancels it. Everything after the answer is
asynchronous: the order process (services/orders/process.py) holds the points,
reserves the stock, commits, sends the store its task; this service keeps the status
(services/orders/book.py) from what the estate announces, and closes the order when
the process says so (`order.close.v1`), announcing `order.collected.v1` or
`order.cancelled.v1`.
"""
from __future__ import annotations

import json
import logging
from datetime import datetime, timezone

from nameko.extensions import DependencyProvider
from nameko.timer import timer
from nameko.web.handlers import http
from prometheus_client import Counter, Gauge, Histogram
from werkzeug.wrappers import Response

from bus import journal
from bus.consumer import DUPLICATE, reliable_handler
from bus.metrics_http import MetricsHttp
from bus.retention import retention_timer
from bus.process import command_handler
from bus.settings import retailbus_settings
from contracts.envelope import CloudEvent
from contracts.fulfilment import FulfilmentPickedV1
from contracts.inventory import InventoryReservedV1
from contracts.order_process import OrderCloseV1
from contracts.orders import OrderCancelledV1, OrderCancelRequestedV1, OrderCollectedV1
from legacy_wrappers import inbox
from legacy_wrappers.legacy_db import LegacyDatabase
from routing.answers import AnswerCache
from routing.edge_auth import AuthError, TerminalKeys, Verifier
from services.erp.outbox import Outbox, insert as outbox_insert, metadata as outbox_tables
from services.erp.retention import LegacyRetention
from services.loyalty.config import LoyaltyRules
from legacy_wrappers.prepared import run_together
from services.orders import book, placing
from services.orders import config as orders_config

log = logging.getLogger(__name__)
SOURCE = "retailbus/orders_api"
DB = "ORDERS_API_DB_URI"

ORDERS = Gauge("retailbus_orders", "Click-and-collect orders by state (sampled)", ["state"])
STUCK = Gauge("retailbus_orders_stuck", "Open orders in a state longer than its SLA (config/orders.yaml)", ["state"])
READY_SECONDS = Histogram("retailbus_order_ready_seconds", "From an order accepted to ready for pickup",
                          buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300, 1800, 3600, 4 * 3600))
CLOSED = Counter("retailbus_orders_closed_total", "Orders closed, by outcome and reason (the cancellations: what "
                 "the process gave back)", ["outcome", "reason"])
ACCEPTED = Counter("retailbus_orders_accepted_total", "Orders accepted (a retry of one is not counted)")


def _json(status: int, body: dict) -> Response:
    return Response(json.dumps(body), status=status, mimetype="application/json")


def _error(status: int, message: str) -> Response:
    return _json(status, {"status": "error", "message": message})


class ApiSetup(DependencyProvider):
    """What the API reads at start (a bad config/orders.yaml stops it): the rules, the estate's
    stores, the clients' keys (re-read when the file changes) and the answers to their signed
    writes, shared by the container's workers."""

    def setup(self):
        settings = retailbus_settings(self.container.config)
        self.rules = orders_config.load(settings.path(settings.orders_rules))
        self.stores = {s.id for s in settings.stores}
        window = self.rules.api.signature_window
        self.verifier = Verifier(TerminalKeys(settings.path(self.rules.api.clients_file)), window=window)
        self.answers = AnswerCache(window)

    def get_dependency(self, worker_ctx):
        return self


class OrdersApi:
    name = "orders_api"

    db = LegacyDatabase(config_key=DB, create=(book.metadata, outbox_tables, inbox.metadata))
    outbox = Outbox(config_key=DB)
    loyalty_rules = LoyaltyRules(optional=True)
    api = ApiSetup()
    metrics = MetricsHttp()
    retention = LegacyRetention(config_key=DB)

    def _authenticate(self, request, body: bytes):
        path = request.path + (f"?{request.query_string.decode()}" if request.query_string else "")
        try:
            return self.api.verifier.verify(request.headers, request.method, path, body), None
        except AuthError as exc:
            return None, _error(401, str(exc))

    # ---------------------------------------------------------------- HTTP
    @http("POST", "/v1/orders")
    def place(self, request):
        body = request.get_data(cache=False)
        return self.api.answers.once(request, body, self._authenticate, lambda client: self._place(body, client))

    def _place(self, body: bytes, client: str) -> Response:
        try:
            order, digest = placing.order_from(body, self.loyalty_rules.config.redemption.point_value_minor,
                                               self.api.stores, datetime.now(timezone.utc))
        except placing.OrderRefused as exc:
            return _error(exc.status, str(exc))
        existing = book.get(self.db.conn, order.order_id)
        if existing is not None:
            self.db.end(success=False)
            if existing.CLIENT != client or existing.REQUEST_HASH != digest:
                return _error(409, f"order_id: {order.order_id} was placed already with other content")
            return _json(200, {**book.view(existing), "duplicate": True})
        book.record(self.db.conn, order, client, digest)
        event = CloudEvent.new(order.TYPE, SOURCE, order, subject=order.order_id, idempotencykey=f"{order.TYPE}:"
                               f"{order.order_id}")
        run_together(self.db.conn, [outbox_insert([event])])
        self.db.end(success=True)  # committed before the answer: accepted means durably recorded
        self.outbox.added()
        ACCEPTED.inc()
        journal.record("order_accepted", "ok", id=event.id, correlationid=event.correlationid, subject=order.order_id,
                       detail={"store": order.pickup_store, "client": client, "total_minor": order.total_minor})
        return _json(202, {**book.view(book.get(self.db.conn, order.order_id)), "duplicate": False})

    @http("GET", "/v1/orders/<string:order_id>")
    def status(self, request, order_id):
        client, refused = self._authenticate(request, b"")
        if refused:
            return refused
        found = book.get(self.db.conn, order_id)
        if found is None or found.CLIENT != client:
            return _error(404, f"order_id: no order {order_id} of client {client}")
        return _json(200, book.view(found))

    @http("POST", "/v1/orders/<string:order_id>/cancel")
    def cancel(self, request, order_id):
        body = request.get_data(cache=False)
        return self.api.answers.once(request, body, self._authenticate,
                                       lambda client: self._cancel(order_id, body, client))

    def _cancel(self, order_id: str, body: bytes, client: str) -> Response:
        try:
            reason = placing.cancel_reason(body)
        except placing.OrderRefused as exc:
            return _error(exc.status, str(exc))
        found = book.get(self.db.conn, order_id)
        if found is None or found.CLIENT != client:
            return _error(404, f"order_id: no order {order_id} of client {client}")
        if found.STATUS in ("collected", "cancelled"):
            return _json(409, {**book.view(found), "message": f"the order is {found.STATUS}: it cannot be cancelled"})
        if book.request_cancel(self.db.conn, order_id):
            asked = OrderCancelRequestedV1(order_id=order_id, reason=reason, requested_at=datetime.now(timezone.utc))
            run_together(self.db.conn, [outbox_insert([CloudEvent.new(
                asked.TYPE, SOURCE, asked, subject=order_id, idempotencykey=f"{asked.TYPE}:{order_id}")])])
            self.db.end(success=True)
            self.outbox.added()
            journal.record("order_cancel_requested", "ok", id=order_id, subject=order_id, detail={"client": client})
        return _json(202, book.view(book.get(self.db.conn, order_id)))

    # ---------------------------------------------------------------- what the estate announces
    @reliable_handler("erp", InventoryReservedV1.TYPE)
    def on_reserved(self, reserved: InventoryReservedV1, event: CloudEvent):
        return "reserved" if book.advance(self.db.conn, reserved.order_id, "reserved", reserved.at) else DUPLICATE

    @reliable_handler("store_agent", FulfilmentPickedV1.TYPE)
    def on_picked(self, picked: FulfilmentPickedV1, event: CloudEvent):
        """Ready for pickup. Timed from the acceptance to the moment this service learns it."""
        if not book.advance(self.db.conn, picked.order_id, "ready_for_pickup", datetime.now(timezone.utc)):
            return DUPLICATE
        accepted = datetime.fromisoformat(book.get(self.db.conn, picked.order_id).ACCEPTED_AT)
        READY_SECONDS.observe(max(0.0, (datetime.now(timezone.utc) - accepted).total_seconds()))
        return "ready_for_pickup"

    @command_handler(OrderCloseV1.TYPE)
    def on_close(self, close: OrderCloseV1, event: CloudEvent):
        """The process closes the order: recorded, then announced (the reply) to whoever listens."""
        if book.close(self.db.conn, close.order_id, close.outcome, close.at, close.reason, close.detail,
                      close.revenue_doc_no, close.points_earned):
            CLOSED.labels(close.outcome, close.reason or "-").inc()
            journal.record(f"order_{close.outcome}", "ok", id=event.id, correlationid=event.correlationid,
                           subject=close.order_id, detail={"reason": close.reason, "store": close.store_id})
        row = book.get(self.db.conn, close.order_id)
        if row.STATUS == "collected":
            return OrderCollectedV1(order_id=close.order_id, store_id=close.store_id,
                                    collected_at=datetime.fromisoformat(row.CLOSED_AT),
                                    revenue_doc_no=row.REVENUE_DOC_NO, points_redeemed=row.POINTS,
                                    points_earned=row.POINTS_EARNED or 0)
        return OrderCancelledV1(order_id=close.order_id, store_id=close.store_id, reason=row.REASON,
                                detail=row.DETAIL, cancelled_at=datetime.fromisoformat(row.CLOSED_AT))

    @timer(interval=15)
    def sample(self):
        """Orders by state and the stuck ones (past their state's SLA), for the dashboard and alerts."""
        counts = book.counts(self.db.conn)
        for state in book.STATES:
            ORDERS.labels(state).set(counts.get(state, 0))
        for state, n in book.stuck(self.db.conn, self.api.rules.sla.model_dump(), datetime.now(timezone.utc)).items():
            STUCK.labels(state).set(n)

    @retention_timer()
    def prune(self) -> dict[str, int]:
        """Inbox keys past the redelivery horizon and outbox rows long sent (RETAILBUS.retention);
        the orders stay: they are what the customer and reconciliation read."""
        return self.retention.prune()
