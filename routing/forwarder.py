"""`OutboxForwarder`: drains the store's outbox to the broker, in store order.

Each round publishes up to BATCH of the oldest unsent events with pipelined
confirms (`mandatory`, persistent) and marks sent only the confirmed prefix,
so a failure mid-batch resends from the first unconfirmed event (consumers
are idempotent) and a restart resumes exactly where confirmations stopped.
The first event of a round goes alone: it (re)opens the connection, so the
rest never race to reconnect and a dead uplink costs one attempt, not BATCH.

A pybreaker breaker guards the uplink: after `FAIL_MAX` failed rounds it
opens and rounds are skipped until `RESET_SECONDS` pass, then one trial
round decides. Between failed rounds the forwarder sleeps with exponential
backoff and full jitter, so stores coming back after a WAN outage do not
reconnect in step.

The forwarder has its own publisher (one attempt per publish: a retried
publish could overtake a later one) that sets AMQP `user_id` to the user of
its connection, so a consumer can trust which store sent a message when the
store has its own broker user (`retailbus agent broker-user`). Every message
carries `x-retailbus-store` and `x-retailbus-store-seq` (its position among
the store's messages of its type) for ordering checks downstream.
"""
from __future__ import annotations

import logging
import random
import time
from urllib.parse import unquote, urlparse

import pybreaker
from eventlet.event import Event
from nameko.extensions import Extension
from prometheus_client import Counter

from legacy_wrappers.legacy_http import BreakerMetrics
from routing.outbox import Entry, Outbox, OutboxUnavailable
from bus import journal, topology
from bus.constants import H_STORE, H_STORE_SEQ
from bus.publisher import ConfirmingPublisher, OutgoingMessage, PublishError
from bus.retention import in_batches
from bus.settings import PublisherSettings, RetentionSettings

log = logging.getLogger(__name__)

BATCH = 500
FAIL_MAX = 3
RESET_SECONDS = 5.0
BACKOFF_BASE, BACKOFF_CAP = 0.2, 15.0
COMPACT_EVERY = 60.0  # a few small batches a minute keep up with a day's sales
CHECKPOINT_EVERY = 1.0
TILLS_ACTIVE_SECONDS = 1.0  # a sale accepted this recently: tills are selling (see _pace)

FORWARDED = Counter("retailbus_outbox_forwarded_total", "Outbox events published to the broker", ["store"])
CONFIRMED = Counter("retailbus_outbox_confirmed_total", "Outbox events confirmed by the broker", ["store"])


def backoff_delay(failures: int) -> float:
    """Exponential backoff with full jitter: uniform in [0, min(cap, base * 2^failures)]."""
    return random.uniform(0, min(BACKOFF_CAP, BACKOFF_BASE * 2 ** failures))


class OutboxForwarder(Extension):
    """Owns the forwarding loop of an outbox that the service opens in `setup`."""

    hop_journal = journal.Journal()  # sends the "forwarded" hops

    def __init__(self, source_service: str = "store_agent"):
        self.exchange = topology.events_exchange(source_service)
        self.outbox: Outbox | None = None
        self.store_id: str | None = None
        self.publisher: ConfirmingPublisher | None = None
        self.breaker = pybreaker.CircuitBreaker(fail_max=FAIL_MAX, reset_timeout=RESET_SECONDS,
                                                listeners=[BreakerMetrics("broker")])
        self.last_confirm: float | None = None
        self.retention = RetentionSettings()  # the service's `setup` sets RETAILBUS.retention
        self._wake = Event()
        self._stopped = Event()
        self._running = False

    def attach(self, outbox: Outbox, store_id: str, uri: str, pub: PublisherSettings):
        """Called by the service's `setup` with the store's outbox and broker URI."""
        self.outbox = outbox
        self.store_id = store_id
        self.user_id = unquote(urlparse(uri).username or "") or None
        self.publisher = ConfirmingPublisher(
            uri, window=pub.window, confirm_timeout=pub.confirm_timeout,
            connect_timeout=pub.connect_timeout, attempts=1,
            on_connect=lambda channel: topology.declare_exchange(channel, self.exchange))

    def start(self):
        self._running = True
        self.container.spawn_managed_thread(self._run, identifier="outbox_forwarder")

    def stop(self):
        self._running = False
        self.wake()
        if not self._stopped.ready():
            self._stopped.send(True)
        if self.publisher is not None:
            self.publisher.close()

    kill = stop

    def wake(self):
        if not self._wake.ready():
            self._wake.send(True)

    @property
    def breaker_state(self) -> str:
        return self.breaker.current_state

    def _idle(self, timeout: float):
        self._wake.wait(timeout=timeout)
        if self._wake.ready():
            self._wake = Event()

    def _run(self):
        failures, next_compaction, next_checkpoint = 0, 0.0, 0.0
        idle_since, truncated = time.monotonic(), False
        while self._running:
            if self.outbox is None:
                self._idle(0.1)
                continue
            try:
                if time.monotonic() >= next_checkpoint:
                    # idle long enough: the WAL is emptied, else it keeps its high-water size
                    truncate = not truncated and time.monotonic() - idle_since >= self.retention.wal_idle_seconds
                    self.outbox.checkpoint(truncate=truncate)
                    truncated = truncated or truncate
                    next_checkpoint = time.monotonic() + CHECKPOINT_EVERY
                if time.monotonic() >= next_compaction:
                    r = self.retention
                    in_batches("store_outbox", lambda n: self.outbox.compact(limit=n), r.batch, r.max_batches)
                    next_compaction = time.monotonic() + COMPACT_EVERY
                entries = self.outbox.unsent(BATCH)
                if not entries:
                    self._idle(CHECKPOINT_EVERY)
                    continue
                started = time.monotonic()
                idle_since, truncated = started, False
                self.breaker.call(self._forward, entries)
                failures = 0
                if started - self.outbox.last_accept < TILLS_ACTIVE_SECONDS:
                    self._pace(time.monotonic() - started)
            except (pybreaker.CircuitBreakerError, PublishError, OutboxUnavailable) as exc:
                delay = backoff_delay(failures)
                failures += 1
                log.warning("forwarding paused (%s, breaker %s); next try in %.2fs",
                            exc, self.breaker.current_state, delay)
                # new sales must not cut the backoff short: they would each cost a retry
                self._stopped.wait(timeout=delay)

    def _pace(self, seconds: float):
        """While tills are selling, a backlog (after a WAN outage) drains at half pace: each
        round is followed by a pause as long as it took. A round keeps the hub, the CPU and
        the broker busy, and a till's sale waits for its turn at each; the pauses are when
        it does not. Stopping cuts the pause short."""
        self._stopped.wait(timeout=seconds)

    def _message(self, entry: Entry) -> OutgoingMessage:
        headers = {H_STORE: self.store_id}
        if entry.stream_seq is not None:
            headers[H_STORE_SEQ] = entry.stream_seq
        return OutgoingMessage(self.exchange, entry.type, entry.body, message_id=entry.event_id,
                               type=entry.type, user_id=self.user_id, headers=headers)

    def _forward(self, entries: list[Entry]):
        """Publish, mark the confirmed prefix sent; raise the first failure (a breaker failure)."""
        messages = [self._message(e) for e in entries]
        sent = time.time()  # the hops are timed at the publish: the consumer may have them before the confirm
        FORWARDED.labels(self.store_id).inc(len(messages))
        try:
            self.publisher.publish(messages[0])
            results = [None] + (self.publisher.publish_many(messages[1:]) if len(messages) > 1 else [])
        except PublishError as exc:
            results = [exc]
        confirmed = []
        for entry, error in zip(entries, results):
            if error is not None:
                break
            confirmed.append(entry.seq)
        if confirmed:
            self.outbox.mark_sent(confirmed)
            self.last_confirm = time.time()
            where = {"store": self.store_id, "exchange": self.exchange}
            for entry in entries[:len(confirmed)]:
                journal.record("forwarded", id=entry.event_id, at=sent, detail=where)
            CONFIRMED.labels(self.store_id).inc(len(confirmed))
        error = next((e for e in results if e is not None), None)
        if error is not None:
            raise error
