"""The erp service as real processes on a real broker, writing the legacy database:
duplicates delivered at the same time to two workers post once."""
from __future__ import annotations

import json
from contextlib import ExitStack

import amqp
import pytest
from sqlalchemy import text

from contracts.envelope import CloudEvent
from demo.legacy_erp.schema import create_schema, engine_for, seed_demo_data
from routing.legacy_payload import sale_from_legacy
from bus import topology
from bus.publisher import ConfirmingPublisher, connection_params
from bus.extensions import event_message
from tests.integration.support import legacy_sale, nameko_run, queue_state, stop, wait_for, write_config

pytestmark = pytest.mark.integration

SALES_QUEUE = topology.handler_queue("store_agent", "pos.sale.v1", "erp", "on_pos_sale")


def delete_queue(uri: str, queue: str) -> None:
    conn = amqp.Connection(**connection_params(uri, 5))
    conn.connect()
    try:
        conn.channel().queue_delete(queue)
    finally:
        conn.collect()


@pytest.fixture
def legacy_db(legacy_dsn):
    dsn = legacy_dsn  # SQLite and PostgreSQL
    engine = engine_for(dsn)
    create_schema(engine)
    with engine.begin() as conn:
        seed_demo_data(conn)
    yield dsn, engine
    engine.dispose()


def sale_event(txn_id: str) -> CloudEvent:
    sale = sale_from_legacy(legacy_sale(txn_id))
    return CloudEvent.new("pos.sale.v1", "store/S001/pos/07", sale, subject=txn_id,
                          idempotencykey=f"pos.sale.v1:S001:{txn_id}")


@pytest.mark.timeout(180)
def test_duplicates_racing_on_two_erp_workers_post_once(amqp_uri, legacy_db, tmp_path, request):
    dsn, engine = legacy_db
    # Sales are handled in store order by one active consumer; to race two
    # workers on one duplicate (the inbox's job) ordering is switched off here.
    config = write_config(tmp_path, amqp_uri, legacy_db=dsn, per_message_logs=True,
                          handlers={"erp.on_pos_sale": {"ordered": False}})
    delete_queue(amqp_uri, SALES_QUEUE)
    request.addfinalizer(lambda: delete_queue(amqp_uri, SALES_QUEUE))
    logs = [tmp_path / "erp-1.log", tmp_path / "erp-2.log"]
    with ExitStack() as stack:
        for log in logs:
            process = nameko_run(config, "services.erp", log)
            stack.callback(stop, process)
        assert wait_for(lambda: queue_state(amqp_uri, SALES_QUEUE)[1] == 2, timeout=60), \
            "two erp consumers expected"

        events = [sale_event(f"DUP-{i:04d}") for i in range(300)]
        publisher = ConfirmingPublisher(amqp_uri)
        exchange = topology.events_exchange("store_agent")
        # every sale twice, back to back: the copies land on both workers at once
        doubled = [event_message(e, exchange) for e in events for _ in (1, 2)]
        assert publisher.publish_many(doubled) == [None] * 600
        publisher.close()

        def all_in():
            with engine.connect() as conn:
                return conn.execute(text('SELECT count(*) FROM "RB_INBOX"')).scalar() == 300
        assert wait_for(all_in, timeout=60)
        assert wait_for(lambda: queue_state(amqp_uri, SALES_QUEUE)[0] == 0, timeout=30)

    with engine.connect() as conn:
        headers = conn.execute(text(
            'SELECT "POS_TXN_ID", count(*) FROM "SLS_HDR" GROUP BY "POS_TXN_ID"')).all()
        stock = conn.execute(text(
            'SELECT "ON_HAND" FROM "STK_LVL" WHERE "STORE_NO"=\'S001\' AND "SKU"=\'100001\'')).scalar()
        posted_events = conn.execute(text(
            'SELECT "TYPE", count(*) FROM "RB_OUTBOX" GROUP BY "TYPE"')).all()
    assert len(headers) == 300 and all(n == 1 for _, n in headers)
    assert posted_events == [("erp.sale_posted.v1", 300)]  # one event per posting, none per duplicate
    assert stock == 1000 - 300 * 2  # each sale moved stock exactly once

    outcomes = []
    for log in logs:
        lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
        outcomes.append([line.get("outcome") for line in lines if line.get("message") == "handled pos.sale.v1"])
    assert all(o for o in outcomes), "both workers must have handled sales"
    assert sum(o.count("duplicate") for o in outcomes) == 300
    assert sum(o.count("ok") for o in outcomes) == 300
