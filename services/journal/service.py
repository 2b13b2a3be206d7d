"""The `journal` service: stores the hop batches every process sends.

A batch is written once (its key is claimed in the journal database's own
inbox in the same transaction), so a redelivered batch adds nothing.
Writes are serialised: one SQLite writer at a time, batches are large.
"""
from __future__ import annotations

from eventlet.semaphore import Semaphore
from nameko.extensions import DependencyProvider

from contracts.envelope import CloudEvent
from contracts.journal import JournalHopsV1
from legacy_wrappers import inbox
from bus.consumer import reliable_handler
from bus.extensions import container_settings
from bus.journal import HOPS_TYPE, SERVICE
from bus.metrics_http import MetricsHttp
from bus.retention import before, in_batches, retention_timer
from services.journal import store


class JournalStore(DependencyProvider):
    """The journal database (RETAILBUS.journal.dsn)."""

    def setup(self):
        settings = container_settings(self.container.config)[1]
        self.engine = store.open_engine(settings.absolute_dsn(settings.journal.dsn))
        self.lock = Semaphore(1)
        self.retention = settings.retention

    def stop(self):
        self.engine.dispose()

    kill = stop

    def write(self, batch: JournalHopsV1, event: CloudEvent):
        service = event.source.removeprefix("journal/")
        with self.lock:
            return inbox.apply_once(self.engine, store.CONSUMER, event,
                                    lambda conn: store.write(conn, batch, service))

    def get_dependency(self, worker_ctx):
        return self

    def _locked(self, fn, *args):
        with self.lock:  # between two batches of hops, never inside one
            return fn(*args)

    def prune(self) -> dict[str, int]:
        """Hops past their days, then the oldest while over the size cap; the inbox's keys."""
        r = self.retention
        aged = in_batches("journal_hops", lambda n: self._locked(
            store.prune, self.engine, before(r.journal_days).timestamp(), n), r.batch, r.max_batches)
        capped = 0
        if store.used_bytes(self.engine) > r.journal_max_mb * 2 ** 20:
            capped = in_batches("journal_hops_over_size", lambda n: self._locked(store.prune, self.engine, None, n),
                                r.batch, r.max_batches)
        keys = in_batches("journal_inbox", lambda n: self._locked(
            inbox.prune, self.engine, before(r.inbox_days), n), r.batch, r.max_batches)
        return {"journal_hops": aged, "journal_hops_over_size": capped, "journal_inbox": keys}


class JournalService:
    name = SERVICE

    store = JournalStore()
    metrics = MetricsHttp()

    @retention_timer()
    def prune(self) -> dict[str, int]:
        return self.store.prune()

    @reliable_handler(SERVICE, HOPS_TYPE)
    def on_hops(self, batch: JournalHopsV1, event: CloudEvent):
        return self.store.write(batch, event)
