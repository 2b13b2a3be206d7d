"""The three ways a POS call can travel, per route: `legacy`, `shadow`, `bus`.

The agent decides the mode once per request from the table it read at the
start of that request, then hands over here. `legacy` forwards the bytes to
the legacy ERP and returns its answer verbatim; `shadow` does the same and
queues a dry-run comparison on the bus side that never delays the till;
`bus` is the outbox path the agent already has (passed in as `to_outbox`).
"""
from __future__ import annotations

import http.client
import json
import logging
import socket
from typing import Callable

from werkzeug.wrappers import Response

from legacy_wrappers.legacy_http import LegacyUnavailable
from routing.route_state import RouteStats
from routing.route_table import Route, RouteTable
from routing.shadow import ShadowComparer

log = logging.getLogger(__name__)


def _json(status: int, body: dict) -> Response:
    return Response(json.dumps(body), status=status, mimetype="application/json")


def maybe_written(exc: BaseException) -> bool:
    """True when a failed legacy call may still have booked the sale (it timed out
    or the connection broke after sending). Queueing such a call could book it
    twice, so it is answered as an error and the till retries as it does today."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (socket.timeout, TimeoutError, ConnectionResetError, BrokenPipeError)):
            return True
        if isinstance(exc, http.client.HTTPException):  # a garbled or cut answer: the call went out
            return True
        if type(exc).__name__ == "RemoteDisconnected":
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _outcome(status: int) -> str:
    return "ok" if status < 400 else "rejected" if status < 500 else "error"


class Call:
    """One POS call as the mode logic needs it."""

    def __init__(self, route: Route | None, name: str, mode: str, method: str, path: str,
                 body: bytes | None, query: str = ""):
        self.route, self.name, self.mode = route, name, mode
        self.method, self.path, self.body, self.query = method, path, body, query

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
    try:
        answer = client.request(call.method, target, call.body)
    except LegacyUnavailable as exc:
        queue = call.route is not None and call.route.on_legacy_failure == "queue" and to_outbox is not None
        if queue and not maybe_written(exc):
            log.warning("legacy ERP unavailable (%s); %s accepted into the outbox", exc, call.name,
                        extra={"id": call.name, "correlationid": None})
            response = to_outbox()
            stats.count(call.name, "legacy", "queued" if response.status_code < 400 else "error")
            return response, None
        stats.count(call.name, "legacy", "error")
        status = 504 if maybe_written(exc) else 503
        return _json(status, {"STATUS": "ERROR", "MESSAGE": f"ERP unavailable: {exc}"}), None
    stats.count(call.name, "legacy", _outcome(answer.status))
    response = Response(answer.body, status=answer.status, content_type=answer.content_type)
    return response, (answer.body if answer.status < 400 else None)


def post(client, shadow: ShadowComparer, call: Call, stats: RouteStats, message_type: str, parse,
         to_outbox: Callable[[], Response]) -> Response:
    """A sale or return in any mode."""
    if call.mode == "bus":
        response = to_outbox()
        stats.count(call.name, "bus", _outcome(response.status_code))
        return response
    response, legacy_body = forward(client, call, stats, to_outbox)
    if call.mode == "shadow" and legacy_body is not None:
        shadow.submit_posting(stats, call.name, message_type, parse, call.body, legacy_body)
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
