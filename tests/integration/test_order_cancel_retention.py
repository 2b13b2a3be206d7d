"""Retention of customers' cancellations (ORDER_CANCEL, services/orders/definition.py) on SQLite
and PostgreSQL: a row goes with its order's process instance (a completed one is pruned after
`process_days`), in batches, counted as `order_cancels`; while the instance is there (running,
completed, or failed and waiting for `cases retry`, whose steps read the row) it stays."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

import pytest
from nameko.testing.services import worker_factory
from prometheus_client import REGISTRY
from sqlalchemy import insert, select, update

from bus.process import store
from services.orders import definition
from services.orders.process import OrdersService
from tests.integration.test_process_store import process_db  # noqa: F401  (the fixture: SQLite, PostgreSQL)

pytestmark = pytest.mark.integration

NOW = datetime.now(timezone.utc)
SETTINGS = {"RETAILBUS": {"retention": {"batch": 2, "max_batches": 2}}}


def pruned(what: str) -> float:
    return REGISTRY.get_sample_value("retailbus_pruned_total", {"what": what}) or 0.0


def order(engine, order_id: str, state: str | None, days_old: float = 400, process: str = definition.NAME) -> None:
    """A cancellation of `order_id`, and its order's instance in `state` (None: none any more)."""
    with store.transaction(engine) as conn:
        if state is not None:
            inst = store.Instance(f"P-{order_id}", process, order_id, state, 0, 0, 0, {}, [], None, "t", "")
            assert store.insert_new(conn, inst)
            conn.execute(update(store.INSTANCES).where(store.INSTANCES.c.PROCESS_ID == inst.process_id)
                         .values(UPDATED_AT=(NOW - timedelta(days=days_old)).isoformat()))
        conn.execute(insert(definition.CANCELS).values(ORDER_ID=order_id, REASON="changed my mind",
                                                       REQUESTED_AT=(NOW - timedelta(days=days_old)).isoformat()))


def left(engine) -> set[str]:
    with engine.connect() as conn:
        return set(conn.execute(select(definition.CANCELS.c.ORDER_ID)).scalars())


def the_services_pass(engine) -> int:
    service = worker_factory(OrdersService, config=SETTINGS,
                             orders=SimpleNamespace(transaction=lambda: store.transaction(engine)))
    return service.prune()


def test_a_cancellation_goes_with_its_orders_instance_and_stays_while_it_is_there(process_db):
    _, engine = process_db
    definition.metadata.create_all(engine)
    for state in ("running", "compensating", "failed", "completed"):
        order(engine, f"W-{state}", state)
    order(engine, "W-other-process", "running", process="return_to_refund")  # keeps nothing: not an order's
    for n in range(5):
        order(engine, f"W-gone-{n}", None)
    before = pruned("order_cancels")
    assert the_services_pass(engine) == 4  # two batches of two: the rest waits
    assert pruned("order_cancels") == before + 4
    assert the_services_pass(engine) == 2
    assert the_services_pass(engine) == 0
    assert left(engine) == {"W-running", "W-compensating", "W-failed", "W-completed"}
    # the completed order's instance pruned after process_days: its cancellation follows
    assert store.prune_completed(engine, NOW - timedelta(days=30), 10) == 1
    assert the_services_pass(engine) == 1
    assert left(engine) == {"W-running", "W-compensating", "W-failed"}
