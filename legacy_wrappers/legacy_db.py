"""`LegacyDatabase`: a legacy database behind SQLAlchemy Core, one transaction per worker.

SQLite is the embedded default: WAL so readers never block the writer,
`BEGIN IMMEDIATE` so a transaction takes the write lock up front (two
writers then queue instead of failing on a stale snapshot), and one pooled
connection per process because eventlet greenthreads share one OS thread
and must not wait on a lock held by a sibling that cannot run. For the same
reason every extension of a container that talks to one database shares one
engine (`LegacyEngines`): a second SQLite connection in the process would
block the OS thread in sqlite's busy wait while our own worker holds the lock.

A worker's effects are all-or-nothing: the first use of `db.conn` begins a
transaction; it is committed when the worker succeeded and rolled back when
it failed. A failed commit cannot be raised (an exception escaping
`worker_result` kills the container), so it is appended to the worker
context's EFFECT_ERRORS list, which `reliable_handler` reads to retry the
message instead of acking it.
"""
from __future__ import annotations

import logging
import random
import sqlite3
import time
from functools import lru_cache

from eventlet import tpool
from eventlet.semaphore import Semaphore
from nameko.extensions import DependencyProvider, SharedExtension
from sqlalchemy import MetaData, String, Table, and_, create_engine, event, false, inspect, or_
from sqlalchemy.sql import ColumnElement
from sqlalchemy.engine import Connection, Engine, RootTransaction
from sqlalchemy.exc import DBAPIError, DisconnectionError
from bus.constants import EFFECT_ERRORS
from contracts.errors import RetailbusError

log = logging.getLogger(__name__)



# A pooled connection idle longer than this is pinged before use (the server may have
# restarted meanwhile); one in steady use is not: a ping on every checkout was a round
# trip for every batch of postings, every capture poll and every outbox relay round.
PING_IDLE_SECONDS = 1.0

# How long a SQLite connection waits for another process's lock before "database is locked".
SQLITE_BUSY_SECONDS = 30.0


def engine_for(dsn: str, **kwargs) -> Engine:
    if not dsn.startswith("sqlite"):
        # values_plus_batch: an executemany UPDATE is one round trip per page, not per row
        engine = create_engine(dsn, executemany_mode="values_plus_batch", **kwargs)
        event.listen(engine, "checkin", _note_idle)
        event.listen(engine, "checkout", _ping_if_idle)
        return engine
    engine = create_engine(dsn, pool_size=1, max_overflow=0, pool_timeout=60,
                           connect_args={"check_same_thread": False}, **kwargs)  # BatchedWrites commits in tpool

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):
        dbapi_conn.isolation_level = None  # SQLAlchemy emits BEGIN itself, below
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout={int(SQLITE_BUSY_SECONDS * 1000)}")
        switch_to_wal(cur)
        cur.execute("PRAGMA synchronous=FULL")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn):
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def switch_to_wal(cur) -> None:
    """Put a SQLite database in WAL mode (`cur`: a DB-API cursor or connection).

    WAL is written into the database file, so only its first connections switch.
    The switch takes an exclusive lock, and while processes open a fresh file
    together SQLite answers "database is locked" at once, without its busy wait,
    where waiting could deadlock (one process in CI lost all its connect attempts
    that way). Another moment is free: the switch is tried again until the busy
    timeout has passed."""
    deadline = time.monotonic() + SQLITE_BUSY_SECONDS
    while True:
        try:
            cur.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(random.uniform(0.005, 0.05))


def _note_idle(_dbapi_conn, record) -> None:
    record.info["idle_since"] = time.monotonic()


def _ping_if_idle(dbapi_conn, record, _proxy) -> None:
    """SQLAlchemy's pessimistic disconnect handling, for idle connections only: a dead
    one is replaced (the pool retries the checkout on DisconnectionError). A connection
    that dies while in steady use fails its statement, which SQLAlchemy recognises as a
    disconnect (the pool is refreshed) and our callers retry."""
    if time.monotonic() - record.info.get("idle_since", time.monotonic()) < PING_IDLE_SECONDS:
        return
    try:
        cursor = dbapi_conn.cursor()
        cursor.execute("SELECT 1")
        cursor.close()
    except Exception as exc:
        raise DisconnectionError(f"pooled connection is gone: {exc}") from exc


def commit_off_hub(tx: RootTransaction) -> None:
    """Commit without stopping the event loop for the flush to disk.

    SQLite's commit is a blocking C call (its fsync), so it runs in an OS thread
    (eventlet tpool) while the hub goes on. A network driver that eventlet made
    green (psycopg2) yields to the hub while it waits anyway, so it commits in
    the greenthread: through tpool its thread also waited for the GIL twice, up
    to the interpreter's 5 ms switch interval each time while the hub was busy
    (the erp posted ~5 % more sales a second on PostgreSQL without, in a probe)."""
    if tx.connection.dialect.name == "sqlite":
        tpool.execute(tx.commit)
    else:
        tx.commit()


CREATE_ATTEMPTS = 3


def create_indexes(engine: Engine, table) -> None:
    """Create `table`'s indexes that an older database lacks (create_all adds none to a
    table that exists); another process creating one at the same moment is no error."""
    for index in table.indexes:
        try:
            index.create(engine, checkfirst=True)
        except DBAPIError:
            if not inspect(engine).has_index(table.name, index.name):
                raise


def create_tables(engine: Engine, metadata: MetaData) -> None:
    """`metadata.create_all`, safe while other processes create the same tables.

    create_all looks before it creates, and the two steps are not atomic: two erp
    processes starting together on a fresh database both see a table missing and
    both create it. PostgreSQL then refuses the second (a duplicate pg_type row),
    SQLite says "already exists", and the worker or thread that asked died with
    it. The loser looks again and finds the table; an error that persists (no
    rights, say) is raised from the last attempt."""
    for attempt in range(1, CREATE_ATTEMPTS + 1):
        try:
            metadata.create_all(engine)
            return
        except DBAPIError as exc:
            if attempt == CREATE_ATTEMPTS:
                raise
            log.info("creating tables raced another process (%s); looking again", type(exc.orig).__name__)


def pairs_in(first: ColumnElement, second: ColumnElement, pairs) -> ColumnElement:
    """`(first, second) IN pairs`, spelled so an index on (first, second) serves it: SQLite
    scans the whole table for a list of row values (`IN (VALUES (?, ?), ..)`), once per
    batch, a cost that grows with every row the table ever got. Grouped by the first value:
    `first = ? AND second IN (..)` each, OR-ed."""
    grouped: dict = {}
    for a, b in pairs:
        grouped.setdefault(a, set()).add(b)
    return or_(false(), *(and_(first == a, second.in_(sorted(bs))) for a, bs in sorted(grouped.items())))


class LegacyValueError(RetailbusError, ValueError):
    """A value the legacy column cannot hold as given: refused, never truncated."""


def check_row(table: Table, row: dict) -> None:
    """Refuse a value that would not be stored verbatim: NUL characters (PostgreSQL
    cannot store them, C programs reading the table stop at them) and strings longer
    than the legacy column (PostgreSQL refuses them, SQLite would keep them and break
    the legacy programs that read fixed-width fields)."""
    limits = _string_limits(table)
    for name, value in row.items():
        if not isinstance(value, str):
            continue
        if "\x00" in value:
            raise LegacyValueError(f"{table.name}.{name}: NUL characters cannot be stored")
        length = limits[name]
        if length is not None and len(value) > length:
            raise LegacyValueError(
                f"{table.name}.{name}: {len(value)} characters, the legacy column holds {length}")


@lru_cache(maxsize=256)
def _string_limits(table: Table) -> dict[str, int | None]:
    """Each column's length limit for strings (None: unlimited), read once per table:
    looking columns up by name cost more than the rest of a posting's Python."""
    return {column.key: column.type.length if isinstance(column.type, String) else None for column in table.c}


class LegacyDb:
    """What a worker gets: the engine, the legacy tables as they really are, and
    `conn`, the worker's connection in its one transaction (begun on first use)."""

    def __init__(self, engine: Engine, tables: dict[str, Table]):
        self.engine = engine
        self.tables = tables
        self._conn: Connection | None = None

    @property
    def conn(self) -> Connection:
        if self._conn is None:
            conn = self.engine.connect()
            try:
                conn.begin()
            except Exception:
                conn.close()
                raise
            self._conn = conn
        return self._conn

    def end(self, success: bool) -> None:
        """Commit (success) or roll back, and give the connection back. Raises a failed commit."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            if success:
                conn.commit()
            else:
                conn.rollback()
        finally:
            conn.close()


class LegacyEngines(SharedExtension):
    """One engine per DSN per container, shared by every extension using that database."""

    def __init__(self):
        self._engines: dict[str, Engine] = {}

    def engine(self, config_key: str) -> Engine:
        dsn = self.container.config.get(config_key)
        if not dsn:
            raise ValueError(f"{config_key} is not set in the service config")
        if dsn not in self._engines:
            self._engines[dsn] = engine_for(dsn)
        return self._engines[dsn]

    def stop(self):
        for engine in self._engines.values():
            engine.dispose()

    kill = stop


class LegacyDatabase(DependencyProvider):
    """The legacy database, with the tables named in `reflect` read from its catalogue.

    The DSN (an SQLAlchemy URL) is the service config's `config_key` (bus.yaml
    reads it from the environment). Reflection waits for the first worker: the
    legacy system may create its schema after we start. `create` names our own
    tables (metadata of RB_* tables) that live beside the legacy ones; they are
    created then too, never the legacy ones.
    """

    engines = LegacyEngines()

    def __init__(self, config_key: str = "LEGACY_DB_URI", reflect: tuple[str, ...] = (),
                 create: tuple[MetaData, ...] = ()):
        self.config_key = config_key
        self.reflect = reflect
        self.create = create
        self._tables: dict[str, Table] | None = None
        self._lock = Semaphore(1)
        self._workers: dict = {}

    def setup(self):
        self.engine = self.engines.engine(self.config_key)

    def tables(self) -> dict[str, Table]:
        if self._tables is None:
            with self._lock:
                if self._tables is None:
                    for metadata in self.create:
                        create_tables(self.engine, metadata)
                    md = MetaData()
                    md.reflect(self.engine, only=self.reflect)
                    self._tables = dict(md.tables)
        return self._tables

    def get_dependency(self, worker_ctx):
        db = LegacyDb(self.engine, self.tables())
        self._workers[worker_ctx] = db
        return db

    def worker_result(self, worker_ctx, result=None, exc_info=None):
        db = self._workers.get(worker_ctx)
        if db is None:
            return
        try:
            db.end(success=exc_info is None)
        except Exception as exc:
            log.error("commit failed: %s", exc, extra={
                "id": worker_ctx.data.get("event_id"),
                "correlationid": worker_ctx.data.get("correlation_id")})
            errors = getattr(worker_ctx, EFFECT_ERRORS, None)
            if errors is None:
                errors = []
                setattr(worker_ctx, EFFECT_ERRORS, errors)
            errors.append(exc)

    def worker_teardown(self, worker_ctx):
        db = self._workers.pop(worker_ctx, None)
        if db is not None and db._conn is not None:  # worker_result never ran (killed)
            try:
                db.end(success=False)
            except Exception as exc:  # raising here would kill the container
                log.warning("rollback failed: %s", exc)
