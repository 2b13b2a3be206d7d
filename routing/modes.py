"""The three ways a POS call can travel, per route: `legacy`, `shadow`, `bus`.

The agent decides the mode once per request from the table it read at the
start of that request, then hands over here. `legacy` forwards the bytes to
the legacy ERP and returns its answer verbatim; `shadow` does the same and
queues a dry-run comparison on the bus side that never delays the till;
`bus` is the outbox path the agent already has (passed in as `to_outbox`).

A sale or return taken in legacy or shadow mode is journaled like a bus one
(`retailbus trace TXN_ID`): accepted, legacy_forwarded, legacy_answered, and
in shadow mode shadow_compared, under one id made for the call.
"""
from __future__ import annotations

import json
import logging
import time
from typing import Callable

from ulid import ULID
from werkzeug.wrappers import Response

from bus import journal
from legacy_wrappers.legacy_http import LegacyUnavailable
from routing.route_state import RouteStats
from routing.route_table import Route, RouteTable
from routing.shadow import ShadowComparer

log = logging.getLogger(__name__)


def _json(status: int, body: dict) -> Response:
    return Response(json.dumps(body), status=status, mimetype="application/json")


def maybe_written(exc: BaseException) -> bool:
    """True unless the failed legacy call surely booked nothing (`LegacyUnavailable.not_posted`:
    breaker open, nothing sent, or the ERP answered that it took nothing). A timeout or a
    broken connection after sending, a 500, a 502 or a 504 may come after the ERP booked
    the sale: queueing it could book it twice, so it is answered as an error and the till
    retries as it does today."""
    return not getattr(exc, "not_posted", False)


def _outcome(status: int) -> str:
    return "ok" if status < 400 else "rejected" if status < 500 else "error"


class Call:
    """One POS call as the mode logic needs it."""

    def __init__(self, route: Route | None, name: str, mode: str, method: str, path: str,
                 body: bytes | None, query: str = ""):
        self.route, self.name, self.mode = route, name, mode
        self.method, self.path, self.body, self.query = method, path, body, query
        self.ref: str | None = None       # the journal id of a traced legacy/shadow call
        self.subject: str | None = None   # its POS transaction id

    @classmethod
    def decide(cls, table: RouteTable, message_type: str, store_id: str, default_route: str,
               method: str, path: str, body: bytes | None, query: str = "") -> "Call":
        route = table.route_for(message_type)
        mode = table.decide(message_type, store_id)
        if route is not None:
            method, path = route.method, route.path
        return cls(route, route.name if route else default_route, mode, method, path, body, query)


def forward(client, call: Call, stats: RouteStats, to_outbox: Callable[[], Response] | None) -> \
        tuple[Response, bytes | None]:
    """Legacy (and the legacy half of shadow): (the answer for the till, the legacy body if it succeeded)."""
    target = call.path + (f"?{call.query}" if call.query else "")
    _hop(call, "legacy_forwarded", "ok", {"call": f"{call.method} {call.path}"})
    started = time.monotonic()
    try:
        answer = client.request(call.method, target, call.body)
    except LegacyUnavailable as exc:
        _hop(call, "legacy_answered", "error", {"error": str(exc)[:200]})
        queue = call.route is not None and call.route.on_legacy_failure == "queue" and to_outbox is not None
        if queue and not maybe_written(exc):
            log.warning("legacy ERP unavailable (%s); %s accepted into the outbox", exc, call.name,
                        extra={"id": call.name, "correlationid": None})
            response = to_outbox()
            stats.count(call.name, "legacy", "queued" if response.status_code < 400 else "error")
            return response, None
        stats.count(call.name, "legacy", "error")
        if maybe_written(exc):  # not queued: the till retries the same TXN_ID, as it does today
            return _json(504, {"STATUS": "ERROR", "MESSAGE": f"ERP unavailable: {exc}; the sale may have been "
                                                             f"posted: retry with the same TXN_ID"}), None
        return _json(503, {"STATUS": "ERROR", "MESSAGE": f"ERP unavailable: {exc}"}), None
    stats.count(call.name, "legacy", _outcome(answer.status))
    _hop(call, "legacy_answered", _outcome(answer.status), {
        "status": answer.status, "doc_no": _doc_no(answer.body) if answer.status < 400 else None,
        "seconds": round(time.monotonic() - started, 4)})
    response = Response(answer.body, status=answer.status, content_type=answer.content_type)
    return response, (answer.body if answer.status < 400 else None)


def trace(call: Call, body: bytes, store: str, terminal: str | None) -> None:
    """Give a legacy/shadow call a journal id and note it accepted (the bus path
    journals its own, under the outbox event's id)."""
    try:
        data = json.loads(body)
        txn = data.get("TXN_ID") if isinstance(data, dict) else None
    except ValueError:
        txn = None
    call.subject = str(txn)[:100] if txn is not None else None
    call.ref = str(ULID())
    journal.record("accepted", "ok", id=call.ref, correlationid=call.ref, subject=call.subject,
                   detail={"store": store, "mode": call.mode, "route": call.name,
                           **({"terminal": terminal} if terminal else {})})


def _hop(call: Call, hop: str, outcome: str, detail: dict) -> None:
    if call.ref is not None:
        journal.record(hop, outcome, id=call.ref, correlationid=call.ref, subject=call.subject,
                       detail={k: v for k, v in detail.items() if v is not None})


def _doc_no(body: bytes) -> str | None:
    try:
        answer = json.loads(body)
    except ValueError:
        return None
    return answer.get("DOC_NO") if isinstance(answer, dict) else None


def post(client, shadow: ShadowComparer, call: Call, stats: RouteStats, message_type: str, parse,
         to_outbox: Callable[[], Response]) -> Response:
    """A sale or return in any mode."""
    if call.mode == "bus":
        response = to_outbox()
        stats.count(call.name, "bus", _outcome(response.status_code))
        return response
    response, legacy_body = forward(client, call, stats, to_outbox)
    if call.mode == "shadow" and legacy_body is not None:
        shadow.submit_posting(stats, call.name, message_type, parse, call.body, legacy_body, call.ref)
    return response


def query_stock(client, shadow: ShadowComparer, call: Call, stats: RouteStats, store: str, sku: str,
                bus_answer: Callable[[], Response]) -> Response:
    """`GET /erp/stock` in any mode; bus = the ERP over RPC, else the stale cache."""
    if call.mode == "bus":
        response = bus_answer()
        stats.count(call.name, "bus", _outcome(response.status_code))
        return response
    response, legacy_body = forward(client, call, stats, None)
    if call.mode == "shadow" and legacy_body is not None:
        shadow.submit_stock(stats, call.name, store, sku, legacy_body)
    return response
