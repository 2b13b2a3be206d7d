"""The only binding of a subscriber to `erp.events` is removed while sales post, then
put back: every `erp.sale_posted.v1` the erp's outbox wrote reaches the subscriber,
none is marked sent while no queue took it (issue 17, finding 6).

The erp runs as a real process on the session broker with a SQLite legacy
database; the subscriber is a plain durable queue of this test.
"""
from __future__ import annotations

import json

import amqp
import pytest
from sqlalchemy import text

from demo.legacy_erp.schema import create_schema, engine_for, seed_demo_data
from bus import topology
from bus.extensions import event_message
from bus.publisher import ConfirmingPublisher, connection_params
from tests.integration.support import nameko_run, queue_state, stop, wait_for, write_config
from tests.integration.test_erp_posting import SALES_QUEUE, delete_queue, sale_event

pytestmark = pytest.mark.chaos

POSTED = "erp.sale_posted.v1"
WATCH = "t.binding-removed.sale-posted"
PER_STEP = 60


class Admin:
    """One admin channel for the test's own queue and binding."""

    def __init__(self, uri: str):
        self.conn = amqp.Connection(**connection_params(uri, 5))
        self.conn.connect()
        self.channel = self.conn.channel()

    def bind(self):
        self.channel.queue_bind(WATCH, "erp.events", POSTED)

    def unbind(self):
        self.channel.queue_unbind(WATCH, "erp.events", POSTED)

    def drain(self) -> list[amqp.Message]:
        out = []
        while (message := self.channel.basic_get(WATCH, no_ack=True)) is not None:
            out.append(message)
        return out

    def close(self):
        self.conn.collect()


def others_bound_to_posted(broker) -> list[tuple[str, str]]:
    """(queue, key) of every binding on erp.events that would route a posted sale."""
    rows = json.loads(broker.rabbitmqctl("-q", "list_bindings", "-p", broker.vhost, "source_name",
                                         "destination_name", "routing_key", "--formatter", "json") or "[]")
    return [(r["destination_name"], r["routing_key"]) for r in rows
            if r["source_name"] == "erp.events" and r["destination_name"] != WATCH
            and r["routing_key"] in (POSTED, "erp.#", "#", "erp.*", "*.sale_posted.v1")]


@pytest.mark.timeout(300)
def test_a_binding_removed_mid_stream_loses_no_posted_event(broker, amqp_uri, tmp_path, request):
    dsn = f"sqlite:///{tmp_path / 'legacy_erp.db'}"
    engine = engine_for(dsn)
    create_schema(engine)
    with engine.begin() as conn:
        seed_demo_data(conn)
    request.addfinalizer(engine.dispose)
    delete_queue(amqp_uri, SALES_QUEUE)
    request.addfinalizer(lambda: delete_queue(amqp_uri, SALES_QUEUE))
    admin = Admin(amqp_uri)
    request.addfinalizer(admin.close)
    topology.declare_exchange(admin.channel, "erp.events")
    admin.channel.queue_delete(WATCH)
    topology.declare_queue(admin.channel, WATCH)
    request.addfinalizer(lambda: delete_queue(amqp_uri, WATCH))
    for queue, key in others_bound_to_posted(broker):  # left by earlier tests' files services
        admin.channel.queue_unbind(queue, "erp.events", key)
    admin.bind()

    log = tmp_path / "erp.log"
    erp = nameko_run(write_config(tmp_path, amqp_uri, legacy_db=dsn), "services.erp", log)
    request.addfinalizer(lambda: stop(erp))
    assert wait_for(lambda: queue_state(amqp_uri, SALES_QUEUE)[1] == 1, timeout=90), log.read_text()[-3000:]
    publisher = ConfirmingPublisher(amqp_uri)
    request.addfinalizer(publisher.close)
    received: dict[str, amqp.Message] = {}

    def send(step: int):
        events = [sale_event(f"BR-{step}-{i:04d}") for i in range(PER_STEP)]
        assert publisher.publish_many([event_message(e, "store_agent.events") for e in events]) == [None] * PER_STEP

    def outbox() -> tuple[int, int]:
        with engine.connect() as conn:
            return tuple(conn.execute(text(
                'SELECT count(*), count("SENT_TS") FROM "RB_OUTBOX"')).one())

    def posted() -> int:
        with engine.connect() as conn:
            return conn.execute(text('SELECT count(*) FROM "SLS_HDR" WHERE "POS_TXN_ID" LIKE \'BR-%\'')).scalar()

    def drained(n: int):
        received.update((m.properties["message_id"], m) for m in admin.drain())
        return len(received) >= n

    send(1)  # bound: flows
    assert wait_for(lambda: drained(PER_STEP), timeout=90), (outbox(), log.read_text()[-3000:])

    admin.unbind()  # the subscriber's only binding goes, mid-stream
    send(2)
    assert wait_for(lambda: posted() == 2 * PER_STEP, timeout=90), log.read_text()[-3000:]
    # every event of step 2 was offered to the broker and refused (or, before the fix, marked sent)
    assert wait_for(lambda: "not routed to any queue" in log.read_text() or outbox()[1] == outbox()[0],
                    timeout=90), log.read_text()[-3000:]
    total, sent = outbox()
    assert total == 2 * PER_STEP
    assert sent == PER_STEP, f"{sent - PER_STEP} events marked sent while no queue was bound to take them"

    admin.bind()  # back: the relay's next retry delivers what waited
    send(3)
    assert wait_for(lambda: drained(3 * PER_STEP), timeout=120), (outbox(), log.read_text()[-3000:])
    assert wait_for(lambda: outbox() == (3 * PER_STEP, 3 * PER_STEP), timeout=60), outbox()

    with engine.connect() as conn:
        written = set(conn.execute(text('SELECT "EVENT_ID" FROM "RB_OUTBOX"')).scalars())
    assert set(received) == written, f"{len(written - set(received))} posted events never reached the subscriber"
    subjects = {json.loads(m.body)["data"]["pos_txn_id"] for m in received.values()}
    assert subjects == {f"BR-{step}-{i:04d}" for step in (1, 2, 3) for i in range(PER_STEP)}
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    assert any("not routed to any queue" in line.get("message", "") and line.get("level") in ("ERROR", "error")
               for line in lines), "the unroutable events must be alerted in the log"
