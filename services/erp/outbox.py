"""The transactional outbox of the erp service: events written in the posting's transaction.

Publishing after the commit could lose the event (crash in between) and
publishing before it could announce a posting that then rolls back. So the
worker inserts the event into RB_OUTBOX with its effect, in one transaction
of the legacy database, and a relay publishes committed rows with the
confirming publisher and marks them sent after the broker confirmed: never
an effect without its event, never an event without its effect. A crash
between confirm and mark re-sends, which consumers absorb by idempotencykey.

An event the broker returns as unroutable (no queue bound: a subscriber's
binding or queue was removed, or the setup step that declares them has not
run) is not sent: it stays unsent, is retried with growing delay, and raises
the alert `retailbus_outbox_unroutable_events` until a queue takes it.
"""
from __future__ import annotations

import logging
import random
import threading
from datetime import datetime, timezone

from nameko.extensions import DependencyProvider
from prometheus_client import Counter, Gauge
from sqlalchemy import Column, Index, Integer, MetaData, String, Table, Text, bindparam, delete, select, update

from contracts.envelope import CloudEvent
from legacy_wrappers.legacy_db import LegacyEngines, commit_off_hub, create_tables
from legacy_wrappers.prepared import Prepared
from bus import topology
from bus.extensions import BusConnection
from bus.publisher import OutgoingMessage, UnroutableError

log = logging.getLogger(__name__)

RELAYED = Counter("retailbus_outbox_relayed_total",
                  "Outbox events relayed to the broker, by outcome (confirmed, unroutable, failed; unrouted: a "
                  "notice no queue takes, dropped)",
                  ["exchange", "outcome"])
UNROUTABLE = Gauge("retailbus_outbox_unroutable_events",
                   "Events of the last relay round that no queue took: kept unsent and retried (alert when > 0)",
                   ["exchange"])
MAX_BACKOFF = 30.0  # seconds between relay rounds while the broker refuses events

metadata = MetaData()
OUTBOX = Table(
    "RB_OUTBOX", metadata,
    Column("ID", Integer, primary_key=True, autoincrement=True),
    Column("EVENT_ID", String(40), nullable=False),
    Column("TYPE", String(80), nullable=False),             # the routing key: the type, or a type.<topic>
    Column("CORRELATION_ID", String(200)),
    Column("BODY", Text, nullable=False),
    Column("CREATED_TS", String(32), nullable=False),
    Column("SENT_TS", String(32)),
    Index("IX_RB_OUTBOX_UNSENT", "SENT_TS", "ID"),
)
# Built once: building a Core statement costs more than running it.
_INSERT = Prepared(OUTBOX.insert())
_MARK_SENT = update(OUTBOX).where(OUTBOX.c.ID.in_(bindparam("ids", expanding=True))).values(SENT_TS=bindparam("now"))
_UNSENT = (select(OUTBOX.c.ID, OUTBOX.c.EVENT_ID, OUTBOX.c.TYPE, OUTBOX.c.CORRELATION_ID, OUTBOX.c.BODY)
           .where(OUTBOX.c.SENT_TS.is_(None)).order_by(OUTBOX.c.ID).limit(bindparam("batch")))


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


def insert(events: list[CloudEvent], routing_keys: list[str] | None = None) -> tuple[Prepared, list[dict]]:
    """The statement that queues `events` in the caller's transaction (they leave once
    it commits), for the caller to run with its own (`run_together`). `routing_keys`:
    one per event where it is not the event's type (`TYPE` holds the routing key)."""
    now = _now()
    keys = routing_keys or [e.type for e in events]
    return _INSERT, [dict(EVENT_ID=e.id, TYPE=key, CORRELATION_ID=e.correlationid,
                          BODY=e.to_json().decode(), CREATED_TS=now) for e, key in zip(events, keys)]


def prune_sent(engine, older_than: datetime, limit: int) -> int:
    """Delete up to `limit` rows sent before `older_than` (unsent rows always stay); returns how many."""
    c = OUTBOX.c
    with engine.connect() as conn:
        tx = conn.begin()
        ids = conn.execute(select(c.ID).where(c.SENT_TS.is_not(None), c.SENT_TS < older_than.isoformat())
                           .order_by(c.SENT_TS).limit(limit)).scalars().all()
        if ids:
            conn.execute(delete(OUTBOX).where(c.ID.in_(ids)))
        commit_off_hub(tx)
    return len(ids)


class _Writer:
    """Knows nothing of its worker context: that would be a reference cycle per message
    (context -> service -> this -> context), left to the cyclic collector."""

    def __init__(self):
        self.used = False

    def added(self) -> None:
        """This worker's effect added events (`add`, in its transaction): wake the
        relay once the worker has ended."""
        self.used = True


class Outbox(DependencyProvider):
    """`insert(events)` run in a worker's transaction, then `self.outbox.added()`; a relay thread publishes.

    The relay is woken when a worker that added events has ended (its
    transaction is then committed) and polls every `interval` seconds for
    rows left by a crash or a failed publish.
    """

    bus = BusConnection()
    engines = LegacyEngines()

    def __init__(self, config_key: str = "LEGACY_DB_URI", batch: int = 500, interval: float = 1.0,
                 notices: tuple[str, ...] = ()):
        """`notices`: event types told to whoever listens, with no subscriber in this estate
        necessarily: one no queue takes is counted (`unrouted`) and marked sent, not kept."""
        self.config_key = config_key
        self.notices = frozenset(notices)
        self.batch = batch
        self.interval = interval
        self._writers: dict = {}
        self._wake = threading.Event()
        self._halt = threading.Event()
        self._running = False

    def setup(self):
        self.exchange = topology.events_exchange(self.container.service_name)
        self.bus.register_exchange(self.exchange)
        self.engine = self.engines.engine(self.config_key)

    def start(self):
        self._running = True
        self._halt.clear()
        self._thread = self.container.spawn_managed_thread(self._relay, identifier="outbox_relay")

    def stop(self):
        self._running = False
        self._halt.set()
        self._wake.set()
        self._thread.wait()

    def kill(self):
        self._running = False
        self._thread.kill()

    def get_dependency(self, worker_ctx):
        writer = self._writers[worker_ctx] = _Writer()
        return writer

    def worker_teardown(self, worker_ctx):
        writer = self._writers.pop(worker_ctx, None)
        if writer is not None and writer.used:  # teardown follows every worker_result: committed by now
            self._wake.set()

    def _relay(self):
        created, failures = False, 0
        while self._running:
            # after a failed round, a new posting does not cut the backoff short
            if failures:
                self._halt.wait(min(MAX_BACKOFF, self.interval * 2 ** failures) * random.uniform(0.5, 1))
            else:
                self._wake.wait(self.interval)
            self._wake.clear()
            try:
                if not created:  # a fresh legacy DB has no RB_OUTBOX until the first posting
                    create_tables(self.engine, metadata)
                    created = True
                while self._running and self.relay_once() == self.batch:
                    pass
                failures = 0
            except Exception as exc:  # database or broker away, or no queue bound: rows stay
                failures = min(failures + 1, 16)
                log.warning("outbox relay failed (round %d): %s", failures, exc)

    def relay_once(self) -> int:
        """Publish up to `batch` unsent rows; returns how many were read."""
        with self.engine.connect() as conn:
            rows = conn.execute(_UNSENT, {"batch": self.batch}).all()
            conn.rollback()
        if not rows:
            return 0
        messages = [OutgoingMessage(exchange=self.exchange, routing_key=r.TYPE, body=r.BODY.encode(),
                                    message_id=r.EVENT_ID, correlation_id=r.CORRELATION_ID, type=r.TYPE)
                    for r in rows]
        results = self.bus.publisher.publish_many(messages)
        done, unroutable = [], 0
        for row, error in zip(rows, results):
            if error is None:
                RELAYED.labels(self.exchange, "confirmed").inc()
                done.append(row.ID)
            elif isinstance(error, UnroutableError) and row.TYPE in self.notices:
                RELAYED.labels(self.exchange, "unrouted").inc()
                done.append(row.ID)
            elif isinstance(error, UnroutableError):
                # No queue took it (a binding or queue removed, setup not run): marking it
                # sent would lose it for every subscriber. It stays, and ops are told.
                unroutable += 1
                RELAYED.labels(self.exchange, "unroutable").inc()
                log.error("%s was not routed to any queue; kept and retried: %s", row.TYPE, error,
                          extra={"id": row.EVENT_ID, "correlationid": row.CORRELATION_ID})
            else:
                RELAYED.labels(self.exchange, "failed").inc()
        UNROUTABLE.labels(self.exchange).set(unroutable)
        if done:
            with self.engine.connect() as conn:
                tx = conn.begin()
                conn.execute(_MARK_SENT, {"ids": done, "now": _now()})  # one statement, not one per row
                commit_off_hub(tx)
        if len(done) < len(rows):
            raise RuntimeError(f"{len(rows) - len(done)} events not confirmed "
                               f"({unroutable} unroutable); retrying")
        return len(rows)
