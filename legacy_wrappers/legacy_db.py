"""`LegacyDatabase`: a legacy database behind SQLAlchemy Core, all-or-nothing per worker.

A worker's effects are all-or-nothing: its first use of `db.conn` opens a
SAVEPOINT on the process's one writing connection (`GroupCommit`, see
group_commit.py: one commit, one fsync, covers many workers); the savepoint
is released when the worker succeeded and rolled back when it failed, and
the worker ends only once the commit covering its effect is done. A failed
commit cannot be raised (an exception escaping `worker_result` kills the
container), so it is appended to the worker context's EFFECT_ERRORS list,
which `reliable_handler` reads to retry the message instead of acking it.
An RPC that must answer only what is durable calls `db.end(success=True)`
before returning: that waits for the covering commit too, and raises if it failed.

SQLite is the embedded default: WAL so readers never block the writer,
`BEGIN IMMEDIATE` on the writing connection so a transaction takes the write
lock up front (two processes then queue instead of failing on a stale
snapshot). Every write of a process goes through its one writing connection
(`LegacyEngines.group`), reads through a small pool of reading connections
(`LegacyEngines.engine`, plain deferred BEGIN): a second writing connection
in the process would block the one OS thread in sqlite's busy wait while our
own open transaction holds the lock, and nothing could commit it.
"""
from __future__ import annotations

import logging

from eventlet.semaphore import Semaphore
from nameko.extensions import DependencyProvider, SharedExtension
from sqlalchemy import MetaData, String, Table, create_engine, event
from sqlalchemy.engine import Connection, Engine

from legacy_wrappers.group_commit import GroupCommit

log = logging.getLogger(__name__)

# The worker-context attribute named by services.bus.consumer.EFFECT_ERRORS; spelled
# out here because legacy_wrappers must not import the bus (layering, see DESIGN.md).
EFFECT_ERRORS = "effect_errors"


def engine_for(dsn: str, writer: bool = False, **kwargs) -> Engine:
    """An engine for `dsn`; for SQLite, `writer` makes the one writing connection of
    the process (BEGIN IMMEDIATE), else a pool of readers (deferred BEGIN)."""
    if not dsn.startswith("sqlite"):
        return create_engine(dsn, pool_pre_ping=True, **kwargs)
    engine = create_engine(dsn, pool_size=1 if writer else 4, max_overflow=0, pool_timeout=60,
                           connect_args={"check_same_thread": False}, **kwargs)  # commits run in tpool

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):
        dbapi_conn.isolation_level = None  # SQLAlchemy emits BEGIN itself, below
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.execute("PRAGMA synchronous=FULL")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn):
        conn.exec_driver_sql("BEGIN IMMEDIATE" if writer else "BEGIN")

    return engine


class LegacyValueError(ValueError):
    """A value the legacy column cannot hold as given: refused, never truncated."""


def check_row(table: Table, row: dict) -> None:
    """Refuse a value that would not be stored verbatim: NUL characters (PostgreSQL
    cannot store them, C programs reading the table stop at them) and strings longer
    than the legacy column (PostgreSQL refuses them, SQLite would keep them and break
    the legacy programs that read fixed-width fields)."""
    for name, value in row.items():
        if not isinstance(value, str):
            continue
        column = table.c[name]
        if "\x00" in value:
            raise LegacyValueError(f"{table.name}.{name}: NUL characters cannot be stored")
        length = getattr(column.type, "length", None) if isinstance(column.type, String) else None
        if length is not None and len(value) > length:
            raise LegacyValueError(
                f"{table.name}.{name}: {len(value)} characters, the legacy column holds {length}")


class LegacyDb:
    """What a worker gets: the tables as they really are, `engine` for reading
    outside the worker's effect, and `conn`, the connection its effect runs on
    (a savepoint, opened on first use)."""

    def __init__(self, group: GroupCommit, engine: Engine, tables: dict[str, Table]):
        self.group, self.engine, self.tables = group, engine, tables
        self._conn: Connection | None = None
        self._savepoint = None

    @property
    def conn(self) -> Connection:
        if self._conn is None:
            self._conn, self._savepoint = self.group.enter()
        return self._conn

    def end(self, success: bool) -> None:
        """End the effect: durable when this returns (success), or rolled back. Raises a failed commit."""
        savepoint, self._conn, self._savepoint = self._savepoint, None, None
        if savepoint is None:
            return
        covered = self.group.leave(savepoint, success)
        if covered is not None:
            error = covered.wait()
            if error is not None:
                raise error


class LegacyEngines(SharedExtension):
    """Per DSN per container: one reading engine and one `GroupCommit` (the writer),
    shared by every extension using that database."""

    def __init__(self):
        self._engines: dict[str, Engine] = {}
        self._groups: dict[str, GroupCommit] = {}

    def _dsn(self, config_key: str) -> str:
        dsn = self.container.config.get(config_key)
        if not dsn:
            raise ValueError(f"{config_key} is not set in the service config")
        return dsn

    def engine(self, config_key: str) -> Engine:
        dsn = self._dsn(config_key)
        if dsn not in self._engines:
            self._engines[dsn] = engine_for(dsn)
        return self._engines[dsn]

    def group(self, config_key: str) -> GroupCommit:
        dsn = self._dsn(config_key)
        if dsn not in self._groups:
            writer = engine_for(dsn, writer=True) if dsn.startswith("sqlite") else self.engine(config_key)
            self._groups[dsn] = GroupCommit(writer, self.container.spawn_managed_thread)
        return self._groups[dsn]

    def stop(self):
        for group in self._groups.values():
            group.close()
            group.engine.dispose()
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
        self.group = self.engines.group(self.config_key)

    def tables(self) -> dict[str, Table]:
        if self._tables is None:
            with self._lock:
                if self._tables is None:
                    for metadata in self.create:  # DDL writes: through the writer
                        self.group.run(metadata.create_all)
                    md = MetaData()
                    md.reflect(self.engine, only=self.reflect)
                    self._tables = dict(md.tables)
        return self._tables

    def get_dependency(self, worker_ctx):
        db = LegacyDb(self.group, self.engine, self.tables())
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
        if db is not None and db._savepoint is not None:  # worker_result never ran (killed)
            try:
                db.end(success=False)
            except Exception as exc:  # raising here would kill the container
                log.warning("rollback failed: %s", exc)
