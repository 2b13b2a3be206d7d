"""An ordered reliable handler whose failed message cannot be parked (its dead-letter
queue is gone, so the broker returns the copy as unroutable), against a real RabbitMQ:
the store's later messages wait until the message is parked; they never overtake it."""
from __future__ import annotations


import amqp
import pytest

from bus import topology
from bus.constants import H_STORE
from bus.consumer import PermanentError, reliable_handler
from bus.extensions import EventPublisher, event_message
from bus.publisher import ConfirmingPublisher, connection_params
from contracts.envelope import CloudEvent
from contracts.pos import PosStockQueryV1
from tests.integration.support import wait_for

pytestmark = pytest.mark.integration

QUEUE = topology.handler_queue("pos_tills", "pos.stock_query.v1", "ordered_dlq", "on_query")
DLQ = topology.dead_letter_queue(QUEUE)
TIMELINE: list[str] = []


class OrderedService:
    name = "ordered_dlq"
    events = EventPublisher()

    @reliable_handler("pos_tills", "pos.stock_query.v1", ordered=True)
    def on_query(self, query: PosStockQueryV1, event: CloudEvent):
        sku = query.skus[0]
        TIMELINE.append(sku)
        if sku.startswith("FATAL"):
            raise PermanentError(f"will never handle {sku}")


def admin(uri: str, action):
    conn = amqp.Connection(**connection_params(uri, 5))
    conn.connect()
    try:
        return action(conn.channel())
    finally:
        conn.collect()


def failed_parks(caplog) -> int:
    return sum("could not move failed message" in r.getMessage() for r in caplog.records)


@pytest.mark.timeout(120)
def test_an_ordered_handler_does_not_move_on_while_its_failed_message_cannot_be_parked(
        container_factory, amqp_uri, tmp_path, caplog):
    admin(amqp_uri, lambda ch: [ch.queue_delete(q) for q in (QUEUE, DLQ)])
    TIMELINE.clear()
    container = container_factory(OrderedService, {"AMQP_URI": amqp_uri, "max_workers": 8,
                                                   "RETAILBUS": {"root": str(tmp_path), "retry": {"delays": []}}})
    container.start()
    next(e for e in container.subextensions if type(e).__name__ == "ReliableConsumer").ready.wait()
    admin(amqp_uri, lambda ch: ch.queue_delete(DLQ))  # a park now comes back unroutable
    publisher = ConfirmingPublisher(amqp_uri)
    try:
        for sku in ("FATAL-1", "GOOD-2", "GOOD-3"):
            event = CloudEvent.new("pos.stock_query.v1", "store/S001/pos/07",
                                   PosStockQueryV1(store_id="S001", skus=[sku]), idempotencykey=sku)
            message = event_message(event, topology.events_exchange("pos_tills"))
            message.headers = {**(message.headers or {}), H_STORE: "S001"}
            publisher.publish(message)
    finally:
        publisher.close()
    assert wait_for(lambda: failed_parks(caplog) >= 2, timeout=60), TIMELINE  # two parks failed
    TIMELINE.append("dlq restored")

    def restore(ch):
        ch.queue_declare(DLQ, durable=True, auto_delete=False)
        ch.queue_bind(DLQ, topology.FAILED_EXCHANGE, DLQ)
    admin(amqp_uri, restore)
    assert wait_for(lambda: TIMELINE[-2:] == ["GOOD-2", "GOOD-3"], timeout=60), TIMELINE
    assert TIMELINE == ["FATAL-1", "dlq restored", "GOOD-2", "GOOD-3"]  # handled once, parked, then the rest
    assert wait_for(lambda: admin(amqp_uri, lambda ch: ch.queue_declare(DLQ, passive=True).message_count) == 1,
                    timeout=30)
