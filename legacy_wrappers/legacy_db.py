"""`LegacyDatabase`: a legacy database behind SQLAlchemy Core, one engine per container.

SQLite is the embedded default: WAL so readers never block the writer,
`BEGIN IMMEDIATE` so a transaction takes the write lock up front (two
writers then queue instead of failing on a stale snapshot), and one pooled
connection per process because eventlet greenthreads share one OS thread
and must not wait on a lock held by a sibling that cannot run.
"""
from __future__ import annotations

from eventlet.semaphore import Semaphore
from nameko.extensions import DependencyProvider
from sqlalchemy import MetaData, Table, create_engine, event
from sqlalchemy.engine import Engine

def engine_for(dsn: str, **kwargs) -> Engine:
    if not dsn.startswith("sqlite"):
        return create_engine(dsn, pool_pre_ping=True, **kwargs)
    engine = create_engine(dsn, pool_size=1, max_overflow=0, pool_timeout=60, **kwargs)

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
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


class LegacyDb:
    """What a worker gets: the engine, and the legacy tables as they really are."""

    def __init__(self, engine: Engine, tables: dict[str, Table]):
        self.engine = engine
        self.tables = tables


class LegacyDatabase(DependencyProvider):
    """The legacy database, with the tables named in `reflect` read from its catalogue.

    The DSN (an SQLAlchemy URL) is the service config's `config_key`.
    Reflection waits for the first worker: the legacy system may create its
    schema after we start.
    """

    def __init__(self, config_key: str = "LEGACY_DB_URI", reflect: tuple[str, ...] = ()):
        self.config_key = config_key
        self.reflect = reflect
        self._tables: dict[str, Table] | None = None
        self._lock = Semaphore(1)

    def setup(self):
        dsn = self.container.config.get(self.config_key)
        if not dsn:
            raise ValueError(f"{self.config_key} is not set in the service config")
        self.engine = engine_for(dsn)

    def get_dependency(self, worker_ctx):
        if self._tables is None:
            with self._lock:
                if self._tables is None:
                    md = MetaData()
                    md.reflect(self.engine, only=self.reflect)
                    self._tables = dict(md.tables)
        return LegacyDb(self.engine, self._tables)

    def stop(self):
        self.engine.dispose()

    kill = stop
