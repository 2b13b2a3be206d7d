"""The store agent: what POS systems call instead of the ERP.

Same paths, same payloads as the legacy ERP API; only the base URL changes.
In bus mode a sale is answered as soon as it is committed to the store's
outbox; the forwarder delivers it to the broker later, so the till keeps
selling through any outage of the WAN, the broker or the ERP. POS calls are
signed per terminal (routing/edge_auth.py documents the headers); `/healthz`
and `/metrics` are for ops and open.
"""
from __future__ import annotations

import json
import logging
import os
import time
from datetime import date, datetime, timezone

import eventlet
from nameko.extensions import DependencyProvider
from prometheus_client import CONTENT_TYPE_LATEST, Gauge, Histogram, generate_latest
from werkzeug.wrappers import Response

from contracts.envelope import CloudEvent
from contracts.errors import ContractError
from contracts.ops import RouteTableAppliedV1
from contracts.pos import PosSaleV1, idempotency_key
from legacy_wrappers.legacy_http import LegacyHttp
from routing import legacy_payload, modes
from routing.broker_user import credentials_path, store_uri
from routing.answers import AnswerCache
from routing.edge_auth import AuthError, TerminalKeys, Verifier
from routing.control_totals import ControlTotalsPublisher
from routing.forwarder import OutboxForwarder
from routing.fulfilment import StoreFulfilment
from routing import fulfilment_http  # the module, not its mixin class: `nameko run` takes every class with entrypoints
from routing.control import ROUTES_EXCHANGE, TABLE_APPLIED
from routing.outbox import EventIdReusedError, Outbox, OutboxConflict, OutboxUnavailable
from routing.pos_http import pos_http
from routing.redemption import HoldRefusedError
from routing.route_state import DECISION_SECONDS, END_TO_END_SECONDS, RouteTableHolder
from routing.route_table import mode_of
from routing.shadow import ShadowComparer
from routing.stock_cache import StockCache, StockFeed, ask_erp, stock_answer
from routing.till_loyalty import TillRedemption
from bus import journal
from bus.consumer import reliable_handler
from bus.extensions import container_settings
from bus.logs import MinuteSummary

log = logging.getLogger(__name__)

MAX_BODY = 256 * 1024  # the default of RETAILBUS.agent.max_body

ACCEPT_SECONDS = Histogram(
    "retailbus_agent_accept_seconds", "Time to commit a POS call to the outbox and answer",
    ["route"], buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1))
OUTBOX_DEPTH = Gauge("retailbus_outbox_depth", "Unsent events in the store outbox", ["store"])
OUTBOX_OLDEST = Gauge("retailbus_outbox_oldest_unsent_seconds", "Age of the oldest unsent event", ["store"])
ACCEPTED = MinuteSummary(log, "POS transactions committed to the outbox")


def configured_store(container):
    """(store settings, RETAILBUS settings, broker URI) of the store this process serves."""
    uri, settings = container_settings(container.config)
    store_id = os.environ.get("RETAILBUS_STORE") or container.config.get("STORE_ID")
    store = next((s for s in settings.stores if s.id == store_id), None)
    if store is None:
        known = ", ".join(s.id for s in settings.stores) or "none"
        raise ValueError(f"store {store_id!r} is not in RETAILBUS.stores (known: {known})")
    return store, settings, uri


class StoreOutbox(DependencyProvider):
    """The store's outbox, its forwarder and the terminal verifier."""

    forwarder = OutboxForwarder()
    totals = ControlTotalsPublisher()
    loyalty = TillRedemption()  # the loyalty holds its tills take, in the outbox database
    fulfilment = StoreFulfilment()  # click-and-collect tasks, in the outbox database
    later_delay = 0.5  # seconds; bounds how late a legacy-mode sale shows in the control totals

    def setup(self):
        store, settings, uri = configured_store(self.container)
        self.store_id = store.id
        self._later: list = []
        self.config = settings.agent
        path = settings.outbox_path(store)
        self.outbox = Outbox(path, retention_days=settings.agent.retention_days)
        self.verifier = Verifier(TerminalKeys(path.parent / "terminal_keys.json"),
                                 window=settings.agent.signature_window)
        self.answers = AnswerCache(settings.agent.signature_window)
        self.forwarder.attach(self.outbox, store.id, store_uri(uri, credentials_path(path)), settings.publisher)
        self.forwarder.retention = settings.retention
        self.totals.attach(path, store.id, store_uri(uri, credentials_path(path)), settings.publisher,
                           settings.agent.control_totals_interval, settings.agent.control_totals_days)
        self.loyalty.attach(self.outbox, store.id, uri, settings)
        self.fulfilment.attach(self.outbox, store.id, self.forwarder, settings.agent.retention_days)

    def later(self, fn, *args):
        """Run bookkeeping no POS answer waits for (the legacy-mode control-totals note)
        in one batch `later_delay` from now. Their outbox writes share one commit, so a
        till in legacy mode neither pays for nor competes with an fsync per sale; a
        crash loses at most that batch, which reconciliation shows as unexpected in ERP."""
        if not self._later:
            eventlet.spawn_after(self.later_delay, self._run_later)
        self._later.append((fn, args))

    def _run_later(self):
        batch, self._later = self._later, []
        pile = eventlet.GreenPile(max(len(batch), 1))
        for fn, args in batch:
            pile.spawn(fn, *args)
        list(pile)

    def stop(self):
        try:
            self._run_later()
        finally:
            self.outbox.close()

    kill = stop

    def get_dependency(self, worker_ctx):
        return self


class StoreStock(DependencyProvider):
    """The stock cache, its feed, and the ERP stock RPC with a timeout."""

    def setup(self):
        store, settings, self.uri = configured_store(self.container)
        self.store_id = store.id
        self.timeout = settings.agent.stock_rpc_timeout
        self.cache = StockCache(settings.outbox_path(store).parent / "stock_cache.db")
        self.feed = StockFeed(self.uri, store.id, self.cache, queue_type=settings.queue_type)

    def start(self):
        self.container.spawn_managed_thread(self.feed.run, identifier="stock_feed")

    def stop(self):
        self.feed.stop()
        self.cache.close()

    kill = stop

    def ask_erp(self, sku: str) -> dict | None:
        return ask_erp(self.uri, self.store_id, sku, self.timeout)

    def get_dependency(self, worker_ctx):
        return self


EVENT_TYPES = ("pos.sale.v1", "pos.return.v1")  # what POST /v1/events takes
# The terminal whose key signs ops' reads of what tills must not see (shadow mismatches carry
# loyalty cards and customer ids): longer than any till's id (contracts.pos.TerminalId).
OPS_TERMINAL = "OPSDESK"


def _json(status: int, body: dict) -> Response:
    return Response(json.dumps(body), status=status, mimetype="application/json")


def _error(status: int, message: str) -> Response:
    return _json(status, {"STATUS": "ERROR", "MESSAGE": message})


def _window(request) -> float:
    """`/healthz?window=SECONDS`: the span of `routes_window` (default 60, at most an hour)."""
    try:
        return min(max(float(request.args.get("window", "60")), 0.0), 3600.0)
    except ValueError:
        return 60.0


class StoreAgent(fulfilment_http.FulfilmentCalls):
    name = "store_agent"

    store = StoreOutbox()
    stock = StoreStock()
    routes = RouteTableHolder()
    legacy = LegacyHttp()
    shadow = ShadowComparer()

    @reliable_handler("control", TABLE_APPLIED, exchange=ROUTES_EXCHANGE, exchange_type="fanout",
                      queue="routes.{STORE_ID}")
    def on_route_table(self, applied: RouteTableAppliedV1, event: CloudEvent):
        """A table applied by ops (`retailbus routes apply`): validate, save, swap."""
        self.routes.install(applied.table, f"v{applied.version}")

    def _decide(self, table, message_type: str, route: str, method: str, request, body) -> modes.Call:
        started = time.perf_counter()
        call = modes.Call.decide(table, message_type, self.store.store_id, route, method, request.path, body,
                                 request.query_string.decode())
        DECISION_SECONDS.observe(time.perf_counter() - started)
        return call

    def _authenticate(self, request, body: bytes) -> tuple[str | None, Response | None]:
        """(terminal, None) when the request may proceed, else (None, the 401)."""
        if not self.store.config.auth_required:
            return None, None
        path = request.path + (f"?{request.query_string.decode()}" if request.query_string else "")
        try:
            return self.store.verifier.verify(request.headers, request.method, path, body), None
        except AuthError as exc:
            log.warning("refused %s %s: %s", request.method, request.path, exc,
                        extra={"id": request.headers.get("X-Retailbus-Nonce"), "correlationid": None})
            return None, _error(401, str(exc))

    def _once(self, request, body: bytes, handle) -> Response:
        """`handle(terminal)` for a signed write, answered once per signature: a byte-identical
        retry (a till that lost the answer) gets the first answer, not a 401 for its reused
        nonce (routing/answers.py)."""
        if not self.store.config.auth_required:
            return handle(None)
        return self.store.answers.once(request, body, self._authenticate, handle)

    def _same_store(self, body: bytes, terminal: str | None) -> Response | None:
        """None when a legacy or shadow call may go to the ERP as it is: its STORE is this
        agent's (a terminal's key is its store's) and its TERMINAL the signer's, as on the bus
        path. A body that is not a JSON object goes on: the ERP refuses it itself."""
        try:
            payload = json.loads(body)
        except (ValueError, RecursionError):
            return None
        if not isinstance(payload, dict):
            return None
        store, till = payload.get("STORE"), payload.get("TERMINAL")
        if store != self.store.store_id:
            return _error(400, f"STORE: this agent serves store {self.store.store_id}, not {store}")
        if terminal is not None and till != terminal:
            return _error(403, f"TERMINAL: signed by terminal {terminal}, payload says {till}")
        return None

    def _body(self, request, mimetypes: tuple[str, ...]) -> tuple[bytes, Response | None]:
        """(the body, None) when its size and type are acceptable, else (b"", the refusal)."""
        limit = self.store.config.max_body
        if (request.content_length or 0) > limit:
            return b"", _error(413, f"body larger than {limit} bytes")
        if request.mimetype not in mimetypes:
            return b"", _error(415, f"Content-Type must be {' or '.join(mimetypes)}, got {request.mimetype!r}")
        body = request.get_data(cache=False)
        if len(body) > limit:  # a chunked body has no Content-Length
            return b"", _error(413, f"body larger than {limit} bytes")
        return body, None

    def _accept(self, request, route: str, message_type: str, parse) -> Response:
        """Checks common to every mode, then the mode of the table read once for this request."""
        started = time.monotonic()
        body, refused = self._body(request, ("application/json",))
        if refused:
            return refused
        return self._once(request, body, lambda terminal: self._route(
            request, body, terminal, route, message_type, parse, started))

    def _route(self, request, body: bytes, terminal, route: str, message_type: str, parse, started) -> Response:
        table = self.routes.table  # in flight, a request finishes on the table it started with
        call = self._decide(table, message_type, route, "POST", request, body)
        if call.mode != "bus":
            refused = self._same_store(body, terminal)
            if refused:
                return refused
            modes.trace(call, body, self.store.store_id, terminal)
        queued = []
        response = modes.post(self.legacy(table.legacy.base_url, table.legacy.timeout), self.shadow, call,
                              self.routes.stats, message_type, parse,
                              lambda: queued.append(True) or self._to_outbox(
                                  body, terminal, route, message_type, parse, started))
        if call.mode != "bus" and not queued and response.status_code < 400:
            # After the answer, batched: the till does not wait for this bookkeeping commit.
            # A crash in between shows at reconciliation as "unexpected in ERP", never silently.
            self.store.later(self._note_legacy, message_type, parse, body)
        END_TO_END_SECONDS.labels(call.name, call.mode).observe(time.monotonic() - started)
        return response

    def _note_legacy(self, message_type: str, parse, body: bytes):
        """The legacy ERP took it directly: count it in the store's control totals."""
        try:
            txn = parse(json.loads(body))
            if txn.store_id == self.store.store_id:
                self.store.outbox.record_accepted(message_type, txn.model_dump(mode="json"))
        except (ValueError, ContractError, OutboxUnavailable) as exc:
            log.warning("legacy-posted %s not in the control totals: %s", message_type, exc,
                        extra={"id": None, "correlationid": None})

    def _to_outbox(self, body: bytes, terminal, route: str, message_type: str, parse, started) -> Response:
        try:
            txn = parse(json.loads(body or b"null"), self.store.config.limits)
        except json.JSONDecodeError as exc:
            return _error(400, f"body: invalid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})")
        except UnicodeDecodeError:
            return _error(400, "body: not valid UTF-8")
        except RecursionError:
            return _error(400, "body: JSON nested too deeply")
        except ContractError as exc:
            return _error(400, str(exc))
        event = CloudEvent.new(
            message_type, f"store/{txn.store_id}/pos/{txn.terminal_id}", txn,
            subject=txn.pos_txn_id, idempotencykey=idempotency_key(txn))
        accepted, refused = self._enqueue(event, txn, terminal, route, started)
        if refused:
            return refused
        return _json(200, {"STATUS": "OK", "DOC_NO": "PENDING", "REF": accepted.event_id,
                           "DUPLICATE": accepted.duplicate})

    def _enqueue(self, event: CloudEvent, txn, terminal, route: str, started):
        """(accepted, None) once `event` is committed to the store's outbox, else (None, the refusal)."""
        if txn.store_id != self.store.store_id:
            return None, _error(400, f"STORE: this agent serves store {self.store.store_id}, not {txn.store_id}")
        if terminal is not None and txn.terminal_id != terminal:
            return None, _error(403, f"TERMINAL: signed by terminal {terminal}, payload says {txn.terminal_id}")
        spends = None  # a sale's LOYALTY tenders spend their holds in the commit that accepts it
        if isinstance(txn, PosSaleV1) and any(tender.kind == "loyalty" for tender in txn.tenders):
            spends = self.store.loyalty.spending(txn, events=route == "events")
        try:
            accepted = self.store.outbox.accept(event, spends)
        except HoldRefusedError as exc:
            return None, _error(exc.status, str(exc))
        except OutboxConflict as exc:
            log.warning("conflicting retry: %s", exc, extra={"id": exc.first_event_id, "correlationid": None})
            return None, _error(409, f"TXN_ID: {txn.pos_txn_id} was already accepted with different content "
                                     f"(REF {exc.first_event_id}); a new transaction needs a new TXN_ID")
        except EventIdReusedError as exc:
            log.warning("reused event id: %s", exc, extra={"id": exc.event_id, "correlationid": None})
            return None, _error(409, f"id: {exc.event_id} is already the id of another event; "
                                     "every new event needs a new id")
        except OutboxUnavailable as exc:
            log.error("outbox write failed: %s", exc, extra={"id": event.id, "correlationid": event.correlationid})
            return None, _error(503, "store outbox unavailable; the sale was NOT recorded, retry")
        self.store.forwarder.wake()
        if spends is not None:
            self.store.loyalty.wake()  # an offline hold it spent is to be captured
        ACCEPT_SECONDS.labels(route).observe(time.monotonic() - started)
        journal.record("accepted", "duplicate" if accepted.duplicate else "ok", id=accepted.event_id,
                       correlationid=None if accepted.duplicate else event.correlationid,
                       subject=txn.pos_txn_id, detail={"store": txn.store_id, "terminal": txn.terminal_id})
        outcome = "duplicate" if accepted.duplicate else "accepted"
        log.debug("accepted %s %s", event.type, txn.pos_txn_id, extra={
            "id": accepted.event_id, "correlationid": event.correlationid, "outcome": outcome})
        ACCEPTED.note(f"{event.type} {outcome}")  # one INFO line a minute, not one per sale
        return accepted, None

    @pos_http("POST", "/erp/sales")
    def post_sale(self, request):
        return self._accept(request, "sales", "pos.sale.v1", legacy_payload.sale_from_legacy)

    @pos_http("POST", "/erp/returns")
    def post_return(self, request):
        return self._accept(request, "returns", "pos.return.v1", legacy_payload.return_from_legacy)

    @pos_http("POST", "/v1/events")
    def post_event(self, request):
        """A POS that speaks the bus contract: one CloudEvent (structured JSON) of a sale or
        a return, taken into the outbox whatever the route's mode (there is no legacy payload
        to forward). Its idempotency key must be the one the legacy paths give the same
        transaction, so a sale sent both ways is still posted once."""
        started = time.monotonic()
        body, refused = self._body(request, ("application/cloudevents+json", "application/json"))
        if refused:
            return refused
        return self._once(request, body, lambda terminal: self._event(body, terminal, started))

    def _event(self, body: bytes, terminal, started) -> Response:
        try:
            event = CloudEvent.from_json(body)
            if event.type not in EVENT_TYPES:
                return _error(400, f"type: {event.type!r} is not taken here; this path takes {', '.join(EVENT_TYPES)}")
            txn = event.payload({"limits": self.store.config.limits})
        except ContractError as exc:
            return _error(400, str(exc))
        key = idempotency_key(txn)
        if event.idempotencykey != key:
            return _error(400, f"idempotencykey: {event.idempotencykey!r} should be {key!r} (type:store:pos_txn_id)")
        # The payload as the contract reads it (absent = null, one spelling of each value):
        # a retry, or the same sale sent on the legacy path, is compared by meaning.
        event = event.model_copy(update={"data": txn.model_dump(mode="json")})
        accepted, refused = self._enqueue(event, txn, terminal, "events", started)
        if refused:
            return refused
        return _json(202, {"id": accepted.event_id, "duplicate": accepted.duplicate})

    @pos_http("POST", "/v1/loyalty/authorize")
    def loyalty_authorize(self, request):
        """A till redeems points: a hold before it commits the sale (routing/till_loyalty.py)."""
        return self._loyalty(request, self.store.loyalty.authorize)

    @pos_http("POST", "/v1/loyalty/void")
    def loyalty_void(self, request):
        """The till voided the sale: its hold gives the points back."""
        return self._loyalty(request, self.store.loyalty.void)

    def _loyalty(self, request, handle) -> Response:
        body, refused = self._body(request, ("application/json",))
        if refused:
            return refused
        return self._once(request, body, lambda terminal: _json(*handle(body, terminal)))

    @pos_http("GET", "/erp/stock")
    def get_stock(self, request):
        _, refused = self._authenticate(request, b"")
        if refused:
            return refused
        store, sku = request.args.get("STORE", ""), request.args.get("SKU", "")
        for key, value in (("STORE", store), ("SKU", sku)):
            if not value:
                return _error(400, f"{key}: required")
        if store != self.store.store_id:
            return _error(400, f"STORE: this agent serves store {self.store.store_id}, not {store}")
        started = time.monotonic()
        table = self.routes.table
        call = self._decide(table, "pos.stock_query.v1", "stock", "GET", request, None)
        response = modes.query_stock(self.legacy(table.legacy.base_url, table.legacy.timeout), self.shadow,
                                     call, self.routes.stats, store, sku, lambda: self._stock_from_bus(store, sku))
        END_TO_END_SECONDS.labels(call.name, call.mode).observe(time.monotonic() - started)
        return response

    def _stock_from_bus(self, store: str, sku: str) -> Response:
        try:
            fresh = self.stock.ask_erp(sku)
            if fresh is None:
                return _error(404, f"STORE/SKU: no stock record for {store}/{sku}")
        except Exception as exc:  # timeout, bus down, ERP down: answer from the cache
            log.warning("stock RPC failed (%s: %s); answering from the cache", type(exc).__name__, exc,
                        extra={"id": f"{store}/{sku}", "correlationid": None})
            fresh = None
        status, body = stock_answer(store, sku, fresh, self.stock.cache.get(sku), datetime.now(timezone.utc))
        return _json(status, body)

    def _stats(self) -> dict:
        stats = self.store.outbox.stats()
        OUTBOX_DEPTH.labels(self.store.store_id).set(stats["outbox_depth"])
        OUTBOX_OLDEST.labels(self.store.store_id).set(stats["oldest_unsent_seconds"])
        return stats

    @pos_http("GET", "/healthz")
    def healthz(self, request):
        """`status` is `degraded` (with `problems`) when the agent cannot reach the broker:
        it still takes sales, but nothing leaves the store and no route table arrives."""
        forwarder = self.store.forwarder
        last = forwarder.last_confirm
        table = self.routes.table
        # The forwarder connects on its first publish; an idle agent's live link is its stock feed.
        connected = forwarder.publisher.connected or self.stock.feed.connected
        problems = [] if connected else ["broker not connected"]
        if forwarder.breaker_state == "open":
            problems.append("uplink breaker open")
        return _json(200, {
            "status": "degraded" if problems else "ok", "problems": problems,
            "store": self.store.store_id, **self._stats(),
            "breaker_state": forwarder.breaker_state,
            "broker_connected": connected,
            "stock_feed_connected": self.stock.feed.connected,
            "route_table_version": table.version,
            "route_modes": {r.name: mode_of(r, self.store.store_id) for r in table.routes},
            "routes": self.routes.stats.snapshot(),
            "routes_window": self.routes.stats.window(_window(request)),
            "shadow_parity": {route: p["rate"] for route, p in self.routes.stats.parity_summary().items()},
            "shadow_compared": {route: p["compared"] for route, p in self.routes.stats.parity_summary().items()},
            "shadow_pending": self.shadow.pending.qsize(),
            "last_confirm_time": datetime.fromtimestamp(last, timezone.utc).isoformat() if last else None,
            "auth_required": self.store.config.auth_required,
        })

    @pos_http("GET", "/routes/table")
    def route_table(self, request):
        """The table this agent runs, as text: what the control plane records as the
        start-up version when nothing was applied yet."""
        return _json(200, {"store": self.store.store_id, "version": self.routes.table.version,
                           "table": self.routes.text})

    @pos_http("GET", "/routes/mismatches")
    def mismatches(self, request):
        """Shadow mismatches kept by this agent (`retailbus routes mismatches ROUTE`). Both sides
        of a sale, loyalty card and customer id included: for ops only, signed with the store's
        OPS_TERMINAL key (which the CLI uses) whenever POS calls must be signed."""
        terminal, refused = self._authenticate(request, b"")
        if refused:
            return refused
        if self.store.config.auth_required and terminal != OPS_TERMINAL:
            return _error(403, f"X-Retailbus-Terminal: shadow mismatches are read with the ops key "
                               f"({OPS_TERMINAL}), not terminal {terminal}'s")
        try:
            limit = int(request.args.get("limit", "100"))
        except ValueError:
            return _error(400, "limit: not an integer")
        return _json(200, {"store": self.store.store_id,
                           "mismatches": self.shadow.mismatches.read(request.args.get("route"), limit)})

    @pos_http("GET", "/control/transactions")
    def control_transactions(self, request):
        """The day's accepted sales and returns, listed (`store.control_totals.v1` JSON), up to
        note `as_of`: what reconciliation asks for when a day's digests differ. Signed with the
        store's OPS_TERMINAL key whenever POS calls must be signed, as shadow mismatches are."""
        terminal, refused = self._authenticate(request, b"")
        if refused:
            return refused
        if self.store.config.auth_required and terminal != OPS_TERMINAL:
            return _error(403, f"X-Retailbus-Terminal: the day's transactions are read with the ops key "
                               f"({OPS_TERMINAL}), not terminal {terminal}'s")
        try:
            day = date.fromisoformat(request.args.get("day", "")).isoformat()
        except ValueError:
            return _error(400, "day: required, YYYY-MM-DD")
        try:
            as_of = int(request.args.get("as_of", str(2 ** 62)))
        except ValueError:
            return _error(400, "as_of: not an integer")
        listed = self.store.totals.day_list(day, as_of)
        return Response(listed.model_dump_json(), mimetype="application/json")

    @pos_http("GET", "/metrics")
    def metrics(self, request):
        self._stats()
        return Response(generate_latest(), content_type=CONTENT_TYPE_LATEST)  # as is: it names its charset
