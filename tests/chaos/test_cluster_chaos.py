"""A three-node RabbitMQ cluster loses a node (kill -9, the leader of the sales
queue) while 5,000 sales flow through quorum queues with confirmed publishes:
every confirmed sale reaches the legacy ERP database exactly once.

The sender behaves like a POS behind a store agent: a sale whose publish was not
confirmed is sent again, the same event with the same idempotencykey, until it
is. The cluster is this module's own (a temporary folder on free ports) and its
nodes are stopped by their own pids at the end, whatever happens.
"""
from __future__ import annotations

import time

import amqp
import eventlet
from eventlet.event import Event
import pytest
from sqlalchemy import text

from contracts.envelope import CloudEvent
from demo.legacy_erp.schema import create_schema, engine_for, seed_demo_data
from routing.legacy_payload import sale_from_legacy
from services.broker.cluster import BrokerCluster
from bus import topology
from bus.extensions import event_message
from bus.publisher import ConfirmingPublisher, connect
from tests.integration.support import legacy_sale, nameko_run, stop, wait_for, write_config

pytestmark = pytest.mark.chaos

SALES = 5000
BATCH = 50
KILL_AFTER = 1500  # confirmed sales before a node dies
STORES = [f"S{n:03d}" for n in range(1, 9)]  # ordered per store: eight chains in parallel
SALES_QUEUE = topology.handler_queue("store_agent", "pos.sale.v1", "erp", "on_pos_sale")


def sale_event(i: int) -> CloudEvent:
    store = STORES[i % len(STORES)]
    txn_id = f"QQ-{i:05d}"
    sale = sale_from_legacy(legacy_sale(txn_id, store=store, qty=1))
    return CloudEvent.new("pos.sale.v1", f"store/{store}/pos/07", sale, subject=txn_id,
                          idempotencykey=f"pos.sale.v1:{store}:{txn_id}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = BrokerCluster.on_free_ports(tmp_path_factory.mktemp("cluster"), nodes=3)
    try:
        c.start()
        yield c
    finally:
        try:
            c.stop(timeout=30)
        finally:
            c.kill()  # whatever did not stop, by its own pid; a no-op for stopped nodes


def send_until_confirmed(publisher: ConfirmingPublisher, events: list[CloudEvent], exchange: str,
                         confirmed: set[str], deadline: float) -> int:
    """Publish in batches; resend what was not confirmed (same event, same key).
    Returns how many publishes failed and were sent again."""
    failures, last = 0, set()
    for first in range(0, len(events), BATCH):
        todo = events[first:first + BATCH]
        while todo:
            assert time.monotonic() < deadline, \
                f"{len(confirmed)} of {SALES} confirmed before the deadline; last errors: {last}"
            errors = publisher.publish_many([event_message(e, exchange) for e in todo], timeout=10)
            last = {str(err) for err in errors if err is not None} or last
            confirmed.update(e.subject for e, err in zip(todo, errors) if err is None)
            todo = [e for e, err in zip(todo, errors) if err is not None]
            failures += len(todo)
            if todo:
                eventlet.sleep(0.5)  # a POS retries after a pause
    return failures


@pytest.mark.timeout(240)
def test_quorum_retry_queue_dead_letters_back_and_a_classic_queue_is_named(cluster):
    """On the real cluster: the quorum ladder is accepted, an expired retry comes back
    to its handler queue, and a queue that exists as classic is refused by name."""
    queue = "evt-test-t.v1--test.on_t"
    conn = connect(cluster.uri(), 10)
    try:
        channel = conn.channel()
        topology.declare_handler_queues(channel, "test.events", "t.v1", queue, [0.2], queue_type="quorum")
        channel.confirm_select()
        channel.basic_publish(amqp.Message(b"retry me", delivery_mode=2), "", topology.retry_queue(queue, 0.2))
        assert wait_for(lambda: channel.basic_get(queue, no_ack=True), timeout=30).body == b"retry me"
        channel.queue_declare("classic-already", durable=True, auto_delete=False)
        with pytest.raises(topology.QueueTypeMismatchError, match="queue 'classic-already'"):
            topology.declare_queue(channel, "classic-already", "quorum")
    finally:
        conn.collect()
    types = {q["name"]: q["type"] for q in cluster.queues()}
    assert types[queue] == types[topology.retry_queue(queue, 0.2)] == types[f"{queue}.dlq"] == "quorum"
    assert types["classic-already"] == "classic"


@pytest.mark.timeout(420)
def test_node_killed_while_sales_flow_every_confirmed_sale_posts_once(cluster, tmp_path):
    db_path = tmp_path / "legacy_erp.db"
    dsn = f"sqlite:///{db_path}"
    engine = engine_for(dsn)
    create_schema(engine)
    with engine.begin() as conn:
        seed_demo_data(conn)
    uri = cluster.uri()
    config = write_config(tmp_path, uri, legacy_db=dsn, queue_type="quorum")
    erp = nameko_run(config, "services.erp", tmp_path / "erp.log")
    publisher = ConfirmingPublisher(uri, confirm_timeout=10, connect_timeout=3)
    try:
        def sales_queue():
            return next((q for q in cluster.queues() if q["name"] == SALES_QUEUE), None)
        assert wait_for(lambda: (sales_queue() or {}).get("consumers") == 1, timeout=90, interval=1), \
            (tmp_path / "erp.log").read_text()[-3000:]
        ours = [q for q in cluster.queues() if q["name"].startswith(SALES_QUEUE)]
        assert {q["name"] for q in ours} == {SALES_QUEUE, f"{SALES_QUEUE}.dlq",
                                             *(topology.retry_queue(SALES_QUEUE, d) for d in (1, 5, 30))}  # bus.yaml's delays
        assert all(q["type"] == "quorum" for q in ours), ours

        victim = cluster.node_named(sales_queue()["leader"])
        victim_pid = victim.pid()
        confirmed: set[str] = set()
        killed = Event()

        def chaos():
            while len(confirmed) < KILL_AFTER:
                eventlet.sleep(0.01)
            victim.kill()  # SIGKILL by the node's own pid; returns once the process is gone
            killed.send(len(confirmed))  # confirms so far: every later one came with the node gone

        eventlet.spawn(chaos)
        events = [sale_event(i) for i in range(SALES)]
        started = time.monotonic()
        failures = send_until_confirmed(publisher, events, topology.events_exchange("store_agent"),
                                        confirmed, deadline=started + 150)
        published_in = time.monotonic() - started
        assert wait_for(killed.ready, timeout=60), "the node was never killed"
        assert killed.wait() < SALES, "the node died after the last confirm: no sale was in flight"
        assert victim.pid() is None and not any(n.pid() == victim_pid for n in cluster.nodes)
        assert len(confirmed) == SALES

        def posted() -> int:
            with engine.connect() as conn:
                return conn.execute(text('SELECT count(DISTINCT "POS_TXN_ID") FROM "SLS_HDR"')).scalar()
        assert wait_for(lambda: posted() >= SALES, timeout=150, interval=1), \
            f"{posted()} of {SALES} posted; erp log:\n" + (tmp_path / "erp.log").read_text()[-3000:]
        assert wait_for(lambda: sales_queue()["messages"] == 0, timeout=60, interval=1)
        drained_in = time.monotonic() - started
        assert erp.poll() is None, "the erp service died with the node"

        with engine.connect() as conn:
            rows = conn.execute(text(
                'SELECT "POS_TXN_ID", count(*) FROM "SLS_HDR" GROUP BY "POS_TXN_ID"')).all()
        per_txn = dict(rows)
        assert set(per_txn) == confirmed, "every confirmed sale, and only those, is posted"
        assert all(n == 1 for n in per_txn.values()), \
            {txn: n for txn, n in per_txn.items() if n != 1}
        parked = {q["name"]: q["messages"] for q in cluster.queues() if q["name"].endswith(".dlq")}
        assert parked and not any(parked.values()), parked
        print(f"\n{SALES} sales through quorum queues on 3 nodes, node {victim.node} killed after "
              f"{killed.wait()} confirms: published in {published_in:.1f}s with {failures} resends, "
              f"all posted once after {drained_in:.1f}s")
    finally:
        publisher.close()
        stop(erp)
        engine.dispose()
