"""The durable file ledger (SQLite under `var/`): what was taken, how far it got.

Camel's default idempotent repository forgets after 1,000 names and lives in
memory; this one is keyed by content (sha256), survives restarts, and holds the
per-chunk checkpoint that lets a killed wrapper resume where it stopped. It
also remembers files it must not look at again (could not be moved, refused,
unreadable) by their identity on disk, so nothing is re-read in a loop.
"""
from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy import (Column, Integer, MetaData, String, Table, and_, create_engine, delete,
                        event, func, insert, select, update)

metadata = MetaData()
FILES = Table(
    "FD_FILE", metadata,
    Column("DROP_NAME", String(60), primary_key=True),
    Column("SHA256", String(64), primary_key=True),
    Column("NAME", String(255), nullable=False),
    Column("STATE", String(12), nullable=False),  # in_progress, done, rejected, failed
    Column("ROWS", Integer, nullable=False, default=0),
    Column("BAD_ROWS", Integer, nullable=False, default=0),
    Column("CHUNKS_DONE", Integer, nullable=False, default=0),
    Column("ATTEMPTS", Integer, nullable=False, default=0),
    Column("REASON", String(2000)),
    Column("UPDATED_TS", String(32), nullable=False),
)
SEEN = Table(
    "FD_SEEN", metadata,
    Column("DROP_NAME", String(60), primary_key=True),
    Column("NAME", String(255), primary_key=True),
    Column("IDENTITY", String(80), primary_key=True),  # inode:size:mtime_ns
    Column("OUTCOME", String(20), nullable=False),
    Column("UPDATED_TS", String(32), nullable=False),
)
OUT_FILES = Table(
    "FD_OUT_FILE", metadata,
    Column("OUTBOUND", String(60), primary_key=True),
    Column("NAME", String(255), primary_key=True),
    Column("STATE", String(12), nullable=False),  # pending (keys recorded, not renamed), written
    Column("ROWS", Integer, nullable=False),
    Column("UPDATED_TS", String(32), nullable=False),
)
OUT_KEYS = Table(
    "FD_OUT_KEY", metadata,
    Column("OUTBOUND", String(60), primary_key=True),
    Column("IDEM_KEY", String(200), primary_key=True),
    Column("FILE_NAME", String(255), nullable=False),
)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


def identity(st) -> str:
    return f"{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"


class Ledger:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.engine = create_engine(f"sqlite:///{path}")

        @event.listens_for(self.engine, "connect")
        def _pragmas(dbapi_conn, _record):
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            # NORMAL in WAL survives a process kill; a power cut may lose the
            # last checkpoints, which only means re-publishing rows the inbox drops.
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        metadata.create_all(self.engine)

    def close(self):
        self.engine.dispose()

    # -- inbound ----------------------------------------------------------------

    def file(self, drop: str, sha256: str) -> dict | None:
        with self.engine.connect() as conn:
            row = conn.execute(select(FILES).where(
                and_(FILES.c.DROP_NAME == drop, FILES.c.SHA256 == sha256))).mappings().first()
        return dict(row) if row else None

    def begin(self, drop: str, sha256: str, name: str, rows: int, bad_rows: int) -> dict:
        """Start (or resume) a file; returns its record with the checkpoint."""
        with self.engine.begin() as conn:
            key = and_(FILES.c.DROP_NAME == drop, FILES.c.SHA256 == sha256)
            if conn.execute(select(FILES.c.SHA256).where(key)).first() is None:
                conn.execute(insert(FILES).values(
                    DROP_NAME=drop, SHA256=sha256, NAME=name, STATE="in_progress", ROWS=rows,
                    BAD_ROWS=bad_rows, CHUNKS_DONE=0, ATTEMPTS=1, UPDATED_TS=_now()))
            else:
                conn.execute(update(FILES).where(key).values(
                    NAME=name, STATE="in_progress", ROWS=rows, BAD_ROWS=bad_rows,
                    ATTEMPTS=FILES.c.ATTEMPTS + 1, UPDATED_TS=_now()))
            return dict(conn.execute(select(FILES).where(key)).mappings().first())

    def checkpoint(self, drop: str, sha256: str, chunks_done: int):
        with self.engine.begin() as conn:
            conn.execute(update(FILES).where(
                and_(FILES.c.DROP_NAME == drop, FILES.c.SHA256 == sha256)).values(
                CHUNKS_DONE=chunks_done, UPDATED_TS=_now()))

    def finish(self, drop: str, sha256: str, name: str, state: str, reason: str | None = None,
               rows: int | None = None, bad_rows: int | None = None):
        """Record the file's end state; `rows`/`bad_rows`, when given, are the final counts."""
        with self.engine.begin() as conn:
            key = and_(FILES.c.DROP_NAME == drop, FILES.c.SHA256 == sha256)
            values = dict(NAME=name, STATE=state, REASON=reason, UPDATED_TS=_now())
            counts = {k: v for k, v in (("ROWS", rows), ("BAD_ROWS", bad_rows)) if v is not None}
            if conn.execute(update(FILES).where(key).values(**values, **counts)).rowcount == 0:
                conn.execute(insert(FILES).values(
                    DROP_NAME=drop, SHA256=sha256, ROWS=rows or 0, BAD_ROWS=bad_rows or 0,
                    CHUNKS_DONE=0, ATTEMPTS=1, **values))

    def seen(self, drop: str, name: str, ident: str) -> str | None:
        with self.engine.connect() as conn:
            return conn.execute(select(SEEN.c.OUTCOME).where(and_(
                SEEN.c.DROP_NAME == drop, SEEN.c.NAME == name, SEEN.c.IDENTITY == ident))).scalar()

    def remember(self, drop: str, name: str, ident: str, outcome: str):
        with self.engine.begin() as conn:
            conn.execute(delete(SEEN).where(and_(
                SEEN.c.DROP_NAME == drop, SEEN.c.NAME == name, SEEN.c.IDENTITY == ident)))
            conn.execute(insert(SEEN).values(DROP_NAME=drop, NAME=name, IDENTITY=ident,
                                             OUTCOME=outcome, UPDATED_TS=_now()))

    def forget(self, drop: str, name: str):
        with self.engine.begin() as conn:
            conn.execute(delete(SEEN).where(and_(SEEN.c.DROP_NAME == drop, SEEN.c.NAME == name)))

    def forget_failure(self, drop: str, sha256: str) -> str | None:
        """Drop a rejected or failed file's record so its content is taken afresh;
        returns the state it had (a `done` record is kept: that content is published)."""
        with self.engine.begin() as conn:
            key = and_(FILES.c.DROP_NAME == drop, FILES.c.SHA256 == sha256)
            state = conn.execute(select(FILES.c.STATE).where(key)).scalar()
            if state in ("rejected", "failed"):
                conn.execute(delete(FILES).where(key))
            return state

    def in_progress(self, drop: str) -> int:
        with self.engine.connect() as conn:
            return conn.execute(select(func.count()).where(and_(
                FILES.c.DROP_NAME == drop, FILES.c.STATE == "in_progress"))).scalar()

    def counts_since(self, drop: str, since_iso: str) -> dict[str, int]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(FILES.c.STATE, func.count()).where(and_(
                FILES.c.DROP_NAME == drop, FILES.c.UPDATED_TS >= since_iso)).group_by(FILES.c.STATE))
            return {state: n for state, n in rows}

    # -- outbound ---------------------------------------------------------------

    def written_keys(self, outbound: str, keys: list[str]) -> set[str]:
        with self.engine.connect() as conn:
            found = set()
            for i in range(0, len(keys), 500):
                found.update(conn.execute(select(OUT_KEYS.c.IDEM_KEY).where(and_(
                    OUT_KEYS.c.OUTBOUND == outbound,
                    OUT_KEYS.c.IDEM_KEY.in_(keys[i:i + 500])))).scalars())
            return found

    def out_pending(self, outbound: str, name: str, keys: list[str]):
        """Record a file's keys before its rename: a crash after the rename cannot
        then write the same events again; recovery drops the keys if it never happened."""
        with self.engine.begin() as conn:
            conn.execute(insert(OUT_FILES).values(OUTBOUND=outbound, NAME=name, STATE="pending",
                                                  ROWS=len(keys), UPDATED_TS=_now()))
            if keys:
                conn.execute(insert(OUT_KEYS), [
                    {"OUTBOUND": outbound, "IDEM_KEY": k, "FILE_NAME": name} for k in keys])

    def out_written(self, outbound: str, name: str):
        with self.engine.begin() as conn:
            conn.execute(update(OUT_FILES).where(and_(
                OUT_FILES.c.OUTBOUND == outbound, OUT_FILES.c.NAME == name)).values(
                STATE="written", UPDATED_TS=_now()))

    def out_pending_files(self, outbound: str) -> list[str]:
        with self.engine.connect() as conn:
            return list(conn.execute(select(OUT_FILES.c.NAME).where(and_(
                OUT_FILES.c.OUTBOUND == outbound, OUT_FILES.c.STATE == "pending"))).scalars())

    def out_abandon(self, outbound: str, name: str):
        with self.engine.begin() as conn:
            conn.execute(delete(OUT_KEYS).where(and_(
                OUT_KEYS.c.OUTBOUND == outbound, OUT_KEYS.c.FILE_NAME == name)))
            conn.execute(delete(OUT_FILES).where(and_(
                OUT_FILES.c.OUTBOUND == outbound, OUT_FILES.c.NAME == name)))
