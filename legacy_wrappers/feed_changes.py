"""`feed_changes`: a SaaS platform's change feed, polled by a persisted cursor, as an entrypoint.

The estate's platforms (the CRM, the loyalty platform) list every change of a
record in order (`GET /changes?after=SEQ&limit=N`: `seq`, record `id`, `by`
(the API client that made it), `at`, the record as it then was). This reads
the changes after the cursor in batches, hands each batch to a worker and
moves the cursor (stored in `RB_FEED_CURSOR`, in the database `config_key`
names) only once that worker has fully succeeded: a crash or a restart
repeats a batch but never skips one (at-least-once; the changes' `seq` makes
a key a consumer deduplicates by). A failing batch comes again after a backoff
that doubles from `interval` to `max_backoff`; the platform being away is
logged once when it starts and once when it ends.

The platform is `RETAILBUS.<settings_attr>.http` of bus.yaml, called through
`JsonHttpClient` (timeouts, breaker, `X-Api-Client`).
"""
from __future__ import annotations

import logging
import threading
from datetime import datetime, timezone
from functools import partial

import eventlet
from eventlet.event import Event
from nameko.extensions import Entrypoint
from prometheus_client import Counter, Gauge
from sqlalchemy import Column, Integer, MetaData, String, Table, select, update

from bus.constants import EFFECT_ERRORS
from bus.settings import retailbus_settings
from legacy_wrappers.json_http import JsonHttpClient
from legacy_wrappers.legacy_db import LegacyEngines, create_tables
from legacy_wrappers.legacy_http import LegacyHttpClient

log = logging.getLogger(__name__)

CHANGES = Counter("retailbus_feed_changes_total", "Changes read from a platform's change feed and handed on, "
                  "by outcome (ok, failed)", ["feed", "outcome"])
FAILING = Gauge("retailbus_feed_failing", "1 while reading a platform's change feed keeps failing", ["feed"])

metadata = MetaData()
CURSORS = Table(
    "RB_FEED_CURSOR", metadata,
    Column("NAME", String(200), primary_key=True),
    Column("SEQ", Integer, nullable=False),
    Column("SAVED_TS", String(40), nullable=False),
)


class FeedChanges(Entrypoint):
    engines = LegacyEngines()

    def __init__(self, settings_attr: str, config_key: str, path: str = "/changes", batch: int = 500,
                 interval: float = 0.5, max_backoff: float = 30.0, timeout: float = 5.0, **kwargs):
        self.settings_attr, self.config_key, self.path = settings_attr, config_key, path
        self.batch, self.interval, self.max_backoff, self.timeout = batch, interval, max_backoff, timeout
        self.cursor: int | None = None
        self.failures = 0
        self._running = False
        self._wake = threading.Event()
        super().__init__(**kwargs)

    def setup(self):
        settings = retailbus_settings(self.container.config)
        address = getattr(settings, self.settings_attr).http
        self.client = JsonHttpClient(LegacyHttpClient(f"http://{address}", self.timeout,
                                                      system=f"{self.settings_attr}_feed"))
        self.engine = self.engines.engine(self.config_key)
        self.name = f"{self.container.service_name}.{self.method_name}"
        FAILING.labels(self.name).set(0)

    def start(self):
        self._running = True
        self._thread = self.container.spawn_managed_thread(self._run, identifier=f"feed_changes:{self.name}")

    def stop(self):
        self._running = False
        self._wake.set()
        self._thread.wait()

    def kill(self):
        self._running = False
        self._thread.kill()

    def _run(self):
        while self._running:
            try:
                if self.cursor is None:
                    self.cursor = self._load()
                read = self.poll_once()
                if self.failures:
                    log.info("change feed %s works again after %d failed rounds", self.name, self.failures)
                    FAILING.labels(self.name).set(0)
                    self.failures = 0
            except Exception as exc:  # the platform or the database away; the worker failed
                self.failures += 1
                if self.failures == 1:
                    FAILING.labels(self.name).set(1)
                    log.warning("change feed %s is failing (%s: %s); retrying with backoff up to %gs",
                                self.name, type(exc).__name__, exc, self.max_backoff)
                read = 0
            if read == self.batch and not self.failures:
                continue
            delay = min(self.max_backoff, self.interval * 2 ** min(self.failures, 30)) if self.failures \
                else self.interval
            self._wake.wait(delay)
            self._wake.clear()

    def poll_once(self) -> int:
        """Hand the next batch after the cursor to a worker; the number of changes read."""
        changes = self.client.call("GET", f"{self.path}?after={self.cursor}&limit={self.batch}")["changes"]
        if not changes:
            return 0
        error = self._handle(changes)
        if error is not None:
            CHANGES.labels(self.name, "failed").inc(len(changes))
            raise RuntimeError(f"a batch of {len(changes)} changes failed: {error}")
        CHANGES.labels(self.name, "ok").inc(len(changes))
        self._save(changes[-1]["seq"])
        return len(changes)

    def _handle(self, changes: list[dict]) -> str | None:
        done = Event()
        self.container.spawn_worker(self, (changes,), {}, handle_result=partial(self._result, done))
        return done.wait()

    def _result(self, done: Event, worker_ctx, result, exc_info):
        # As table_changes: the effects commit after this hook; decide once the worker has ended.
        def finished(_thread):
            effect_errors = getattr(worker_ctx, EFFECT_ERRORS, None)
            if exc_info is not None:
                done.send(f"{exc_info[0].__name__}: {exc_info[1]}")
            elif effect_errors:
                done.send(f"its effect did not commit: {effect_errors[0]}")
            else:
                done.send(None)
        eventlet.getcurrent().link(finished)
        return result, exc_info

    def _load(self) -> int:
        create_tables(self.engine, metadata)
        with self.engine.connect() as conn:
            seq = conn.execute(select(CURSORS.c.SEQ).where(CURSORS.c.NAME == self.name)).scalar()
            conn.rollback()
        return seq or 0

    def _save(self, seq: int) -> None:
        now = datetime.now(timezone.utc).isoformat()
        with self.engine.begin() as conn:
            if not conn.execute(update(CURSORS).where(CURSORS.c.NAME == self.name).values(SEQ=seq, SAVED_TS=now)
                                ).rowcount:
                conn.execute(CURSORS.insert().values(NAME=self.name, SEQ=seq, SAVED_TS=now))
        self.cursor = seq


feed_changes = FeedChanges.decorator
