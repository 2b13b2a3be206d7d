"""The store's durable outbox: a sale is acknowledged to the POS only once it
is committed here, so the store keeps selling while the WAN or the broker is
down and nothing accepted is lost.

SQLite in WAL mode with `synchronous=FULL`: a commit survives a kill -9 and a
power cut. Rows are kept after sending (for reconciliation and replay) and
forwarded strictly in `seq` order.
"""
from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from eventlet.semaphore import Semaphore

from contracts.envelope import CloudEvent

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


class OutboxUnavailable(Exception):
    """The outbox could not commit (disk full, read-only, locked): the POS must retry."""


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


class Outbox:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.executescript(SCHEMA)
        self._lock = Semaphore(1)

    def accept(self, event: CloudEvent) -> Accepted:
        """Commit the event; a repeat of the same idempotency key returns the first one."""
        with self._lock:
            try:
                cur = self._db.execute(
                    "INSERT INTO outbox (event_id, idem_key, type, body, accepted_at) "
                    "VALUES (?, ?, ?, ?, ?) ON CONFLICT (idem_key) DO NOTHING",
                    (event.id, event.idempotencykey, event.type, event.to_json(), time.time()))
                if cur.rowcount == 1:
                    return Accepted(event.id, duplicate=False)
                row = self._db.execute(
                    "SELECT event_id FROM outbox WHERE idem_key = ?", (event.idempotencykey,)).fetchone()
                return Accepted(row[0], duplicate=True)
            except sqlite3.Error as exc:
                raise OutboxUnavailable(f"outbox {self.path} cannot commit: {exc}") from exc

    def unsent(self, limit: int) -> list[Entry]:
        with self._lock:
            rows = self._db.execute(
                "SELECT seq, event_id, type, body FROM outbox WHERE sent_at IS NULL "
                "ORDER BY seq LIMIT ?", (limit,)).fetchall()
        return [Entry(*row) for row in rows]

    def mark_sent(self, seqs: list[int]) -> None:
        if not seqs:
            return
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany("UPDATE outbox SET sent_at = ? WHERE seq = ?",
                                     [(time.time(), s) for s in seqs])
                self._db.execute("COMMIT")
            except sqlite3.Error:
                self._db.execute("ROLLBACK")
                raise

    def stats(self) -> dict:
        with self._lock:
            depth, oldest = self._db.execute(
                "SELECT count(*), min(accepted_at) FROM outbox WHERE sent_at IS NULL").fetchone()
        return {
            "outbox_depth": depth,
            "oldest_unsent_seconds": round(time.time() - oldest, 3) if oldest else 0.0,
        }

    def close(self):
        with self._lock:
            self._db.close()


def utc_now() -> datetime:
    return datetime.now(timezone.utc)
