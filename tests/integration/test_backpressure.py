"""Back-pressure instead of confirm timeouts (bus/publisher.py), against a real
RabbitMQ: a burst of large messages, as a big file's chunks or a change-capture
batch make, is confirmed whole however slowly the broker takes it, without the
publisher tearing its connection down as dead and sending everything again."""
from __future__ import annotations

import time

import pytest

from bus import metrics
from bus.publisher import ConfirmingPublisher, OutgoingMessage
from tests.integration.test_messaging import channel, depth, fresh_queue

pytestmark = pytest.mark.integration

BODY = b"x" * 64 * 1024


def burst(queue: str, n: int) -> list[OutgoingMessage]:
    return [OutgoingMessage("", queue, BODY, message_id=f"burst-{time.monotonic_ns()}-{i}") for i in range(n)]


def failed() -> float:
    return metrics.PUBLISHED.labels("", "failed")._value.get()


@pytest.mark.timeout(300)
def test_a_burst_of_large_messages_is_confirmed_whole_without_confirm_timeouts(amqp_uri):
    """3,000 persistent 64 KiB messages (~190 MiB) with a confirm timeout of 0.5 s: far
    longer than the broker needs to write the whole burst, shorter than it needs for a
    window of them. The publisher waits on the broker's progress: every message is
    confirmed on the first attempt, once (no resend after a torn-down connection)."""
    queue = fresh_queue(amqp_uri, "t.backpressure")
    publisher = ConfirmingPublisher(amqp_uri, window=1000, confirm_timeout=0.5, attempts=1)
    before = failed()
    try:
        results = publisher.publish_many(burst(queue, 3000))
    finally:
        publisher.close()
    errors = [str(e) for e in results if e is not None]
    assert errors == [], f"{len(errors)} not confirmed, e.g. {errors[:1]}"
    assert failed() == before
    assert depth(amqp_uri, queue) == 3000
    conn, ch = channel(amqp_uri)
    try:
        ch.queue_delete(queue)
    finally:
        conn.close()


@pytest.mark.timeout(120)
def test_bytes_in_flight_are_bounded_per_publisher(amqp_uri):
    """With a 1 MiB byte window, no more than 16 of the 64 KiB messages are ever
    unconfirmed at once, whatever the message window says."""
    queue = fresh_queue(amqp_uri, "t.backpressure.bytes")
    publisher = ConfirmingPublisher(amqp_uri, window=1000, window_bytes=2 ** 20)
    peak = []
    release = publisher._window.release

    def watched(n, nbytes):
        peak.append(publisher._window.used_bytes)
        release(n, nbytes)
    publisher._window.release = watched
    try:
        assert publisher.publish_many(burst(queue, 200)) == [None] * 200
    finally:
        publisher.close()
    assert peak and max(peak) <= 2 ** 20
    assert depth(amqp_uri, queue) == 200
    conn, ch = channel(amqp_uri)
    try:
        ch.queue_delete(queue)
    finally:
        conn.close()
