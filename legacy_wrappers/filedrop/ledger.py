"""The durable file ledger (SQLite under `var/`): what was taken, how far it got.

Camel's default idempotent repository forgets after 1,000 names and lives in
memory; this one is keyed by content (sha256), survives restarts, and holds the
checkpoint that lets a killed wrapper resume where it stopped: the last row
number confirmed, not a count of chunks (the chunk size or the layout may
change before the resume). It also remembers files it must not look at again
(could not be moved, refused, unreadable) by their identity on disk, so
nothing is re-read in a loop.

It is our own checkpoint store in one local SQLite file, not a legacy
database, so it speaks stdlib `sqlite3` (parameterised statements only):
SQLAlchemy would add ~10 MiB of imports to the files service and about as
much time per checkpoint as the statement itself. Every write is one
transaction (`BEGIN IMMEDIATE` ... `COMMIT`) in WAL mode.
"""
from __future__ import annotations

import sqlite3
import threading
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

# The tables as the SQLAlchemy-era ledger created them, so existing ledgers are kept.
SCHEMA = (
    """CREATE TABLE IF NOT EXISTS "FD_FILE" (
        "DROP_NAME" VARCHAR(60) NOT NULL, "SHA256" VARCHAR(64) NOT NULL,
        "NAME" VARCHAR(255) NOT NULL,
        "STATE" VARCHAR(12) NOT NULL,  -- in_progress, done, rejected, failed
        "ROWS" INTEGER NOT NULL, "BAD_ROWS" INTEGER NOT NULL,
        "CHUNKS_DONE" INTEGER NOT NULL,  -- no longer read: ledgers from before ROWS_DONE keep it
        "ATTEMPTS" INTEGER NOT NULL, "REASON" VARCHAR(2000), "UPDATED_TS" VARCHAR(32) NOT NULL,
        "ROWS_DONE" INTEGER NOT NULL DEFAULT 0,  -- every row numbered up to this one was confirmed
        PRIMARY KEY ("DROP_NAME", "SHA256"))""",
    """CREATE TABLE IF NOT EXISTS "FD_SEEN" (
        "DROP_NAME" VARCHAR(60) NOT NULL, "NAME" VARCHAR(255) NOT NULL,
        "IDENTITY" VARCHAR(80) NOT NULL,  -- inode:size:mtime_ns
        "OUTCOME" VARCHAR(20) NOT NULL, "UPDATED_TS" VARCHAR(32) NOT NULL,
        PRIMARY KEY ("DROP_NAME", "NAME", "IDENTITY"))""",
    """CREATE TABLE IF NOT EXISTS "FD_OUT_FILE" (
        "OUTBOUND" VARCHAR(60) NOT NULL, "NAME" VARCHAR(255) NOT NULL,
        "STATE" VARCHAR(12) NOT NULL,  -- pending (keys recorded, not renamed), written
        "ROWS" INTEGER NOT NULL, "UPDATED_TS" VARCHAR(32) NOT NULL,
        PRIMARY KEY ("OUTBOUND", "NAME"))""",
    """CREATE TABLE IF NOT EXISTS "FD_OUT_KEY" (
        "OUTBOUND" VARCHAR(60) NOT NULL, "IDEM_KEY" VARCHAR(200) NOT NULL,
        "FILE_NAME" VARCHAR(255) NOT NULL,
        PRIMARY KEY ("OUTBOUND", "IDEM_KEY"))""",
    'CREATE INDEX IF NOT EXISTS "FD_OUT_KEY_FILE" ON "FD_OUT_KEY" ("OUTBOUND", "FILE_NAME")',  # a file's keys
)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


def identity(st) -> str:
    return f"{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"


class Ledger:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        # One connection, used by one caller at a time (the lock); autocommit mode,
        # so a transaction is exactly what `_write` opens.
        self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._conn.row_factory = sqlite3.Row
        self._lock = threading.Lock()
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA busy_timeout=30000")
        # FULL: a commit is on disk when it returns. An outbound file's keys must be
        # durable before its rename, or a power cut after the legacy job took the
        # file would forget them and the redelivered events would be written again.
        # The one exception is `checkpoint` (see there).
        self._conn.execute("PRAGMA synchronous=FULL")
        with self._write() as conn:
            for statement in SCHEMA:
                conn.execute(statement)
            if "ROWS_DONE" not in {c["name"] for c in conn.execute('PRAGMA table_info("FD_FILE")')}:
                # a file in progress in an older ledger starts again from its first row
                conn.execute('ALTER TABLE "FD_FILE" ADD COLUMN "ROWS_DONE" INTEGER NOT NULL DEFAULT 0')

    def close(self):
        with self._lock:
            self._conn.close()

    @contextmanager
    def _write(self, durable: bool = True):
        """One transaction; rolled back if the block raises. Not `durable`: committed
        without waiting for the disk (a power cut may lose it; the next durable commit
        takes it along)."""
        with self._lock:
            conn = self._conn
            if not durable:
                conn.execute("PRAGMA synchronous=NORMAL")
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    yield conn
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:  # the block or the COMMIT failed (a full disk ...)
                        conn.execute("ROLLBACK")
                    raise
            finally:
                if not durable:
                    conn.execute("PRAGMA synchronous=FULL")

    def _one(self, sql: str, params: tuple):
        with self._lock:
            return self._conn.execute(sql, params).fetchone()

    # -- inbound ----------------------------------------------------------------

    def file(self, drop: str, sha256: str) -> dict | None:
        row = self._one('SELECT * FROM "FD_FILE" WHERE "DROP_NAME" = ? AND "SHA256" = ?', (drop, sha256))
        return dict(row) if row else None

    def begin(self, drop: str, sha256: str, name: str, rows: int, bad_rows: int) -> dict:
        """Start (or resume) a file; returns its record with the checkpoint."""
        with self._write() as conn:
            key = (drop, sha256)
            if conn.execute('UPDATE "FD_FILE" SET "NAME" = ?, "STATE" = \'in_progress\', "ROWS" = ?, '
                            '"BAD_ROWS" = ?, "ATTEMPTS" = "ATTEMPTS" + 1, "UPDATED_TS" = ? '
                            'WHERE "DROP_NAME" = ? AND "SHA256" = ?',
                            (name, rows, bad_rows, _now(), *key)).rowcount == 0:
                conn.execute('INSERT INTO "FD_FILE" ("DROP_NAME", "SHA256", "NAME", "STATE", "ROWS", '
                             '"BAD_ROWS", "CHUNKS_DONE", "ATTEMPTS", "UPDATED_TS") '
                             'VALUES (?, ?, ?, \'in_progress\', ?, ?, 0, 1, ?)',
                             (*key, name, rows, bad_rows, _now()))
            return dict(conn.execute('SELECT * FROM "FD_FILE" WHERE "DROP_NAME" = ? AND "SHA256" = ?',
                                     key).fetchone())

    def checkpoint(self, drop: str, sha256: str, rows_done: int):
        """Every row of the file numbered up to `rows_done` is confirmed. Not durable: it
        comes every few thousand rows, where an fsync each is a real share of a file
        pass's time, and a checkpoint lost in a power cut only resends rows that
        consumers drop by their keys."""
        with self._write(durable=False) as conn:
            conn.execute('UPDATE "FD_FILE" SET "ROWS_DONE" = ?, "UPDATED_TS" = ? '
                         'WHERE "DROP_NAME" = ? AND "SHA256" = ?', (rows_done, _now(), drop, sha256))

    def finish(self, drop: str, sha256: str, name: str, state: str, reason: str | None = None,
               rows: int | None = None, bad_rows: int | None = None):
        """Record the file's end state; `rows`/`bad_rows`, when given, are the final counts."""
        with self._write() as conn:
            now = _now()
            if conn.execute('UPDATE "FD_FILE" SET "NAME" = ?, "STATE" = ?, "REASON" = ?, "UPDATED_TS" = ?, '
                            '"ROWS" = coalesce(?, "ROWS"), "BAD_ROWS" = coalesce(?, "BAD_ROWS") '
                            'WHERE "DROP_NAME" = ? AND "SHA256" = ?',
                            (name, state, reason, now, rows, bad_rows, drop, sha256)).rowcount == 0:
                conn.execute('INSERT INTO "FD_FILE" ("DROP_NAME", "SHA256", "NAME", "STATE", "REASON", '
                             '"UPDATED_TS", "ROWS", "BAD_ROWS", "CHUNKS_DONE", "ATTEMPTS") '
                             'VALUES (?, ?, ?, ?, ?, ?, ?, ?, 0, 1)',
                             (drop, sha256, name, state, reason, now, rows or 0, bad_rows or 0))

    def seen(self, drop: str, name: str, ident: str) -> str | None:
        row = self._one('SELECT "OUTCOME" FROM "FD_SEEN" WHERE "DROP_NAME" = ? AND "NAME" = ? '
                        'AND "IDENTITY" = ?', (drop, name, ident))
        return row[0] if row else None

    def remember(self, drop: str, name: str, ident: str, outcome: str):
        with self._write() as conn:
            conn.execute('INSERT OR REPLACE INTO "FD_SEEN" ("DROP_NAME", "NAME", "IDENTITY", "OUTCOME", '
                         '"UPDATED_TS") VALUES (?, ?, ?, ?, ?)', (drop, name, ident, outcome, _now()))

    def forget(self, drop: str, name: str):
        with self._write() as conn:
            conn.execute('DELETE FROM "FD_SEEN" WHERE "DROP_NAME" = ? AND "NAME" = ?', (drop, name))

    def forget_failure(self, drop: str, sha256: str) -> str | None:
        """Drop a rejected or failed file's record so its content is taken afresh;
        returns the state it had (a `done` record is kept: that content is published)."""
        with self._write() as conn:
            key = (drop, sha256)
            row = conn.execute('SELECT "STATE" FROM "FD_FILE" WHERE "DROP_NAME" = ? AND "SHA256" = ?',
                               key).fetchone()
            state = row[0] if row else None
            if state in ("rejected", "failed"):
                conn.execute('DELETE FROM "FD_FILE" WHERE "DROP_NAME" = ? AND "SHA256" = ?', key)
            return state

    def in_progress(self, drop: str) -> int:
        return self._one('SELECT count(*) FROM "FD_FILE" WHERE "DROP_NAME" = ? AND "STATE" = \'in_progress\'',
                         (drop,))[0]

    def counts_since(self, drop: str, since_iso: str) -> dict[str, int]:
        with self._lock:
            rows = self._conn.execute('SELECT "STATE", count(*) FROM "FD_FILE" WHERE "DROP_NAME" = ? '
                                      'AND "UPDATED_TS" >= ? GROUP BY "STATE"', (drop, since_iso)).fetchall()
        return {state: n for state, n in rows}

    # -- outbound ---------------------------------------------------------------

    def written_keys(self, outbound: str, keys: list[str]) -> set[str]:
        found = set()
        with self._lock:
            for i in range(0, len(keys), 500):
                part = keys[i:i + 500]
                found.update(k for (k,) in self._conn.execute(
                    'SELECT "IDEM_KEY" FROM "FD_OUT_KEY" WHERE "OUTBOUND" = ? AND "IDEM_KEY" IN '
                    f'({", ".join("?" * len(part))})', (outbound, *part)))
        return found

    def out_pending(self, outbound: str, name: str, keys: list[str]):
        """Record a file's keys before its rename: a crash after the rename cannot
        then write the same events again; recovery drops the keys if it never happened."""
        with self._write() as conn:
            conn.execute('INSERT INTO "FD_OUT_FILE" ("OUTBOUND", "NAME", "STATE", "ROWS", "UPDATED_TS") '
                         'VALUES (?, ?, \'pending\', ?, ?)', (outbound, name, len(keys), _now()))
            conn.executemany('INSERT INTO "FD_OUT_KEY" ("OUTBOUND", "IDEM_KEY", "FILE_NAME") VALUES (?, ?, ?)',
                             [(outbound, k, name) for k in keys])

    def out_written(self, outbound: str, name: str):
        with self._write() as conn:
            conn.execute('UPDATE "FD_OUT_FILE" SET "STATE" = \'written\', "UPDATED_TS" = ? '
                         'WHERE "OUTBOUND" = ? AND "NAME" = ?', (_now(), outbound, name))

    def out_pending_files(self, outbound: str) -> list[str]:
        with self._lock:
            return [name for (name,) in self._conn.execute(
                'SELECT "NAME" FROM "FD_OUT_FILE" WHERE "OUTBOUND" = ? AND "STATE" = \'pending\'', (outbound,))]

    def out_abandon(self, outbound: str, name: str):
        with self._write() as conn:
            conn.execute('DELETE FROM "FD_OUT_KEY" WHERE "OUTBOUND" = ? AND "FILE_NAME" = ?', (outbound, name))
            conn.execute('DELETE FROM "FD_OUT_FILE" WHERE "OUTBOUND" = ? AND "NAME" = ?', (outbound, name))

    # -- retention ----------------------------------------------------------------

    def prune(self, before: str, limit: int) -> int:
        """Forget what finished before `before` (ISO UTC), up to `limit` rows a table: taken,
        refused or failed files (that content would be taken again), files remembered by
        identity, and the row keys of written outbound files. A file in progress and a
        pending outbound file stay. Returns the rows deleted."""
        with self._write() as conn:
            n = conn.execute('DELETE FROM "FD_FILE" WHERE rowid IN (SELECT rowid FROM "FD_FILE" WHERE '
                             '"STATE" <> \'in_progress\' AND "UPDATED_TS" < ? LIMIT ?)', (before, limit)).rowcount
            n += conn.execute('DELETE FROM "FD_SEEN" WHERE rowid IN (SELECT rowid FROM "FD_SEEN" WHERE '
                              '"UPDATED_TS" < ? LIMIT ?)', (before, limit)).rowcount
            budget = limit
            for out in conn.execute('SELECT "OUTBOUND", "NAME" FROM "FD_OUT_FILE" WHERE "STATE" = \'written\' '
                                    'AND "UPDATED_TS" < ? LIMIT ?', (before, limit)).fetchall():
                keys = conn.execute('DELETE FROM "FD_OUT_KEY" WHERE rowid IN (SELECT rowid FROM "FD_OUT_KEY" '
                                    'WHERE "OUTBOUND" = ? AND "FILE_NAME" = ? LIMIT ?)', (*out, budget)).rowcount
                n, budget = n + keys, budget - keys
                if budget <= 0:
                    break  # this file may have keys left: its record stays for the next batch
                n += conn.execute('DELETE FROM "FD_OUT_FILE" WHERE "OUTBOUND" = ? AND "NAME" = ?', tuple(out)).rowcount
        return n
