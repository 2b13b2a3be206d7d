"""The store's durable outbox: a sale is acknowledged to the POS only once it
is committed here, so the store keeps selling while the WAN or the broker is
down and nothing accepted is lost.

SQLite in WAL mode with `synchronous=FULL`: a commit survives a kill -9 and a
power cut. One fsync costs milliseconds, so writes are grouped: callers queue
their work and wait on their own event; one committer greenthread takes
everything queued, runs it as ONE transaction in a real OS thread (eventlet
tpool, so the hub keeps accepting POS calls during the fsync) and wakes them
all. Under load many accepts share one fsync; alone, one accept is one commit.
Each caller's work runs in its own savepoint: its failure (a conflict, a
reused event id, any exception) is rolled back and answered to that caller
alone, and the others in the group still commit. Only a failure of the
transaction itself (disk full, locked) fails the whole group. The committer
survives any exception and always wakes its callers.

Every row gets `stream_seq`, its position among the store's messages of its
type (1, 2, 3 ... without gaps), stamped by the single committer: downstream
it travels as the AMQP header `x-retailbus-store-seq`. Sent rows are kept
`retention_days` for reconciliation and replay, then compacted; unsent rows
are never deleted.
"""
from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
import time
from collections import deque
from dataclasses import dataclass
from itertools import takewhile
from pathlib import Path

import eventlet
from eventlet import tpool
from eventlet.event import Event
from eventlet.semaphore import Semaphore

from contracts.errors import RetailbusError
from contracts.envelope import CloudEvent
from routing import control_totals

SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id    TEXT NOT NULL UNIQUE,
    idem_key    TEXT NOT NULL UNIQUE,
    type        TEXT NOT NULL,
    body        BLOB NOT NULL,
    accepted_at REAL NOT NULL,
    sent_at     REAL
);
CREATE INDEX IF NOT EXISTS outbox_unsent ON outbox (seq) WHERE sent_at IS NULL;
"""
# Columns added after the first release: existing outboxes are migrated on open.
COLUMNS = {"payload_hash": "TEXT", "stream_seq": "INTEGER"}
MAX_GROUP = 512

log = logging.getLogger(__name__)


class OutboxUnavailable(RetailbusError):
    """The outbox could not commit (disk full, read-only, locked): the POS must retry."""


class OutboxConflict(RetailbusError):
    """The idempotency key was accepted before with a different payload."""

    def __init__(self, idem_key: str, first_event_id: str):
        super().__init__(f"{idem_key} was already accepted with different content (REF {first_event_id})")
        self.idem_key = idem_key
        self.first_event_id = first_event_id


class EventIdReusedError(RetailbusError):
    """A new event (new idempotency key) carries the id of another event already in the outbox."""

    def __init__(self, event_id: str, idem_key: str):
        super().__init__(f"event id {event_id} is already taken by {idem_key}")
        self.event_id = event_id
        self.idem_key = idem_key


@dataclass(frozen=True)
class Accepted:
    event_id: str
    duplicate: bool


@dataclass(frozen=True)
class Entry:
    seq: int
    event_id: str
    type: str
    body: bytes
    stream_seq: int | None = None


def payload_hash(event: CloudEvent) -> str:
    """What makes a retry identical: the business payload, canonically serialised."""
    return hashlib.sha256(json.dumps(event.data, sort_keys=True, default=str).encode()).hexdigest()


def _runs(seqs: list[int]) -> list[tuple[int, int]]:
    """(first, last) of each run of consecutive numbers in `seqs`: [1, 2, 3, 7] -> [(1, 3), (7, 7)]."""
    runs: list[list[int]] = []
    for seq in sorted(set(seqs)):
        if runs and seq == runs[-1][1] + 1:
            runs[-1][1] = seq
        else:
            runs.append([seq, seq])
    return [(low, high) for low, high in runs]


def _connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("PRAGMA busy_timeout=5000")
    return db


class _Work:
    """One queued write; `apply(db)` runs inside the group's transaction."""

    __slots__ = ("apply", "done", "result", "error")

    def __init__(self, apply):
        self.apply = apply
        self.done = Event()
        self.result = None
        self.error = None


class Outbox:
    def __init__(self, path: Path, retention_days: float = 30.0):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.retention_days = retention_days
        self._db = _connect(path)  # the writer: used by the committer only
        self._db.executescript(SCHEMA)
        self._db.executescript(control_totals.SCHEMA)
        have = {row[1] for row in self._db.execute("PRAGMA table_info(outbox)")}
        for column, kind in COLUMNS.items():
            if column not in have:
                self._db.execute(f"ALTER TABLE outbox ADD COLUMN {column} {kind}")
        self._db.execute("CREATE INDEX IF NOT EXISTS outbox_stream ON outbox (type, stream_seq)")
        self._reader = _connect(path)  # readers never block the writer in WAL
        # The forwarder's reads (hundreds of rows) run in an OS thread, on a connection of their own.
        self._scanner = _connect(path)
        self._scanning = Semaphore(1)  # one OS thread at a time on it
        # Checkpoints (copying the WAL into the database, with their own fsyncs) run
        # beside the writer, from `checkpoint()`, never inside a POS call's commit.
        self._db.execute("PRAGMA wal_autocheckpoint=0")
        self._checkpointer = _connect(path)
        self._queue: deque[_Work] = deque()
        self._wake = Event()
        self._committer = None
        self._closed = False
        self.last_accept = float("-inf")  # monotonic: when a till last handed in a sale
        self.group_sizes: deque[int] = deque(maxlen=1000)  # recent transactions, for the benchmark

    # -- writes: queued, grouped, one transaction per fsync ----------------

    def accept(self, event: CloudEvent, also=None) -> Accepted:
        """Commit the event. A repeat of the same idempotency key with the same
        payload returns the first one; with another payload raises OutboxConflict.
        `also(db)` (the loyalty holds a sale spends) runs first in the same savepoint:
        what it raises refuses the event, and the event commits only with its effect."""
        def apply(db, batch):
            if also is not None:
                also(db)
            return self._insert(db, batch, event, payload_hash(event))
        self.last_accept = time.monotonic()
        return self._submit(apply)

    def write(self, apply):
        """`apply(db)` in the next group commit (beside POS calls, sharing their fsync); its
        result, or what it raised (an sqlite3 error as OutboxUnavailable)."""
        return self._submit(lambda db, batch: apply(db))

    def record_accepted(self, message_type: str, data: dict) -> None:
        """Note a sale or return the legacy ERP took directly, for the control totals."""
        self._submit(lambda db, batch: control_totals.record(db, message_type, data, "legacy", None))

    def mark_sent(self, seqs: list[int]) -> None:
        """One UPDATE per run of consecutive seqs (a forwarder round's are one run): one
        statement, one GIL hand-over in the committer's thread, not one per row."""
        if seqs:
            now = time.time()
            self._submit(lambda db, batch: db.executemany(
                "UPDATE outbox SET sent_at = ? WHERE seq BETWEEN ? AND ? AND sent_at IS NULL",
                [(now, low, high) for low, high in _runs(seqs)]))

    def compact(self, now: float | None = None, limit: int = 500) -> int:
        """Delete up to `limit` of the oldest rows sent (and control notes taken) more than
        `retention_days` ago; unsent rows always stay. A small batch rides in a group
        commit beside POS calls; the caller repeats while whole batches go (the larger
        of the two counts is returned)."""
        cutoff = (now or time.time()) - self.retention_days * 86400

        def apply(db, batch):
            notes = control_totals.compact(db, cutoff, limit)
            # by seq, from the oldest, up to the first row not sent long enough: no scan
            oldest = db.execute("SELECT seq, sent_at FROM outbox ORDER BY seq LIMIT ?", (limit,)).fetchall()
            done = list(takewhile(lambda row: row[1] is not None and row[1] < cutoff, oldest))
            rows = db.execute("DELETE FROM outbox WHERE seq <= ?", (done[-1][0],)).rowcount if done else 0
            return max(notes, rows)
        return self._submit(apply)

    def _submit(self, apply):
        if self._closed:
            raise OutboxUnavailable(f"outbox {self.path} is closed")
        work = _Work(apply)
        self._queue.append(work)
        if self._committer is None or self._committer.dead:
            self._committer = eventlet.spawn(self._commit_loop)
        elif not self._wake.ready():
            self._wake.send(True)
        work.done.wait()
        if work.error is not None:
            raise work.error
        return work.result

    def _commit_loop(self):
        while self._queue or not self._closed:
            if not self._queue:
                self._wake.wait()
                self._wake = Event()
                continue
            batch = [self._queue.popleft() for _ in range(min(len(self._queue), MAX_GROUP))]
            error = OutboxUnavailable(f"outbox {self.path}: the committer was stopped")
            try:
                error = tpool.execute(self._commit, batch)
            except Exception as exc:  # a bug must not leave this group's callers waiting forever
                log.exception("outbox commit failed", extra={"id": None, "correlationid": None})
                error = OutboxUnavailable(f"outbox {self.path} cannot commit: {exc!r}")
            finally:  # even when killed: nobody waits on a group that will never commit
                self.group_sizes.append(len(batch))
                for work in batch:
                    if error is not None:
                        work.error, work.result = error, None
                    work.done.send(True)

    def _commit(self, batch: list[_Work]) -> Exception | None:
        """Run in an OS thread: one transaction, a savepoint per caller. A caller's failure
        is its own; a failure of the transaction (BEGIN, COMMIT, a savepoint) rolls back
        the whole group and is returned."""
        try:
            self._db.execute("BEGIN IMMEDIATE")
            claimed: dict[str, tuple[str, str]] = {}
            for work in batch:
                self._db.execute("SAVEPOINT work")
                try:
                    work.result = work.apply(self._db, claimed)
                except Exception as exc:  # `claimed` is only written once the work succeeded
                    self._db.execute("ROLLBACK TO work")
                    work.error = OutboxUnavailable(f"outbox {self.path} cannot commit: {exc}") \
                        if isinstance(exc, sqlite3.Error) else exc
                self._db.execute("RELEASE work")
            self._db.execute("COMMIT")
            return None
        except Exception as exc:
            if self._db.in_transaction:
                try:
                    self._db.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
            return OutboxUnavailable(f"outbox {self.path} cannot commit: {exc}")

    def _insert(self, db, claimed, event: CloudEvent, digest: str) -> Accepted:
        key = event.idempotencykey
        first = claimed.get(key) or db.execute(
            "SELECT event_id, payload_hash FROM outbox WHERE idem_key = ?", (key,)).fetchone()
        if first is not None:
            if first[1] is not None and first[1] != digest:
                raise OutboxConflict(key, first[0])
            return Accepted(first[0], duplicate=True)
        taken = db.execute("SELECT idem_key FROM outbox WHERE event_id = ?", (event.id,)).fetchone()
        if taken is not None:
            raise EventIdReusedError(event.id, taken[0])
        stream_seq = db.execute(
            "SELECT coalesce(max(stream_seq), 0) + 1 FROM outbox WHERE type = ?", (event.type,)).fetchone()[0]
        seq = db.execute(
            "INSERT INTO outbox (event_id, idem_key, type, body, accepted_at, payload_hash, stream_seq) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (event.id, key, event.type, event.to_json(), time.time(), digest, stream_seq)).lastrowid
        control_totals.record(db, event.type, event.data, "bus", seq)
        claimed[key] = (event.id, digest)
        return Accepted(event.id, duplicate=False)

    def checkpoint(self, truncate: bool = False) -> None:
        """A passive checkpoint in an OS thread: it never blocks the writer. `truncate` (when
        idle) also waits for readers and empties the WAL file, which otherwise keeps its size."""
        try:
            tpool.execute(self._checkpointer.execute, f"PRAGMA wal_checkpoint({'TRUNCATE' if truncate else 'PASSIVE'})")
        except sqlite3.Error as exc:
            raise OutboxUnavailable(f"outbox {self.path} cannot checkpoint: {exc}") from exc

    # -- reads ---------------------------------------------------------------

    def unsent(self, limit: int, after: int = 0) -> list[Entry]:
        """The oldest unsent rows in store order (those with seq > `after`)."""
        rows = self._read("SELECT seq, event_id, type, body, stream_seq FROM outbox "
                          "WHERE sent_at IS NULL AND seq > ? ORDER BY seq LIMIT ?", (after, limit),
                          self._scanner)
        return [Entry(*row) for row in rows]

    def stats(self) -> dict:
        [(depth, oldest)] = self._read(
            "SELECT count(*), min(accepted_at) FROM outbox WHERE sent_at IS NULL", ())
        return {
            "outbox_depth": depth,
            "oldest_unsent_seconds": round(time.time() - oldest, 3) if oldest else 0.0,
        }

    def _read(self, sql: str, params: tuple, in_thread: sqlite3.Connection | None = None) -> list:
        """On the hub with the reader, or with `in_thread` in an OS thread (a read long
        enough to hold up a till's sale)."""
        try:
            if in_thread is not None:
                with self._scanning:
                    return tpool.execute(lambda: in_thread.execute(sql, params).fetchall())
            return self._reader.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise OutboxUnavailable(f"outbox {self.path} cannot be read: {exc}") from exc

    def close(self):
        """Commit what is queued, then close both connections."""
        if self._closed:
            return
        self._closed = True
        if self._committer is not None and not self._committer.dead:
            if not self._wake.ready():
                self._wake.send(True)
            self._committer.wait()
        self._db.close()
        self._reader.close()
        self._scanner.close()
        self._checkpointer.close()
