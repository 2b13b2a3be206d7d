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
from services.journal import store


class JournalStore(DependencyProvider):
    """The journal database (RETAILBUS.journal.dsn)."""

    def setup(self):
        settings = container_settings(self.container.config)[1]
        self.engine = store.open_engine(settings.absolute_dsn(settings.journal.dsn))
        self.lock = Semaphore(1)

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


class JournalService:
    name = SERVICE

    store = JournalStore()
    metrics = MetricsHttp()

    @reliable_handler(SERVICE, HOPS_TYPE)
    def on_hops(self, batch: JournalHopsV1, event: CloudEvent):
        return self.store.write(batch, event)
