"""`ProcessDatabase`: a process service's database, and the relay of its outbox.

Shared by every process manager of a container using the same database (one SQLite
connection per process, one relay). The relay publishes the rows a committed
transition queued (RB_PROCESS_OUTBOX) with the container's confirming publisher and
marks them sent once confirmed, without waiting for the disk: a crash in between, or a
power cut losing the marks, sends them again, which the receivers absorb by the
idempotency key. It is woken when a transition committed and
polls every `interval` seconds besides. A row the broker returns as unroutable (the
receiving service has never bound its queue, or no workbench yet for cases) waits
and is tried again with growing delay (up to 30 s) without holding back the rows
behind it; `retailbus_process_outbox_unroutable` counts them.
"""
from __future__ import annotations

import logging
import random
import threading
import time

from eventlet.semaphore import Semaphore
from nameko.extensions import SharedExtension
from prometheus_client import Counter, Gauge
from sqlalchemy import MetaData, bindparam, select, update

from bus.extensions import BusConnection
from bus.process import store
from bus.process.sql import Compiled
from bus.publisher import OutgoingMessage, UnroutableError

log = logging.getLogger(__name__)

RELAYED = Counter("retailbus_process_outbox_relayed_total", "Process outbox messages relayed, by outcome "
                  "(confirmed, unroutable, failed)", ["outcome"])
UNROUTABLE = Gauge("retailbus_process_outbox_unroutable", "Process outbox messages no queue took in the last "
                   "round: kept and retried (alert when > 0 for long)")
MAX_DELAY = 30.0
O = store.OUTBOX.c
_UNSENT = Compiled(select(O.ID, O.EVENT_ID, O.EXCHANGE, O.ROUTING_KEY, O.CORRELATION_ID, O.BODY, O.ATTEMPTS)
                   .where(O.SENT_TS.is_(None), O.NEXT_AT <= bindparam("now")).order_by(O.ID).limit(bindparam("batch")))
_MARK_SENT = update(store.OUTBOX).where(O.ID.in_(bindparam("ids", expanding=True))).values(SENT_TS=bindparam("at"))
_MARK_ONE_SENT = Compiled(update(store.OUTBOX).where(O.ID == bindparam("id")).values(SENT_TS=bindparam("at")))
_DEFER = update(store.OUTBOX).where(O.ID == bindparam("id")).values(NEXT_AT=bindparam("next_at"),
                                                                     ATTEMPTS=bindparam("attempts"))


class ProcessDatabase(SharedExtension):
    """The engine of the DSN at config key `config_key`, its tables, and the outbox relay."""

    bus = BusConnection()

    def __init__(self, config_key: str, batch: int = 200, interval: float = 1.0):
        self.config_key, self.batch, self.interval = config_key, batch, interval
        self.tables: list[MetaData] = []
        self._wake, self._halt = threading.Event(), threading.Event()
        self._running = False
        self._thread = None
        self._created = False
        self._lock = Semaphore(1)

    @property
    def sharing_key(self):
        return type(self), self.config_key

    def setup(self):
        dsn = self.container.config.get(self.config_key)
        if not dsn:
            raise ValueError(f"{self.config_key} is not set in the service config")
        self.engine = store.open_engine(dsn)

    def ready(self):
        """The engine, its tables created on first use (extensions are set up side by side,
        so only then has every process manager of the container named its tables)."""
        if not self._created:
            with self._lock:
                if not self._created:
                    store.create(self.engine, *self.tables)
                    self._created = True
        return self.engine

    def start(self):
        self._running = True
        self._thread = self.container.spawn_managed_thread(self._relay, identifier="process_outbox_relay")

    def stop(self):
        self._running = False
        self._halt.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.wait()
        self.engine.dispose()

    def kill(self):
        self._running = False
        if self._thread is not None:
            self._thread.kill()

    def wake(self) -> None:
        self._wake.set()

    def _relay(self):
        failures = 0
        while self._running:
            if failures:
                self._halt.wait(min(MAX_DELAY, self.interval * 2 ** failures) * random.uniform(0.5, 1))
            else:
                self._wake.wait(self.interval)
            self._wake.clear()
            try:
                while self._running and self.relay_once() == self.batch:
                    pass
                failures = 0
            except Exception as exc:  # database or broker away: the rows stay
                failures = min(failures + 1, 16)
                log.warning("process outbox relay failed (round %d): %s", failures, exc)

    def relay_once(self) -> int:
        """Publish up to `batch` rows due; returns how many were read."""
        now = time.time()
        with self.ready().connect() as conn:  # a read on the driver's cursor: no transaction, no write lock
            rows = _UNSENT.cursor(conn, {"now": now, "batch": self.batch}).fetchall()
        if not rows:
            return 0
        results = self.bus.publisher.publish_many([
            OutgoingMessage(exchange=exchange, routing_key=routing_key, body=body.encode(), message_id=event_id,
                            correlation_id=correlation_id, type=routing_key)
            for _, event_id, exchange, routing_key, correlation_id, body, _ in rows])
        done, deferred, failed = [], [], 0
        for (row_id, event_id, exchange, routing_key, correlation_id, _, attempts), error in zip(rows, results):
            if error is None:
                done.append(row_id)
            elif isinstance(error, UnroutableError):
                deferred.append({"id": row_id, "attempts": attempts + 1,
                                 "next_at": now + min(MAX_DELAY, 2 ** attempts)})
                log.error("%s to %s was not routed to any queue; kept and retried", routing_key, exchange,
                          extra={"id": event_id, "correlationid": correlation_id})
            else:
                failed += 1
        RELAYED.labels("confirmed").inc(len(done))
        RELAYED.labels("unroutable").inc(len(deferred))
        RELAYED.labels("failed").inc(failed)
        UNROUTABLE.set(len(deferred))
        if done or deferred:  # a mark lost in a power cut sends its row again: no need to wait for the disk
            with store.transaction(self.engine, durable=False) as conn:
                if done and conn.dialect.name == "sqlite":  # on the driver's cursor, no round trips to save
                    at = store.now_iso()
                    _MARK_ONE_SENT.many(conn, [{"id": row_id, "at": at} for row_id in done])
                elif done:
                    conn.execute(_MARK_SENT, {"ids": done, "at": store.now_iso()})
                if deferred:
                    conn.execute(_DEFER, deferred)
        if failed:
            raise RuntimeError(f"{failed} process messages not confirmed; retrying")
        return len(rows)
