"""The resequencer of an ordered handler against a real RabbitMQ, fed by the real forwarder
from a real outbox after a partial nack (issue 17, finding 12): the broker refuses sale 3 of
a pipelined round and takes 4..6, so 4..6 are in the queue ahead of the resent 3. Only the
broker's refusal is played (a stand-in wraps the forwarder's real publisher and leaves 3 out
of the first round, as a nack does): a real broker nacks one publish of a batch only under
overload. The handler must take 3 before 4, and a 3 that never comes must not block the store."""
from __future__ import annotations

import logging

import amqp
import pytest

from bus import topology
from bus.constants import H_STORE_SEQ
from bus.consumer import reliable_handler
from bus.publisher import NackedError, connection_params
from bus.resequence import HOLDS, TIMEOUTS
from bus.settings import PublisherSettings
from contracts.envelope import CloudEvent
from contracts.pos import PosSaleV1
from routing.forwarder import OutboxForwarder
from routing.legacy_payload import sale_from_legacy
from routing.outbox import Outbox
from tests.integration.support import legacy_sale, queue_state, wait_for

pytestmark = pytest.mark.integration

SOURCE = "reseq_agent"  # an exchange of its own: no other test's sales reach this queue
QUEUE = topology.handler_queue(SOURCE, "pos.sale.v1", "reseq", "on_sale")
HANDLED: list[str] = []


class Resequenced:
    name = "reseq"

    @reliable_handler(SOURCE, "pos.sale.v1", ordered=True)
    def on_sale(self, sale: PosSaleV1, event: CloudEvent):
        HANDLED.append(sale.pos_txn_id[-1])  # the sale's number in the store's order


class ResequencedInBatches:
    """As the erp takes its sales: a list per worker."""
    name = "reseq"

    @reliable_handler(SOURCE, "pos.sale.v1", ordered=True, batch=64)
    def on_sale(self, sales: list[tuple[PosSaleV1, CloudEvent]]):
        HANDLED.extend(sale.pos_txn_id[-1] for sale, _ in sales)
        return [None] * len(sales)


class NacksFirstRound:
    """The forwarder's real publisher, except that the broker "nacks" the sale at store
    position `refused` in the first round that carries it: it is not sent, NackedError."""

    def __init__(self, real, refused: int):
        self.real, self.refused = real, refused

    def _refuse(self, message) -> bool:
        if message.headers[H_STORE_SEQ] != self.refused:
            return False
        self.refused = None
        return True

    def publish(self, message):
        [error] = self.publish_many([message])
        if error is not None:
            raise error

    def publish_many(self, messages):
        refused = [self._refuse(m) for m in messages]
        sent = iter(self.real.publish_many([m for m, r in zip(messages, refused) if not r]))
        return [NackedError("the broker refused the message (nack)") if r else next(sent) for r in refused]

    def close(self):
        self.real.close()


def drop_queue(uri: str):
    conn = amqp.Connection(**connection_params(uri, 5))
    conn.connect()
    try:
        ch = conn.channel()
        for queue in (QUEUE, topology.dead_letter_queue(QUEUE)):
            ch.queue_delete(queue)
    finally:
        conn.collect()


@pytest.fixture(params=[Resequenced, ResequencedInBatches], ids=["one by one", "in batches"])
def estate(container_factory, amqp_uri, tmp_path, request):
    """(forwarder of store S001 over a real outbox holding sales 1..6, whose broker nacks 3 once;
    a function that starts the ordered handler with a resequence window)."""
    drop_queue(amqp_uri)
    request.addfinalizer(lambda: drop_queue(amqp_uri))
    HANDLED.clear()
    outbox = Outbox(tmp_path / "outbox.db")
    request.addfinalizer(outbox.close)
    for n in range(1, 7):
        sale = sale_from_legacy(legacy_sale(f"S001-07-00000{n}"))
        outbox.accept(CloudEvent.new("pos.sale.v1", "store/S001/pos/07", sale, subject=sale.pos_txn_id,
                                     idempotencykey=f"pos.sale.v1:S001:{sale.pos_txn_id}"))
    forwarder = OutboxForwarder(source_service=SOURCE)
    forwarder.attach(outbox, "S001", amqp_uri, PublisherSettings())
    forwarder.publisher = NacksFirstRound(forwarder.publisher, refused=3)
    request.addfinalizer(forwarder.publisher.close)

    def start(window: float):
        container = container_factory(request.param, {
            "AMQP_URI": amqp_uri, "max_workers": 8, "RETAILBUS": {
                "root": str(tmp_path), "retry": {"delays": []},
                "handlers": {"reseq.on_sale": {"resequence_window": window}}}})
        container.start()
        next(e for e in container.subextensions if type(e).__name__ == "ReliableConsumer").ready.wait()
    return forwarder, outbox, start


def forward_round(forwarder, outbox) -> bool:
    """One forwarder round; True when the broker nacked part of it."""
    try:
        forwarder._forward(outbox.unsent(100))
    except NackedError:
        return True
    return False


def all_delivered(uri: str) -> bool:
    """Nothing of the queue is waiting at the broker: the consumer holds every message."""
    return queue_state(uri, QUEUE)[0] == 0


@pytest.mark.timeout(180)
def test_after_a_partial_nack_the_resent_message_is_handled_before_its_successors(estate, amqp_uri):
    forwarder, outbox, start = estate
    start(window=120)  # far beyond the resend below: the order, not the window, is tested here
    holds = HOLDS.labels(QUEUE)._value.get()
    assert forward_round(forwarder, outbox)  # 1, 2 confirmed; 3 nacked; 4, 5, 6 confirmed and queued
    assert [e.stream_seq for e in outbox.unsent(100)] == [3, 4, 5, 6]
    assert wait_for(lambda: all_delivered(amqp_uri), timeout=60)  # 4, 5, 6 reached the handler before 3
    assert not forward_round(forwarder, outbox)  # the forwarder's next round: 3, 4, 5, 6 again
    assert wait_for(lambda: len(HANDLED) == 9, timeout=60), HANDLED
    assert HANDLED == ["1", "2", "3", "4", "5", "6", "4", "5", "6"]  # then the resent duplicates
    assert HOLDS.labels(QUEUE)._value.get() == holds + 1


@pytest.mark.timeout(180)
def test_a_predecessor_that_does_not_come_is_skipped_after_the_window(estate, amqp_uri, caplog):
    forwarder, outbox, start = estate
    start(window=1)
    timeouts = TIMEOUTS.labels(QUEUE)._value.get()
    with caplog.at_level(logging.INFO, logger="bus.resequence"):
        assert forward_round(forwarder, outbox)  # 3 nacked, and not sent again until much later
        assert wait_for(lambda: len(HANDLED) == 5, timeout=60), HANDLED
        assert HANDLED == ["1", "2", "4", "5", "6"]  # 4 waited for 3, then the store went on
        assert TIMEOUTS.labels(QUEUE)._value.get() == timeouts + 1
        assert any("not seen within 1s; going on with 4" in r.getMessage() for r in caplog.records)
        assert not forward_round(forwarder, outbox)  # 3 comes after all: handled, never held
        assert wait_for(lambda: len(HANDLED) == 9, timeout=60), HANDLED
    assert HANDLED[5:] == ["3", "4", "5", "6"]
    assert TIMEOUTS.labels(QUEUE)._value.get() == timeouts + 1
