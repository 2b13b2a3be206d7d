"""The message journal, emitting side: every hop of a message, cheaply.

A hop (accepted at the agent, forwarded, consumed, retried, dead-lettered,
posted, read from or written to a batch file) is one small dict appended to
a bounded in-process buffer: microseconds, no I/O, never an error for the
business path. The process's `Journal` extension sends the buffer every
`flush_seconds` as `journal.hops.v1` messages of up to `batch` hops to
`journal.events` (confirmed, on a connection of its own, so the journal never
queues behind or blocks business publishes); the `journal` service stores
them and `retailbus trace` reads them. While the bus is away the buffer
keeps up to `buffer` hops; beyond that hops are dropped and counted in
`retailbus_journal_dropped_total`: tracing is best effort, the business path
is not.

Call sites use `record(...)` (plain function, anywhere in a process that runs
a Journal; a no-op elsewhere) or, inside a worker whose effect commits only
when the worker ends, the `JournalHops` dependency: its hops are recorded
only if the worker and its commit succeeded.
"""
from __future__ import annotations

import logging
import time
from collections import Counter as TallyCounter
from collections import deque
from datetime import datetime, timezone

import eventlet
from nameko.extensions import DependencyProvider, SharedExtension
from prometheus_client import Counter
from ulid import ULID

from contracts.envelope import AssembledEvent, CloudEvent
from contracts.journal import JournalHopsV1
from bus import topology
from bus.constants import EFFECT_ERRORS
from bus.extensions import container_settings
from bus.publisher import ConfirmingPublisher, OutgoingMessage, PublishError, UnroutableError

log = logging.getLogger(__name__)

HOPS_TYPE = JournalHopsV1.TYPE
SERVICE = "journal"
EXCHANGE = topology.events_exchange(SERVICE)
QUEUE = topology.handler_queue(SERVICE, HOPS_TYPE, SERVICE, "on_hops")

HOPS = Counter("retailbus_journal_hops_total", "Hops sent to the journal (counted per batch, off the "
               "business path)", ["hop", "outcome"])
DROPPED = Counter("retailbus_journal_dropped_total",
                  "Hops dropped: the journal buffer was full (bus away) or the journal refused them")


class _Buffer:
    """The process's hops not sent yet. Inactive (record is a no-op) until a
    Journal is set up in the process: the CLI and unit tests record nothing."""

    def __init__(self):
        self.hops: deque[dict] = deque()
        self.limit = 0

    def activate(self, limit: int):
        self.limit = max(self.limit, limit)


BUFFER = _Buffer()


def record(hop: str, outcome: str = "ok", *, id: str | None = None, correlationid: str | None = None,
           subject: str | None = None, detail: dict | None = None, items: list[dict] | None = None,
           file_rows: dict | None = None, at: float | None = None) -> None:
    """Note one hop. `items` (batch hops): one dict per row, {"key", "row", "refs"}; a chunk
    of file rows rather as `file_rows`, {"sha256", "runs", "names"} (contracts/journal.py)."""
    buffer = BUFFER
    if not buffer.limit:
        return
    if len(buffer.hops) >= buffer.limit:
        DROPPED.inc()
        return
    entry = {"hop": hop, "outcome": outcome, "time": at or time.time()}
    if id is not None:
        entry["id"] = id
    if correlationid is not None:
        entry["correlationid"] = correlationid
    if subject is not None:
        entry["subject"] = subject
    if detail:
        entry["detail"] = detail
    if items:
        entry["items"] = items
    if file_rows:
        entry["file_rows"] = file_rows
    buffer.hops.append(entry)


def handled(event: CloudEvent, queue: str, outcome: str, seconds: float) -> None:
    """A reliable handler settled `event` (ok, duplicate) after `seconds`: the hop is
    timed when the handler started, so it comes before what the handler did."""
    if event.type != HOPS_TYPE:  # the journal's own messages are not journaled
        record("consumed", outcome, id=event.id, correlationid=event.correlationid, subject=event.subject,
               detail={"queue": queue, "seconds": round(seconds, 4)}, at=time.time() - seconds)


def failed(properties: dict, queue: str, outcome: str, target: str, attempts: int, error: Exception) -> None:
    """A handler failed: the message went to a retry queue (retried) or its DLQ (dead_lettered)."""
    if properties.get("type") != HOPS_TYPE:
        record(outcome, "failed", id=properties.get("message_id"), correlationid=properties.get("correlation_id"),
               detail={"queue": queue, "to": target, "attempt": attempts,
                       "error": f"{type(error).__name__}: {error}"[:300]})


def hops_event(hops: list[dict], service: str) -> CloudEvent:
    """The envelope of one batch (no subject); assembled, not validated (every field is
    ours), the journal service validates it on arrival."""
    event_id = str(ULID())
    return AssembledEvent.model_construct(
        id=event_id, source=f"journal/{service}", type=HOPS_TYPE, time=datetime.now(timezone.utc),
        subject=None, data={"hops": hops}, correlationid=event_id, idempotencykey=f"journal:{event_id}")


class Journal(SharedExtension):
    """Sends the process's buffered hops to the journal, in batches, confirmed."""

    publisher: ConfirmingPublisher | None = None

    def setup(self):
        uri, settings = container_settings(self.container.config)
        self.settings, self.queue_type = settings.journal, settings.queue_type
        self._running = False
        if not self.settings.enabled:
            return
        BUFFER.activate(self.settings.buffer)
        pub = settings.publisher
        self.publisher = ConfirmingPublisher(
            uri, window=16, confirm_timeout=pub.confirm_timeout, connect_timeout=pub.connect_timeout,
            attempts=1, on_connect=self._declare)

    def _declare(self, channel):
        """The journal service's queue too: hops sent before it first started are kept."""
        topology.declare_handler_queues(channel, EXCHANGE, HOPS_TYPE, QUEUE, [], queue_type=self.queue_type)

    def start(self):
        if self.publisher is not None:
            self._running = True
            self._thread = self.container.spawn_managed_thread(self._run, identifier="journal")

    def stop(self):
        if self._running:
            self._running = False
            with eventlet.Timeout(2.0, False):  # a round waiting on a dead link must not hold the stop
                self._thread.wait()
            self._thread.kill()
            self.flush(timeout=2.0)  # the last hops, e.g. "written" of the final batch file
        if self.publisher is not None:
            self.publisher.close()

    def kill(self):
        self._running = False
        if self.publisher is not None:
            self.publisher.close()

    def _run(self):
        """Every `flush_seconds`; after a failed round, backing off up to 5 s."""
        delay = self.settings.flush_seconds
        while self._running:
            eventlet.sleep(delay)
            delay = self.settings.flush_seconds if self.flush() else min(5.0, delay * 2)

    def flush(self, timeout: float | None = None) -> bool:
        """Send what is buffered; False when the bus did not take it: a failed
        batch goes back to the front of the buffer for the next round."""
        hops = BUFFER.hops
        while hops:
            batch = [hops.popleft() for _ in range(min(len(hops), self.settings.batch))]
            event = hops_event(batch, self.container.service_name)
            message = OutgoingMessage(EXCHANGE, HOPS_TYPE, event.to_json(), message_id=event.id,
                                      correlation_id=event.correlationid, type=HOPS_TYPE)
            try:
                self.publisher.publish(message, timeout)
            except UnroutableError as exc:  # our own queue declaration makes this unexpected
                DROPPED.inc(len(batch))
                log.error("journal: %d hops dropped: %s", len(batch), exc)
                continue
            except PublishError as exc:
                hops.extendleft(reversed(batch))
                log.warning("journal: %d hops wait for the bus: %s", len(hops), exc)
                return False
            except BaseException:  # killed mid-round by stop(): they go in its last flush
                hops.extendleft(reversed(batch))
                raise
            for (hop, outcome), n in TallyCounter((h["hop"], h["outcome"]) for h in batch).items():
                HOPS.labels(hop, outcome).inc(n)
        return True


class _WorkerHops:
    """Holds the worker's list and context data, not the worker context: the context
    holds the service instance, which holds this, and such a cycle per message left
    every message's objects to the cyclic collector (~35 objects a sale; collections
    of 30-100 ms in the erp)."""

    def __init__(self, pending: list, data: dict):
        self._pending, self._data = pending, data

    def add(self, hop: str, outcome: str = "ok", **fields) -> None:
        """A hop of this worker's message; recorded once the worker's effect is committed."""
        fields.setdefault("id", self._data.get("event_id"))
        fields.setdefault("correlationid", self._data.get("correlation_id"))
        fields.setdefault("at", time.time())
        self._pending.append((hop, outcome, fields))


class JournalHops(DependencyProvider):
    """`self.hops.add("posted", subject=..., detail=...)`: a hop that counts only if the
    worker succeeds and the effects its dependencies commit in `worker_result` did."""

    journal = Journal()

    def setup(self):
        self.pending: dict = {}

    def get_dependency(self, worker_ctx):
        return _WorkerHops(self.pending.setdefault(worker_ctx, []), worker_ctx.data)

    def worker_result(self, worker_ctx, result=None, exc_info=None):
        if exc_info is not None:
            self.pending.pop(worker_ctx, None)

    def worker_teardown(self, worker_ctx):
        hops = self.pending.pop(worker_ctx, None)
        if hops and not getattr(worker_ctx, EFFECT_ERRORS, None):
            for hop, outcome, fields in hops:
                record(hop, outcome, **fields)
