"""The messaging core against a real RabbitMQ: confirms, mandatory, timeouts,
retry with growing delay, dead-lettering, nothing acked away."""
from __future__ import annotations

import socket
import time

import amqp
import pytest

from contracts.envelope import CloudEvent
from contracts.pos import PosStockQueryV1
from bus import topology
from bus.constants import H_ATTEMPTS, H_ERROR, H_ROUTING_KEY
from bus.consumer import PermanentError, reliable_handler
from bus.extensions import EventPublisher
from bus.publisher import (BrokerUnavailableError, ConfirmingPublisher, OutgoingMessage,
                                    PublishError, UnroutableError, connection_params)
from tests.conftest import free_port

pytestmark = pytest.mark.integration


def message(routing_key: str, exchange: str = "", body: bytes = b"{}", n: int = 0) -> OutgoingMessage:
    return OutgoingMessage(exchange, routing_key, body, message_id=f"m-{time.monotonic_ns()}-{n}")


def channel(uri: str):
    conn = amqp.Connection(**connection_params(uri, 5))
    conn.connect()
    return conn, conn.channel()


def depth(uri: str, queue: str) -> int:
    conn, ch = channel(uri)
    try:
        return ch.queue_declare(queue, passive=True).message_count
    finally:
        conn.close()


def fresh_queue(uri: str, name: str, **arguments) -> str:
    conn, ch = channel(uri)
    try:
        ch.queue_delete(name)
        ch.queue_declare(name, durable=True, auto_delete=False, arguments=arguments or None)
    finally:
        conn.close()
    return name


def stock_query(sku: str) -> CloudEvent:
    return CloudEvent.new("pos.stock_query.v1", "store/S001/pos/01",
                          PosStockQueryV1(store_id="S001", skus=[sku]), idempotencykey=f"q:{sku}")


def test_many_publishes_in_flight_all_confirmed(amqp_uri):
    queue = fresh_queue(amqp_uri, "t.pipelined")
    publisher = ConfirmingPublisher(amqp_uri, window=500)
    try:
        results = publisher.publish_many([message(queue, n=i) for i in range(2000)])
    finally:
        publisher.close()
    assert results == [None] * 2000
    assert depth(amqp_uri, queue) == 2000


def test_unroutable_publish_raises(amqp_uri):
    conn, ch = channel(amqp_uri)
    topology.declare_exchange(ch, "t.nobody-listens")
    conn.close()
    publisher = ConfirmingPublisher(amqp_uri)
    try:
        with pytest.raises(UnroutableError, match="no-such-queue"):
            publisher.publish(message("no-such-queue"))
        with pytest.raises(UnroutableError, match="pos.sale.v1"):
            publisher.publish(message("pos.sale.v1", exchange="t.nobody-listens"))
        # the channel survives: a routable publish right after still confirms
        queue = fresh_queue(amqp_uri, "t.after-unroutable")
        publisher.publish(message(queue))
    finally:
        publisher.close()
    assert depth(amqp_uri, queue) == 1


def test_publish_to_stopped_broker_fails_within_timeout():
    publisher = ConfirmingPublisher(f"amqp://u:p@127.0.0.1:{free_port()}/", confirm_timeout=2,
                                    connect_timeout=1)
    started = time.monotonic()
    with pytest.raises(PublishError, match="cannot connect"):
        publisher.publish(message("q"))
    assert time.monotonic() - started < 15  # the 1 s/2 s timeouts, not a hang (5x margin: 2 shared cores)


def test_publish_to_silent_broker_fails_within_timeout():
    """A peer that accepts TCP but never answers AMQP: the classic hang."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    port = silent.getsockname()[1]
    publisher = ConfirmingPublisher(f"amqp://u:p@127.0.0.1:{port}/", confirm_timeout=2,
                                    connect_timeout=1)
    started = time.monotonic()
    try:
        with pytest.raises(BrokerUnavailableError):
            publisher.publish(message("q"))
    finally:
        silent.close()
    assert time.monotonic() - started < 15  # the 1 s/2 s timeouts, not a hang (5x margin: 2 shared cores)


class Recorder:
    """Effects observed by the test service (a real list the test inspects)."""
    handled: list[str] = []
    attempts: dict[str, list[float]] = {}


def handle_query(query: PosStockQueryV1):
    sku = query.skus[0]
    Recorder.attempts.setdefault(sku, []).append(time.monotonic())
    if sku.startswith("POISON"):
        raise RuntimeError(f"cannot handle {sku}")
    if sku.startswith("FATAL"):
        raise PermanentError(f"will never handle {sku}")
    Recorder.handled.append(sku)


class FlakyService:
    name = "flaky"
    events = EventPublisher()

    @reliable_handler("pos_tills", "pos.stock_query.v1")
    def on_query(self, query: PosStockQueryV1, event: CloudEvent):
        handle_query(query)


class BatchingFlakyService:
    """FlakyService's messages in batches: each item's error in its place, not raised."""
    name = "flaky"
    events = EventPublisher()

    @reliable_handler("pos_tills", "pos.stock_query.v1", batch=8)
    def on_query(self, queries: list[tuple[PosStockQueryV1, CloudEvent]]):
        if any(query.skus[0].startswith("SHORT") for query, _ in queries):
            return []  # a handler bug: not one result per message
        results = []
        for query, _ in queries:
            try:
                results.append(handle_query(query))
            except Exception as exc:
                results.append(exc)
        return results


def service_config(amqp_uri: str, tmp_path, **retailbus) -> dict:
    return {"AMQP_URI": amqp_uri, "max_workers": 16,
            "RETAILBUS": {"root": str(tmp_path), **retailbus}}


def purge(uri: str, *queues: str):
    conn, ch = channel(uri)
    try:
        for q in queues:
            ch.queue_delete(q)
    finally:
        conn.close()


def start_flaky(service, container_factory, amqp_uri, tmp_path):
    queue = topology.handler_queue("pos_tills", "pos.stock_query.v1", "flaky", "on_query")
    delays = [0.3, 0.6, 1.2]
    purge(amqp_uri, queue, topology.dead_letter_queue(queue),
          *[topology.retry_queue(queue, d) for d in delays])
    Recorder.handled, Recorder.attempts = [], {}
    container = container_factory(service, service_config(
        amqp_uri, tmp_path, retry={"delays": delays, "prefetch": 8}))
    container.start()
    consumer = next(e for e in container.subextensions if type(e).__name__ == "ReliableConsumer")
    consumer.ready.wait()
    return queue, delays


@pytest.fixture(params=[FlakyService, BatchingFlakyService], ids=["one by one", "in batches"])
def flaky(request, container_factory, amqp_uri, tmp_path):
    queue, delays = start_flaky(request.param, container_factory, amqp_uri, tmp_path)
    publisher = ConfirmingPublisher(amqp_uri)
    yield queue, delays, publisher
    publisher.close()


def wait_for(predicate, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def get_all(uri: str, queue: str) -> list[amqp.Message]:
    conn, ch = channel(uri)
    out = []
    try:
        while (msg := ch.basic_get(queue, no_ack=True)) is not None:
            out.append(msg)
    finally:
        conn.close()
    return out


def test_failing_handler_is_retried_with_growing_delay_then_dead_lettered(flaky, amqp_uri):
    queue, delays, publisher = flaky
    exchange = topology.events_exchange("pos_tills")
    poison = stock_query("POISON-1")
    goods = [stock_query(f"GOOD-{i}") for i in range(50)]
    sent = [poison] + goods
    for event in sent:
        publisher.publish(OutgoingMessage(exchange, event.type, event.to_json(), message_id=event.id))

    assert wait_for(lambda: len(Recorder.handled) == 50, timeout=120)
    assert wait_for(lambda: depth(amqp_uri, topology.dead_letter_queue(queue)) == 1, timeout=120)

    tries = Recorder.attempts["POISON-1"]
    # the queue keeps flowing for the others while the poison message waits for its retries
    assert min(Recorder.attempts[f"GOOD-{i}"][0] for i in range(50)) < tries[-1]
    assert len(tries) == 1 + len(delays)
    gaps = [b - a for a, b in zip(tries, tries[1:])]
    assert all(gap >= delay * 0.9 for gap, delay in zip(gaps, delays)), gaps
    assert gaps == sorted(gaps), f"delays must grow: {gaps}"

    # count: sent = handled + parked, nothing acked away, nothing left behind
    parked = get_all(amqp_uri, topology.dead_letter_queue(queue))
    assert len(parked) == 1
    headers = parked[0].properties["application_headers"]
    assert headers[H_ATTEMPTS] == 4
    assert "cannot handle POISON-1" in headers[H_ERROR]
    assert headers[H_ROUTING_KEY] == "pos.stock_query.v1"
    assert CloudEvent.from_json(parked[0].body).id == poison.id
    assert len(sent) == len(Recorder.handled) + len(parked)
    assert depth(amqp_uri, queue) == 0
    assert all(depth(amqp_uri, topology.retry_queue(queue, d)) == 0 for d in delays)


def test_invalid_and_permanent_failures_are_parked_at_once(flaky, amqp_uri):
    queue, _, publisher = flaky
    exchange = topology.events_exchange("pos_tills")
    bad = stock_query("X").model_copy(update={"data": {"store_id": "S001", "skus": []}})
    fatal = stock_query("FATAL-1")
    for event in (bad, fatal):
        publisher.publish(OutgoingMessage(exchange, event.type, event.to_json(), message_id=event.id))
    publisher.publish(OutgoingMessage(exchange, "pos.stock_query.v1", b"not json", message_id="raw-1"))

    assert wait_for(lambda: depth(amqp_uri, topology.dead_letter_queue(queue)) == 3, timeout=120)
    parked = {m.properties["message_id"]: m.properties["application_headers"]
              for m in get_all(amqp_uri, topology.dead_letter_queue(queue))}
    assert parked[bad.id][H_ATTEMPTS] == 1 and "data.skus" in parked[bad.id][H_ERROR]
    assert parked[fatal.id][H_ATTEMPTS] == 1
    assert parked["raw-1"][H_ATTEMPTS] == 1 and "json" in parked["raw-1"][H_ERROR].lower()
    assert "X" not in Recorder.attempts  # the invalid one never reached the handler
    assert len(Recorder.attempts["FATAL-1"]) == 1


def test_a_batch_handler_without_one_result_per_message_retries_them_then_parks_them(
        container_factory, amqp_uri, tmp_path):
    queue, delays = start_flaky(BatchingFlakyService, container_factory, amqp_uri, tmp_path)
    short = stock_query("SHORT-1")
    publisher = ConfirmingPublisher(amqp_uri)
    try:
        publisher.publish(OutgoingMessage(topology.events_exchange("pos_tills"), short.type, short.to_json(),
                                          message_id=short.id))
    finally:
        publisher.close()
    assert wait_for(lambda: depth(amqp_uri, topology.dead_letter_queue(queue)) == 1, timeout=120)
    [parked] = get_all(amqp_uri, topology.dead_letter_queue(queue))
    headers = parked.properties["application_headers"]
    assert headers[H_ATTEMPTS] == 1 + len(delays)
    assert "on_query returned 0 results for 1 messages" in headers[H_ERROR]
    assert Recorder.handled == [] and depth(amqp_uri, queue) == 0
