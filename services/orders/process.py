"""The `orders` process service: click and collect on the process engine.

Thin: `order.placed.v1` (from the experience API, services/orders/api.py) starts one
instance per order (services/orders/definition.py); the replies of the systems doing
its steps advance it. A customer's cancellation (`order.cancel_requested.v1`) is noted
in ORDER_CANCEL, which the steps up to the handover read, and is sent to the pickup
store (`fulfilment.task_cancelled.v1` on the store's own queue), which withdraws the
task unless it handed the order over already: the store's answer is what the process
waits for. Both are written in one transaction of the process database (its outbox
sends the store's command), so neither is lost nor sent twice. A cancellation's row
goes once its order's instance is gone (`prune`).
"""
from __future__ import annotations

import json
from datetime import datetime, timezone

from nameko.dependency_providers import Config
from nameko.extensions import DependencyProvider
from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite

from bus import topology
from bus.consumer import DUPLICATE, reliable_handler
from bus.metrics_http import MetricsHttp
from bus.process import ProcessManager, process_messages
from bus.process import store
from bus.retention import in_batches, retention_timer
from bus.settings import retailbus_settings
from contracts.envelope import CloudEvent
from contracts.fulfilment import FulfilmentTaskCancelledV1
from contracts.orders import OrderCancelRequestedV1, OrderPlacedV1
from services.orders import config, definition
from services.orders.definition import CANCELS, CLICK_COLLECT, OTHER_REPLIES

BATCH = 64


class OrdersRules(DependencyProvider):
    """config/orders.yaml (RETAILBUS.orders_rules), read at start: a bad file stops the service."""

    def setup(self):
        settings = retailbus_settings(self.container.config)
        definition.RULES.config = self.config = config.load(settings.path(settings.orders_rules))

    def get_dependency(self, worker_ctx):
        return self.config


def _with_other_replies(fn):
    """Bind the replies a step may get besides its own `reply` type (a business "no")."""
    for source, model in OTHER_REPLIES:
        fn = reliable_handler(source, model.TYPE, batch=BATCH)(fn)
    return fn


class OrdersService:
    name = "orders"

    orders = ProcessManager(CLICK_COLLECT, config_key="ORDERS_DB_URI", tables=(definition.metadata,))
    rules = OrdersRules()
    metrics = MetricsHttp()
    config = Config()

    @reliable_handler("orders_api", OrderPlacedV1.TYPE, batch=BATCH)
    def on_order_placed(self, items: list):
        return self.orders.start_many(items)

    @process_messages(CLICK_COLLECT, batch=BATCH)
    @_with_other_replies
    def on_process_message(self, items: list):
        return self.orders.handle_many(items)

    @retention_timer()
    def prune(self) -> int:
        """Customers' cancellations whose order's instance is gone (completed, then pruned after
        `process_days`), counted as `order_cancels`: only the steps of a live instance read one."""
        r = retailbus_settings(self.config).retention

        def remove(n: int) -> int:
            with self.orders.transaction() as conn:
                return definition.prune_cancels(conn, n)
        return in_batches("order_cancels", remove, r.batch, r.max_batches)

    @reliable_handler("orders_api", OrderCancelRequestedV1.TYPE)
    def on_cancel_requested(self, request: OrderCancelRequestedV1, event: CloudEvent):
        """Note the cancellation and ask the store; an order not started yet is retried (the
        placed and the cancellation travel on two queues)."""
        with self.orders.transaction() as conn:
            if not store.claim(conn, "orders.on_cancel_requested", event.idempotencykey, event.id):
                return DUPLICATE
            c = store.INSTANCES.c
            found = conn.execute(select(c.PROCESS_ID, c.STATE, c.DATA).where(
                c.PROCESS == CLICK_COLLECT.name, c.CORR_KEY == request.order_id)).first()
            if found is None:
                raise LookupError(f"order {request.order_id} has no process yet; retried")
            insert = (postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert)(CANCELS)
            conn.execute(insert.values(ORDER_ID=request.order_id, REASON=request.reason,
                                       REQUESTED_AT=request.requested_at.isoformat()).on_conflict_do_nothing())
            if found.STATE in ("completed", "failed"):
                return "closed already"
            store_id = json.loads(found.DATA)["order"]["pickup_store"]
            cancel = FulfilmentTaskCancelledV1(order_id=request.order_id, store_id=store_id,
                                               cancelled_at=datetime.now(timezone.utc))
            command = CloudEvent.new(cancel.TYPE, f"retailbus/{self.name}", cancel, subject=request.order_id,
                                     correlationid=found.PROCESS_ID,
                                     idempotencykey=f"{CLICK_COLLECT.name}:{found.PROCESS_ID}:cancel")
            store.queue_message(conn, command.id, topology.commands_exchange("store_agent"),
                                f"{cancel.TYPE}.{store_id}", found.PROCESS_ID, command.to_json())
        self.orders.database.wake()
        return "sent to the store"
