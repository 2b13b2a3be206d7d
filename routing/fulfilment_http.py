"""The store agent's click-and-collect calls: tasks in from the order process, associates' calls.

A mixin of `StoreAgent` (routing/store_agent.py), which supplies `_body`, `_once` and
`_authenticate`: associates sign their calls with their terminal's key exactly as tills
do (routing/edge_auth.py), and a signed write retried byte for byte gets its first
answer (routing/answers.py). The task book and its rules are routing/fulfilment.py.

    GET  /v1/fulfilment/tasks[?status=open,picked]   the store's tasks (default: open and picked)
    POST /v1/fulfilment/picked     {"ORDER_ID": "..."}  the order waits at the counter
    POST /v1/fulfilment/collected  {"ORDER_ID": "..."}  the customer took it

Both writes answer once the change and its event are committed to the store's outbox
(the order process hears of it when the link allows); a repeat answers `"DUPLICATE": true`.
A task withdrawn (the customer cancelled, or it was not collected in time) is refused 409.
"""
from __future__ import annotations

import json

from pydantic import TypeAdapter, ValidationError
from werkzeug.wrappers import Response

from bus import journal, topology
from bus.consumer import reliable_handler
from contracts.envelope import CloudEvent
from contracts.orders import OrderId
from contracts.pos import TerminalId
from routing.fulfilment import TaskRefusedError
from routing.outbox import OutboxUnavailable
from routing.pos_http import pos_http

STATUSES = ("open", "picked", "collected", "withdrawn")
_ORDER_ID, _TERMINAL = TypeAdapter(OrderId), TypeAdapter(TerminalId)


def _valid(adapter: TypeAdapter, value) -> bool:
    try:
        adapter.validate_python(value)
        return True
    except ValidationError:
        return False


def _json(status: int, body: dict) -> Response:
    return Response(json.dumps(body), status=status, mimetype="application/json")


def _error(status: int, message: str) -> Response:
    return _json(status, {"STATUS": "ERROR", "MESSAGE": message})


class FulfilmentCalls:
    """Entrypoints of the store agent for click-and-collect (mixed into StoreAgent)."""

    @reliable_handler("orders", "fulfilment.*.v1.{STORE_ID}", exchange=topology.commands_exchange("store_agent"),
                      queue="fulfilment.{STORE_ID}")
    def on_fulfilment(self, command, event: CloudEvent):
        """A task (`fulfilment.task_created.v1`) or a cancellation from the order process, routed
        to this store's own queue (routing key `<type>.<store>`): kept while the store is away."""
        if command.store_id != self.store.store_id:
            raise ValueError(f"store_id: this agent serves {self.store.store_id}, the command names {command.store_id}")
        return self.store.fulfilment.on_command(command, event)

    @pos_http("GET", "/v1/fulfilment/tasks")
    def fulfilment_tasks(self, request):
        _, refused = self._authenticate(request, b"")
        if refused:
            return refused
        wanted = tuple(s for s in request.args.get("status", "open,picked").split(",") if s)
        unknown = [s for s in wanted if s not in STATUSES]
        if unknown or not wanted:
            return _error(400, f"status: expected some of {', '.join(STATUSES)}, got {', '.join(unknown) or 'none'}")
        try:
            tasks = self.store.fulfilment.book.tasks(wanted)
        except Exception as exc:  # sqlite3.Error: the store database is locked or gone
            return _error(503, f"store database unavailable ({type(exc).__name__}); retry")
        return _json(200, {"STATUS": "OK", "STORE": self.store.store_id, "TASKS": [t.answer() for t in tasks]})

    @pos_http("POST", "/v1/fulfilment/picked")
    def fulfilment_picked(self, request):
        return self._task_report(request, "picked")

    @pos_http("POST", "/v1/fulfilment/collected")
    def fulfilment_collected(self, request):
        return self._task_report(request, "collected")

    def _task_report(self, request, what: str) -> Response:
        body, refused = self._body(request, ("application/json",))
        if refused:
            return refused
        return self._once(request, body, lambda terminal: self._report(body, terminal, what))

    def _report(self, body: bytes, terminal: str | None, what: str) -> Response:
        try:
            data = json.loads(body or b"null")
        except (ValueError, RecursionError) as exc:
            return _error(400, f"body: invalid JSON ({exc})")
        order_id = data.get("ORDER_ID") if isinstance(data, dict) else None
        if not _valid(_ORDER_ID, order_id):
            return _error(400, "ORDER_ID: required, an order id")
        extra = sorted(set(data) - {"ORDER_ID", "TERMINAL"})
        if extra:
            return _error(400, f"{extra[0]}: not a field of this call")
        terminal = terminal or data.get("TERMINAL")
        if not _valid(_TERMINAL, terminal):
            return _error(403, f"TERMINAL: {terminal!r} is not a store terminal that may report tasks")
        try:
            task, changed = self.store.fulfilment.report(what, order_id, terminal)
        except TaskRefusedError as exc:
            return _error(exc.status, str(exc))
        except OutboxUnavailable:
            return _error(503, f"store outbox unavailable; the order was NOT marked {what}, retry")
        journal.record(f"task_{what}", "ok" if changed else "duplicate", id=order_id, correlationid=task.correlation_id,
                       subject=order_id, detail={"store": self.store.store_id, "terminal": terminal})
        return _json(200, {"STATUS": "OK", "ORDER_ID": order_id, "TASK": task.answer(), "DUPLICATE": not changed})
