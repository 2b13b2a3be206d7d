"""`OutboxForwarder`: drains the store's outbox to the broker, in store order.

Each round publishes up to a window of the oldest unsent events with
pipelined confirms and marks sent only the confirmed prefix, so a failure
mid-batch resends from the first unconfirmed event (consumers are
idempotent; order is kept). While the broker is unreachable it backs off
with jitter; a restart resumes from the outbox, where confirmations stopped.
"""
from __future__ import annotations

import logging
import random

import eventlet
from eventlet.event import Event
from nameko.extensions import Extension

from routing.outbox import Outbox
from services.bus.extensions import BusConnection
from services.bus.publisher import OutgoingMessage
from services.bus import topology

log = logging.getLogger(__name__)

BATCH = 500


class OutboxForwarder(Extension):
    """Owns the forwarding loop of an outbox that the service opens in `setup`."""

    bus = BusConnection()

    def __init__(self, source_service: str = "store_agent"):
        self.exchange = topology.events_exchange(source_service)
        self.outbox: Outbox | None = None
        self._wake = Event()
        self._running = False

    def setup(self):
        self.bus.register_exchange(self.exchange)

    def attach(self, outbox: Outbox, user_id: str | None = None):
        self.outbox = outbox
        self.user_id = user_id

    def start(self):
        self._running = True
        self.container.spawn_managed_thread(self._run, identifier="outbox_forwarder")

    def stop(self):
        self._running = False
        self.wake()

    kill = stop

    def wake(self):
        if not self._wake.ready():
            self._wake.send(True)

    def _run(self):
        backoff = 0.1
        while self._running:
            if self.outbox is None:
                eventlet.sleep(0.1)
                continue
            entries = self.outbox.unsent(BATCH)
            if not entries:
                self._wake.wait(timeout=0.5)
                if self._wake.ready():
                    self._wake.reset()
                continue
            messages = [OutgoingMessage(self.exchange, e.type, e.body, message_id=e.event_id,
                                        type=e.type, user_id=self.user_id) for e in entries]
            results = self.bus.publisher.publish_many(messages)
            confirmed = []
            for entry, error in zip(entries, results):
                if error is not None:
                    break
                confirmed.append(entry.seq)
            self.outbox.mark_sent(confirmed)
            failed = len(entries) - len(confirmed)
            if failed:
                error = next(e for e in results if e is not None)
                log.warning("forwarded %d, %d unconfirmed (%s); retrying in %.1fs",
                            len(confirmed), failed, error, backoff)
                eventlet.sleep(backoff * (0.5 + random.random()))
                backoff = min(backoff * 2, 15.0)
            else:
                backoff = 0.1
