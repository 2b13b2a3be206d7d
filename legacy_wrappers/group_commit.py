"""Group commit: many workers' effects made durable by one database commit.

A commit is an fsync (SQLite `synchronous=FULL`, PostgreSQL WAL flush): a
few milliseconds, so one transaction per worker caps a process at ~150
postings/s whatever the CPU could do. Here a process keeps ONE connection
per database with one open transaction; each worker's effect runs inside a
SAVEPOINT on it, released when the worker succeeded and rolled back when it
failed (so a failing worker never undoes a sibling's effect and leaves no
partial rows). A committer greenthread commits the outer transaction once
`delay` seconds passed since the first effect waiting for it, or `max_batch`
effects are waiting, and then wakes those workers; each worker ends (and
its message is acked) only after the commit that covers it. A failed commit
fails every worker it covered: their messages are retried, which the inbox
makes safe.

Savepoints nest on a connection, so two workers must never be inside one at
the same time: a worker holds the connection from its first statement to
its savepoint's end. That costs nothing here: the drivers (sqlite3, psycopg2
without psycogreen) block the one OS thread anyway, so database work never
overlapped; only the fsync is worth overlapping, and the commit runs in an
OS thread (eventlet.tpool) while other greenthreads parse and validate the
next messages.

A worker that only read also waits for the commit in flight: what it read
may be another worker's effect that is not durable yet, and it must not
answer with that before it is.
"""
from __future__ import annotations

import logging
import time

import eventlet
from eventlet import tpool
from eventlet.event import Event
from eventlet.semaphore import Semaphore
from sqlalchemy.engine import Connection, Engine

log = logging.getLogger(__name__)


class GroupCommit:
    """The one writing connection of a process to one database; see the module docstring."""

    def __init__(self, engine: Engine, spawn, delay: float = 0.002, max_batch: int = 64):
        self.engine, self.delay, self.max_batch = engine, delay, max_batch
        self._spawn = spawn  # container.spawn_managed_thread
        self._lock = Semaphore(1)  # whoever is inside a savepoint (or committing) holds it
        self._conn: Connection | None = None
        self._covered = Event()  # sent (None or the error) when the open transaction has ended
        self._waiting = 0  # effects released into the open transaction
        self._first = 0.0  # when the first of them was released
        self._work = Event()
        self._thread = None
        self.commits = 0

    # -- workers ------------------------------------------------------------

    def enter(self):
        """Take the connection and open a savepoint; returns (connection, savepoint)."""
        self._lock.acquire()
        try:
            if self._conn is None:
                self._conn = self.engine.connect()
            if not self._conn.in_transaction():
                self._conn.begin()
            return self._conn, self._conn.begin_nested()
        except Exception:
            self._discard()
            self._lock.release()
            raise

    def leave(self, savepoint, success: bool) -> Event | None:
        """Release (success) or roll back the savepoint and give the connection back.

        Returns the event the covering commit sends (None: committed, else the
        error), or None when the effect was rolled back. Raises when the
        savepoint itself could not be ended: the transaction is then given up,
        failing every effect it held.
        """
        try:
            if success:
                savepoint.commit()
            else:
                savepoint.rollback()
                if not self._waiting:  # nothing to commit: end the transaction, free the write lock
                    self._conn.rollback()
        except Exception as exc:
            self._abort(exc)
            self._lock.release()
            raise
        covered = None
        if success:
            covered = self._covered
            if not self._waiting:
                self._first = time.monotonic()
            self._waiting += 1
            self._start()
            if not self._work.ready():
                self._work.send(True)
        self._lock.release()
        return covered

    def run(self, fn):
        """`fn(conn)` as one effect, durable when this returns (raises if it is not)."""
        conn, savepoint = self.enter()
        try:
            result = fn(conn)
        except BaseException:
            self.leave(savepoint, success=False)
            raise
        error = self.leave(savepoint, success=True).wait()
        if error is not None:
            raise error
        return result

    # -- the committer --------------------------------------------------------

    def _start(self):
        if self._thread is None:
            self._thread = self._spawn(self._committer, identifier="group_commit")

    def _committer(self):
        while True:
            self._work.wait()
            self._work = Event()
            while self._waiting < self.max_batch:
                left = self._first + self.delay - time.monotonic()
                if left <= 0:
                    break
                eventlet.sleep(left)
            self.commit()

    def commit(self):
        """Commit the open transaction and wake the workers whose effects it holds."""
        with self._lock:
            if not self._waiting:
                return
            covered, self._covered, self._waiting = self._covered, Event(), 0
            try:
                tpool.execute(self._conn.commit)
                self.commits += 1
            except Exception as exc:
                log.error("group commit failed; its effects are retried: %s", exc)
                self._discard()
                covered.send(exc)
                return
            covered.send(None)

    def _abort(self, exc: Exception):
        covered, self._covered, self._waiting = self._covered, Event(), 0
        self._discard()
        covered.send(exc)

    def _discard(self):
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()  # rolls back what was not committed
            except Exception as exc:
                log.warning("could not close the legacy connection: %s", exc)

    def close(self):
        """Commit what is waiting, stop the committer and close the connection."""
        self.commit()
        if self._thread is not None:
            self._thread.kill()
            self._thread = None
        self._discard()
