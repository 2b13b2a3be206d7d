"""The store agent: what POS systems call instead of the ERP.

Same paths, same payloads as the legacy ERP API; only the base URL changes.
In bus mode a sale is answered as soon as it is committed to the store's
outbox; the forwarder delivers it to the broker later, so the till keeps
selling through any outage of the WAN, the broker or the ERP.
"""
from __future__ import annotations

import json
import logging
import os
import time

from nameko.extensions import DependencyProvider
from nameko.web.handlers import http
from prometheus_client import CONTENT_TYPE_LATEST, Histogram, generate_latest
from werkzeug.wrappers import Response

from contracts.envelope import CloudEvent
from contracts.errors import ContractError
from routing import legacy_payload
from routing.forwarder import OutboxForwarder
from routing.outbox import Outbox, OutboxUnavailable
from services.settings import retailbus_settings

log = logging.getLogger(__name__)

MAX_BODY = 256 * 1024

ACCEPT_SECONDS = Histogram(
    "retailbus_agent_accept_seconds", "Time to commit a POS call to the outbox and answer",
    ["route"], buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1))


class StoreOutbox(DependencyProvider):
    """The store's outbox, opened at setup and handed to the forwarder."""

    forwarder = OutboxForwarder()

    def setup(self):
        settings = retailbus_settings(self.container.config)
        store_id = os.environ.get("RETAILBUS_STORE") or self.container.config.get("STORE_ID")
        store = next((s for s in settings.stores if s.id == store_id), None)
        if store is None:
            known = ", ".join(s.id for s in settings.stores) or "none"
            raise ValueError(f"store {store_id!r} is not in RETAILBUS.stores (known: {known})")
        self.store_id = store.id
        self.outbox = Outbox(settings.outbox_path(store))
        self.forwarder.attach(self.outbox)

    def stop(self):
        self.outbox.close()

    kill = stop

    def get_dependency(self, worker_ctx):
        return self


def _json(status: int, body: dict) -> Response:
    return Response(json.dumps(body), status=status, mimetype="application/json")


def _error(status: int, message: str) -> Response:
    return _json(status, {"STATUS": "ERROR", "MESSAGE": message})


class StoreAgent:
    name = "store_agent"

    store = StoreOutbox()

    def _accept(self, request, route: str, message_type: str, parse) -> Response:
        started = time.monotonic()
        if request.mimetype != "application/json":
            return _error(415, f"Content-Type must be application/json, got {request.mimetype!r}")
        if (request.content_length or 0) > MAX_BODY:
            return _error(413, f"body larger than {MAX_BODY} bytes")
        try:
            payload = json.loads(request.get_data(cache=False) or b"null")
            txn = parse(payload)
        except json.JSONDecodeError as exc:
            return _error(400, f"body: invalid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})")
        except UnicodeDecodeError:
            return _error(400, "body: not valid UTF-8")
        except ContractError as exc:
            return _error(400, str(exc))
        if txn.store_id != self.store.store_id:
            return _error(400, f"STORE: this agent serves store {self.store.store_id}, not {txn.store_id}")
        event = CloudEvent.new(
            message_type, f"store/{txn.store_id}/pos/{txn.terminal_id}", txn,
            subject=txn.pos_txn_id,
            idempotencykey=f"{message_type}:{txn.store_id}:{txn.pos_txn_id}")
        try:
            accepted = self.store.outbox.accept(event)
        except OutboxUnavailable as exc:
            log.error("outbox write failed: %s", exc, extra={"id": event.id, "correlationid": event.correlationid})
            return _error(503, "store outbox unavailable; the sale was NOT recorded, retry")
        self.store.forwarder.wake()
        ACCEPT_SECONDS.labels(route).observe(time.monotonic() - started)
        log.info("accepted %s %s", message_type, txn.pos_txn_id, extra={
            "id": accepted.event_id, "correlationid": event.correlationid,
            "outcome": "duplicate" if accepted.duplicate else "accepted"})
        return _json(200, {"STATUS": "OK", "DOC_NO": "PENDING", "REF": accepted.event_id,
                           "DUPLICATE": accepted.duplicate})

    @http("POST", "/erp/sales")
    def post_sale(self, request):
        return self._accept(request, "sales", "pos.sale.v1", legacy_payload.sale_from_legacy)

    @http("POST", "/erp/returns")
    def post_return(self, request):
        return self._accept(request, "returns", "pos.return.v1", legacy_payload.return_from_legacy)

    @http("GET", "/healthz")
    def healthz(self, request):
        publisher = self.store.forwarder.bus.publisher
        return _json(200, {"status": "ok", "store": self.store.store_id,
                           "broker_connected": publisher.connected, **self.store.outbox.stats()})

    @http("GET", "/metrics")
    def metrics(self, request):
        return Response(generate_latest(), mimetype=CONTENT_TYPE_LATEST)
