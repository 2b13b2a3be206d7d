"""Posting scale-out (bus/partitions.py) with real erp processes on a real broker:
sales split by store into two partition queues, each posted by its own erp
process; one process is killed with SIGKILL mid-stream and the other takes its
partition over. Every sale is posted once and each store's sales in order; the
stock the postings change is captured by process 0 alone."""
from __future__ import annotations

import signal
import urllib.request
from contextlib import ExitStack

import amqp
import pytest
from sqlalchemy import text

from bus import partitions, topology
from bus.constants import H_STORE, H_STORE_SEQ
from bus.extensions import event_message
from bus.publisher import ConfirmingPublisher, connection_params
from contracts.envelope import CloudEvent
from demo.legacy_erp.schema import (DEMO_ON_HAND, DEMO_SKUS, STK_LVL, create_schema, engine_for, seed_demo_data,
                                    utc_stamp)
from routing.legacy_payload import sale_from_legacy
from tests.conftest import free_ports
from tests.integration.support import legacy_sale, nameko_run, queue_state, stop, wait_for, write_config

pytestmark = pytest.mark.chaos

QUEUE = topology.handler_queue("store_agent", "pos.sale.v1", "erp", "on_pos_sale")
PARTITIONS = partitions.partition_queues(QUEUE, 2)
EXCHANGE = topology.events_exchange("store_agent")
STORES = [f"P{n:03d}" for n in range(24)]
PER_STORE = 100


def sale_message(store: str, n: int):
    """A sale as the store's forwarder publishes it: store header and position."""
    txn = f"{store}-{n:05d}"
    event = CloudEvent.new("pos.sale.v1", f"store/{store}/pos/07", sale_from_legacy(legacy_sale(txn, store=store)),
                           subject=txn, idempotencykey=f"pos.sale.v1:{store}:{txn}")
    message = event_message(event, EXCHANGE)
    message.headers = {H_STORE: store, H_STORE_SEQ: n + 1}
    return message


def delete(uri: str, queues: list[str], exchanges: list[str]) -> None:
    conn = amqp.Connection(**connection_params(uri, 5))
    conn.connect()
    try:
        ch = conn.channel()
        for queue in queues:
            for name in (queue, topology.dead_letter_queue(queue), *(topology.retry_queue(queue, d) for d in (1, 2))):
                ch.queue_delete(name)
        for exchange in exchanges:
            ch.exchange_delete(exchange)
    finally:
        conn.collect()


def counted(port: int, *wanted: str) -> float:
    """The sum of an erp process's samples (its own /metrics) whose line holds every `wanted`."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        lines = r.read().decode().splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if all(w in line for w in wanted))


def posted_by(port: int) -> float:
    """Sales an erp process posted."""
    return counted(port, "retailbus_messages_consumed_total{", 'outcome="ok"', f'queue="{QUEUE}"')


def captured_by(port: int) -> float:
    """Stock rows an erp process's change capture handed on (its postings change STK_LVL)."""
    return counted(port, "retailbus_cdc_rows_total{", 'table="STK_LVL"')


@pytest.mark.timeout(400)
def test_two_erp_processes_post_two_partitions_and_the_survivor_takes_over(amqp_uri, tmp_path, request):
    dsn = f"sqlite:///{tmp_path / 'legacy_erp.db'}"
    engine = engine_for(dsn)
    create_schema(engine)
    with engine.begin() as conn:
        seed_demo_data(conn)
        conn.execute(STK_LVL.insert(), [dict(STORE_NO=s, SKU=sku, ON_HAND=DEMO_ON_HAND, UPD_TS=utc_stamp())
                                        for s in STORES for sku in DEMO_SKUS])
    request.addfinalizer(engine.dispose)
    # The unpartitioned queue of earlier tests would take a copy of every sale.
    delete(amqp_uri, [QUEUE, *PARTITIONS], [partitions.partition_exchange(QUEUE)])
    request.addfinalizer(lambda: delete(amqp_uri, PARTITIONS, [partitions.partition_exchange(QUEUE)]))
    config = write_config(tmp_path, amqp_uri, legacy_db=dsn, retry={"delays": [1, 2], "prefetch": 64},
                          handlers={"erp.on_pos_sale": {"partitions": 2, "standby_after": 60}})
    logs = [tmp_path / "erp-0.log", tmp_path / "erp-1.log"]
    ports = free_ports(2)

    def posted() -> list[tuple[str, str]]:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.execute(text(
                "SELECT STORE_NO, POS_TXN_ID FROM SLS_HDR WHERE DOC_TYPE = 'S' AND STORE_NO LIKE 'P%' "
                "ORDER BY DOC_NO"))]

    with ExitStack() as stack:
        erps = [nameko_run(config, "services.erp", log, RETAILBUS_INSTANCE=f"{i}/2", RETAILBUS_METRICS_PORT=str(port))
                for i, (log, port) in enumerate(zip(logs, ports))]
        for erp in erps:
            stack.callback(stop, erp)
        # each process owns one partition at once and stands by for the other 60 s later (a start
        # slower than that on a loaded machine would find its partition taken by the other)
        assert wait_for(lambda: all(queue_state(amqp_uri, q)[1] == 2 for q in PARTITIONS), timeout=150), \
            "each partition: its owner and a standby"

        publisher = ConfirmingPublisher(amqp_uri)
        stack.callback(publisher.close)
        rounds = [[sale_message(store, n) for store in STORES] for n in range(PER_STORE)]
        total = len(STORES) * PER_STORE
        for round_ in rounds:  # a backlog per partition: a second active consumer would split a store
            assert publisher.publish_many(round_) == [None] * len(round_)
        assert wait_for(lambda: len(posted()) >= total // 4, timeout=60)
        # both processes posted: the stores spread over both partitions, posted in parallel
        assert posted_by(ports[0]) > 0 and posted_by(ports[1]) > 0, "both partitions posted"
        # the stock both changed is captured once, by process 0 (two pollers would hand each change on twice)
        assert wait_for(lambda: captured_by(ports[0]) > 0, timeout=30), "process 0 captures the stock changes"
        assert captured_by(ports[1]) == 0, "change capture runs in process 0 only"
        erps[1].send_signal(signal.SIGKILL)  # mid-stream: its partition still holds sales
        erps[1].wait(30)
        assert len(posted()) < total, "the kill came too late to test a takeover"

        assert wait_for(lambda: len(posted()) >= total, timeout=180, interval=0.5), \
            f"{len(posted())} of {total} posted\n{logs[0].read_text()[-3000:]}"
        rows = posted()
        assert len(rows) == total, "a sale posted twice"
        for store in STORES:
            assert [txn for s, txn in rows if s == store] == [f"{store}-{n:05d}" for n in range(PER_STORE)], \
                f"{store}: lost, doubled or out of order"
        # the survivor consumes the dead process's partition, and both are drained
        for queue in PARTITIONS:
            assert queue_state(amqp_uri, queue) == (0, 1)
