"""`BatchedWrites`: the writes of many workers in one transaction and one commit.

A commit is an fsync (SQLite `synchronous=FULL`, PostgreSQL's WAL flush) and
every statement a round trip or a pass through SQLAlchemy, so one transaction
per message caps a process at a few hundred postings a second whatever the
CPU could do. Here a worker hands its items over (`self.postings(items)`) and
waits; one writer greenthread takes every item waiting (up to `max_batch`),
runs `write_many(conn, items)` in one transaction (set-based: one statement
per table for the whole batch), commits without stopping the hub (so it goes
on reading and validating the next messages during the fsync:
`commit_off_hub`) and wakes each worker with its items' results. A worker
returns only once its items are durable, so their messages are acked only then.

A batch that fails (one item's bad value, a deadlock, a constraint) is
rolled back and its items are written again one by one, each in a
savepoint: a bad item fails alone, with its own error, and the others
commit. A failed commit fails every item it held; their workers raise and
their messages are retried, which the inbox makes safe.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

from eventlet.event import Event
from eventlet.queue import LightQueue
from nameko.extensions import DependencyProvider
from sqlalchemy.engine import Connection, Engine

from legacy_wrappers.legacy_db import LegacyEngines, commit_off_hub

log = logging.getLogger(__name__)

WriteMany = Callable[[Connection, list], list]
_STOP = object()


def write_batch(engine: Engine, write_many: WriteMany, items: list) -> list[Any]:
    """Results of `write_many` per item, committed; an item's exception in its place."""
    with engine.connect() as conn:
        tx = conn.begin()
        try:
            results = write_many(conn, items)
        except Exception as exc:
            tx.rollback()
            if len(items) == 1:
                return [exc]
            log.warning("a batch of %d writes failed (%s); writing them one by one", len(items), exc)
            return _one_by_one(conn, write_many, items)
        return _commit(tx, results)


def _one_by_one(conn: Connection, write_many: WriteMany, items: list) -> list[Any]:
    tx = conn.begin()
    results = []
    for item in items:
        savepoint = conn.begin_nested()
        try:
            results.append(write_many(conn, [item])[0])
            savepoint.commit()
        except Exception as exc:
            savepoint.rollback()
            results.append(exc)
    return _commit(tx, results)


def _commit(tx, results: list) -> list[Any]:
    try:
        commit_off_hub(tx)
    except Exception as exc:
        log.error("commit of %d writes failed; they are retried: %s", len(results), exc)
        return [exc] * len(results)
    return results


class BatchedWrites(DependencyProvider):
    """`self.<name>(items)` in a worker: `write_many([.., item, ..])`'s result for each
    item, durable when it returns; an item that failed has its error in its place."""

    engines = LegacyEngines()

    def __init__(self, write_many: WriteMany, config_key: str = "LEGACY_DB_URI", max_batch: int = 64):
        self.write_many = write_many
        self.config_key = config_key
        self.max_batch = max_batch
        self._queue: LightQueue = LightQueue()
        self._thread = None

    def setup(self):
        self.engine = self.engines.engine(self.config_key)

    def start(self):
        self._thread = self.container.spawn_managed_thread(self._writer, identifier="batched_writes")

    def stop(self):
        # Workers have ended before dependencies stop: nothing is waiting any more.
        self._queue.put((_STOP, None))
        self._thread.wait()

    def kill(self):
        if self._thread is not None:
            self._thread.kill()

    def get_dependency(self, worker_ctx):
        return self.submit

    def submit(self, items: list) -> list:
        waiting = []
        for item in items:
            done = Event()
            self._queue.put((item, done))
            waiting.append(done)
        return [done.wait() for done in waiting]

    def _writer(self):
        while True:
            batch = [self._queue.get()]
            while len(batch) < self.max_batch and self._queue.qsize():
                batch.append(self._queue.get_nowait())
            stop = any(item is _STOP for item, _ in batch)
            batch = [(item, done) for item, done in batch if item is not _STOP]
            if batch:
                try:
                    results = write_batch(self.engine, self.write_many, [item for item, _ in batch])
                except Exception as exc:  # no connection to the database at all
                    log.error("could not write a batch of %d: %s", len(batch), exc)
                    results = [exc] * len(batch)
                for (_, done), result in zip(batch, results):
                    done.send(result)
            if stop:
                return
