"""`ReliableConsumer`: the one connection a container consumes every handler queue on.

bus/consumer.py holds the entrypoint's logic (ack after success, retries, parking);
this is the transport side: the connection and channel, prefetch, subscribing (and standing by for partitions
another process owns), reading frames and settling deliveries with raw ack frames.
"""
from __future__ import annotations

import logging
import random
from functools import partial
from typing import TYPE_CHECKING

import amqp
import eventlet
from eventlet.event import Event
from nameko.extensions import ProviderCollector, SharedExtension

from bus import metrics, partitions, topology
from bus.extensions import container_settings
from bus.framing import ack_frame
from bus.publisher import connect
from bus.wire import CoalescingWriter, FrameReader, buffered_reads

if TYPE_CHECKING:  # the entrypoint registers itself here; only its type is named
    from bus.consumer import ReliableHandler

log = logging.getLogger(__name__)


class ReliableConsumer(SharedExtension, ProviderCollector):
    """One connection and channel per container, consuming every handler queue.

    One greenthread owns reading (and reconnecting); acks come from worker
    greenthreads and are serialised by a lock. After a reconnect the broker
    redelivers what was unacked, so acks for the old channel are dropped.
    """

    def __init__(self):
        super().__init__()
        self._channel = None
        self._writer: CoalescingWriter | None = None
        self._running = False
        self.ready = Event()
        self._tags: dict = {}  # provider -> its consumer tags on the current channel
        self._queues: dict[str, str] = {}  # consumer tag -> queue
        self._stopping: set = set()

    def setup(self):
        self.uri, self.settings = container_settings(self.container.config)

    def start(self):
        self._running = True
        self._loop = self.container.spawn_managed_thread(self._run, identifier="reliable_consumer")

    def stop(self):
        self._running = False
        self.wait_for_providers()
        self._loop.wait()  # the read loop closes its connection within a second

    def kill(self):
        self._running = False
        self._loop.kill()

    def _prefetch(self) -> int:
        handlers = max(1, len(self._providers))
        return max(1, min(self.settings.retry.prefetch, self.container.max_workers // handlers))

    def _run(self):
        """Read deliveries until stopped; reconnect with backoff when the link drops.

        Only this greenthread reads the socket, and it also closes the
        connection on the way out, so no one else ever waits for a reply.
        """
        backoff = 0.2
        while self._running:
            conn = None
            try:
                conn = self._connect()
                reader = FrameReader(conn)
                backoff = 0.2
                while self._running:
                    try:
                        reader.drain(timeout=1)
                    except TimeoutError:
                        pass
                    conn.heartbeat_tick()  # only queues a frame: the writer sends it
                self._channel = None
                conn.close()
                self._writer.close()
            except Exception as exc:
                self._channel = None
                if self._writer is not None:
                    self._writer.close()
                if conn is not None:
                    conn.collect()
                if not self._running:
                    return
                metrics.BROKER_CONNECTED.labels("consumer").set(0)
                log.warning("consumer connection lost (%s); reconnecting in %.1fs", exc, backoff)
                eventlet.sleep(backoff * (1 + random.random()))
                backoff = min(backoff * 2, 10.0)

    def _connect(self) -> amqp.Connection:
        conn = connect(self.uri, self.settings.publisher.connect_timeout)
        # Every frame (requests, acks, heartbeats) leaves through one writer
        # greenthread. The channel is ours before the first delivery can arrive:
        # a handler may finish, and ack, while the next queue is still being
        # subscribed; an ack dropped then would hold a prefetch slot forever.
        self._writer = CoalescingWriter(conn, lambda exc: conn.collect())
        buffered_reads(conn)
        channel = conn.channel()
        self._conn, self._channel = conn, channel
        self._queues = {}
        for provider in list(self._providers):
            if provider in self._stopping:
                continue
            channel.basic_qos(0, self._prefetch(), False)
            self._tags[provider] = []
            if provider.partitions > 1:
                partitions.declare(channel, provider.exchange, provider.event_type, provider.queue,
                                   provider.partitions, provider.delays, self.settings.queue_type)
                mine, others = partitions.owned(provider.partitions, partitions.instance())
                for p in mine:
                    self._subscribe(channel, provider, partitions.partition_queue(provider.queue, p))
                self.container.spawn_managed_thread(partial(
                    self._stand_by, channel, provider,
                    [partitions.partition_queue(provider.queue, p) for p in others]), identifier="standby")
                continue
            topology.declare_handler_queues(
                channel, provider.exchange, provider.event_type, provider.queue,
                provider.delays, provider.exchange_type, single_active=provider.ordered,
                queue_type=self.settings.queue_type)
            self._subscribe(channel, provider, provider.queue)
        metrics.BROKER_CONNECTED.labels("consumer").set(1)
        if not self.ready.ready():
            self.ready.send(True)
        return conn

    def _subscribe(self, channel, provider: "ReliableHandler", queue: str, nowait: bool = False):
        tag = channel.basic_consume(queue, consumer_tag=f"{queue}-{id(self):x}" if nowait else "",
                                    callback=partial(self._deliver, provider), nowait=nowait)
        self._tags[provider].append(tag)
        self._queues[tag] = queue

    def _stand_by(self, channel, provider: "ReliableHandler", queues: list[str]):
        """Subscribe to the partitions this process does not own once their owners had
        time to subscribe first (bus/partitions.py). nowait: only the reader waits for replies."""
        eventlet.sleep(provider.standby_after)
        if channel is not self._channel or provider in self._stopping:
            return  # a new connection stands by afresh
        for queue in queues:
            self._subscribe(channel, provider, queue, nowait=True)

    def queue_of(self, message: amqp.Message) -> str | None:
        """The queue a message was delivered from (one of a partitioned handler's)."""
        return self._queues.get(message.delivery_info.get("consumer_tag"))

    def unregister_provider(self, provider):
        """Stop deliveries for a stopping handler; what it already holds finishes."""
        self._stopping.add(provider)
        tags, channel = self._tags.pop(provider, []), self._channel
        for tag in tags:
            if channel is None:
                break
            try:
                channel.basic_cancel(tag, nowait=True)
            except Exception as exc:
                log.warning("could not cancel consumer %s: %s", tag, exc)
        super().unregister_provider(provider)

    def _deliver(self, provider: "ReliableHandler", message: amqp.Message):
        if provider not in self._stopping:  # deliveries racing a cancel stay unacked: requeued
            provider.handle_message(message)

    def holds(self, message: amqp.Message) -> bool:
        """True while the channel that delivered `message` is this consumer's (it can be acked)."""
        return message.channel is self._channel

    def settle(self, message: amqp.Message, ack: bool = True):
        """Ack (or requeue) on the channel that delivered it, if that is still ours."""
        channel = message.channel
        if channel is not self._channel:
            return
        try:  # no I/O here: the coalescing writer sends the frame
            if ack:
                self._writer.write(ack_frame(channel.channel_id, message.delivery_tag))
            else:
                channel.basic_reject(message.delivery_tag, requeue=True)
        except Exception as exc:  # the reader notices the dead connection
            log.warning("could not settle message: %s", exc)
