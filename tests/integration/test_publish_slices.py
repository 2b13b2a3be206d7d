"""A group publish lets other greenthreads run between slices of its framing
(bus/publisher.py, PUBLISH_SLICE_SECONDS), against a real RabbitMQ: groups that
interleave still get each its own confirms and returns, and a connection lost
between two slices fails the rest of the group instead of writing it to a dead
connection or leaving it waiting."""
from __future__ import annotations

import socket

import eventlet
import pytest

from bus import publisher as publisher_module
from bus.publisher import BrokerUnavailableError, ConfirmingPublisher, OutgoingMessage, UnroutableError
from tests.integration.test_messaging import channel, depth, fresh_queue

pytestmark = pytest.mark.integration


def group(routing_key: str, tag: str, n: int) -> list[OutgoingMessage]:
    return [OutgoingMessage("", routing_key, b"{}", message_id=f"{tag}-{i:05d}") for i in range(n)]


@pytest.fixture
def framed(monkeypatch):
    """Every framing slice is one message (a yield after each), and the order frames were built in."""
    monkeypatch.setattr(publisher_module, "PUBLISH_SLICE_SECONDS", 0.0)
    order: list[str] = []
    frames = OutgoingMessage.frames

    def noted(self, channel_id, frame_max):
        order.append(self.message_id)
        return frames(self, channel_id, frame_max)
    monkeypatch.setattr(OutgoingMessage, "frames", noted)
    return order


@pytest.mark.timeout(120)
def test_interleaved_groups_get_their_own_confirms_and_returns(amqp_uri, framed):
    queue = fresh_queue(amqp_uri, "t.publish.slices")
    publisher = ConfirmingPublisher(amqp_uri, window=1000, attempts=1)
    try:
        publisher.publish(group(queue, "warm", 1)[0])  # connected before the two groups race
        routed = eventlet.spawn(publisher.publish_many, group(queue, "a", 300))
        unroutable = eventlet.spawn(publisher.publish_many, group("t.publish.slices.nobody", "b", 300))
        routed_results, unroutable_results = routed.wait(), unroutable.wait()
    finally:
        publisher.close()
    built = [m[0] for m in framed[1:]]
    assert "".join(built).count("ab") + "".join(built).count("ba") > 10, "the two groups never interleaved"
    assert routed_results == [None] * 300
    assert all(isinstance(e, UnroutableError) for e in unroutable_results)
    conn, ch = channel(amqp_uri)
    try:
        ids = [ch.basic_get(queue, no_ack=True).properties["message_id"] for _ in range(301)]
        ch.queue_delete(queue)
    finally:
        conn.close()
    assert ids == [m.message_id for m in group(queue, "warm", 1) + group(queue, "a", 300)]


@pytest.mark.timeout(120)
def test_a_connection_lost_between_slices_fails_the_rest_and_the_next_publish_reconnects(amqp_uri, framed):
    queue = fresh_queue(amqp_uri, "t.publish.slices.lost")
    publisher = ConfirmingPublisher(amqp_uri, window=2000, attempts=1, confirm_timeout=10.0)
    try:
        publisher.publish(group(queue, "warm", 1)[0])
        sock = publisher._conn.transport.sock

        def cut_after_100():
            while len(framed) < 100:
                eventlet.sleep(0)
            sock.shutdown(socket.SHUT_RDWR)  # the reader sees the connection end and tears it down
        cutter = eventlet.spawn(cut_after_100)
        with eventlet.Timeout(30):
            results = publisher.publish_many(group(queue, "a", 1500))
        cutter.wait()
        assert len(framed) < 1 + 1500, "the whole group was framed onto a dead connection"
        errors = [e for e in results if e is not None]
        assert errors and all(isinstance(e, BrokerUnavailableError) for e in errors)
        assert publisher._pending == {}
        publisher.publish(group(queue, "after", 1)[0])  # a new connection, fresh delivery tags
    finally:
        publisher.close()
    assert depth(amqp_uri, queue) >= 2
