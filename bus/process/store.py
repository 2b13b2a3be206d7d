"""Where process instances live: their state, history, inbox and outbox, in one database.

One instance is one row of RB_PROCESS: its correlation key is unique per process (two
starts racing for one key make one instance: the loser's INSERT does nothing), and its
VERSION grows with every change, which is written `WHERE VERSION = <the one read>`
(optimistic concurrency: two processes handling messages of one instance at once
cannot both win; the loser's message is retried). RB_PROCESS_INBOX holds the
idempotency keys of the messages applied and RB_PROCESS_OUTBOX the commands (and cases)
to send, both written in the transaction that changes the state, so a state change,
the messages it sends and the message that caused it commit together or not at all.
RB_PROCESS_HISTORY is append-only: what happened to each instance, for `retailbus
processes show`. DUE_AT is when the awaited reply is late (unix seconds, indexed): the
timeouts are rows, not timers in memory, so they survive a restart.

SQLAlchemy Core, parameterised; SQLite (WAL, one connection per process, BEGIN
IMMEDIATE) is the default and PostgreSQL is tested. The messaging core sits below
legacy_wrappers, so the engine setup here is its own (the same choices as
legacy_wrappers/legacy_db.py).
"""
from __future__ import annotations

import json
import random
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone

import orjson
from sqlalchemy import (Column, Float, Index, Integer, MetaData, String, Table, Text, UniqueConstraint, bindparam,
                        create_engine, delete, event, func, inspect, select, update)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError

from bus.process.sql import Compiled, upsert

metadata = MetaData()
INSTANCES = Table(
    "RB_PROCESS", metadata,
    Column("PROCESS_ID", String(26), primary_key=True),
    Column("PROCESS", String(64), nullable=False),
    Column("CORR_KEY", String(200), nullable=False),
    Column("STATE", String(16), nullable=False),        # running | compensating | completed | failed
    Column("STEP", Integer, nullable=False),            # the step awaited (or being compensated)
    Column("ROUND", Integer, nullable=False),           # 0; +1 on every ops retry
    Column("VERSION", Integer, nullable=False),
    Column("DATA", Text, nullable=False),               # the process's own JSON
    Column("STEPS", Text, nullable=False),              # per step: status, attempts, sent_at, reason
    Column("DUE_AT", Float),                            # unix seconds the awaited reply is late; NULL: none
    Column("TRACE_ID", String(200), nullable=False),    # correlationid of the start message
    Column("CREATED_AT", String(32), nullable=False),
    Column("UPDATED_AT", String(32), nullable=False),
    UniqueConstraint("PROCESS", "CORR_KEY", name="UQ_RB_PROCESS_KEY"),
    Index("IX_RB_PROCESS_DUE", "DUE_AT"),
    Index("IX_RB_PROCESS_STATE", "PROCESS", "STATE"),
    Index("IX_RB_PROCESS_DONE", "STATE", "UPDATED_AT"),  # retention: the oldest completed first
)
HISTORY = Table(
    "RB_PROCESS_HISTORY", metadata,
    Column("ID", Integer, primary_key=True, autoincrement=True),
    Column("PROCESS_ID", String(26), nullable=False),
    Column("AT", String(32), nullable=False),
    Column("STEP", String(64)),
    Column("WHAT", String(32), nullable=False),
    Column("DETAIL", Text),
    Index("IX_RB_PROCESS_HISTORY_ID", "PROCESS_ID", "ID"),
)
INBOX = Table(
    "RB_PROCESS_INBOX", metadata,
    Column("CONSUMER", String(120), primary_key=True),
    Column("IDEM_KEY", String(200), primary_key=True),
    Column("MESSAGE_ID", String(40), nullable=False),
    Column("RECEIVED_TS", String(32), nullable=False),
    Index("IX_RB_PROCESS_INBOX_RECEIVED", "RECEIVED_TS"),
)
OUTBOX = Table(
    "RB_PROCESS_OUTBOX", metadata,
    Column("ID", Integer, primary_key=True, autoincrement=True),
    Column("EVENT_ID", String(40), nullable=False),
    Column("EXCHANGE", String(120), nullable=False),
    Column("ROUTING_KEY", String(120), nullable=False),
    Column("CORRELATION_ID", String(200)),
    Column("BODY", Text, nullable=False),
    Column("CREATED_TS", String(32), nullable=False),
    Column("NEXT_AT", Float, nullable=False),           # not before (an unroutable row waits)
    Column("ATTEMPTS", Integer, nullable=False, default=0),
    Column("SENT_TS", String(32)),
    Index("IX_RB_PROCESS_OUTBOX_UNSENT", "SENT_TS", "ID"),
)
SQLITE_BUSY_SECONDS = 30.0


def _json(value) -> str:
    """An instance's JSON (its data, its steps, a history line's detail), by orjson, several
    times faster than json. What orjson refuses (an integer beyond 64 bits) json writes, as
    before; what neither knows is written as text."""
    try:
        return orjson.dumps(value, default=str, option=orjson.OPT_NON_STR_KEYS).decode()
    except orjson.JSONEncodeError:
        return json.dumps(value, default=str)


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat()


class ConcurrentUpdate(Exception):
    """Another handler changed the instance since it was read: the message is retried."""


def open_engine(dsn: str) -> Engine:
    """SQLite: WAL, synchronous FULL, BEGIN IMMEDIATE (a writer takes the lock up front),
    one pooled connection (greenthreads must not wait in sqlite's busy loop on a lock a
    sibling holds); PostgreSQL: a pool, pinged before use."""
    if not dsn.startswith("sqlite"):
        return create_engine(dsn, pool_pre_ping=True)
    engine = create_engine(dsn, pool_size=1, max_overflow=0, pool_timeout=60,
                           connect_args={"check_same_thread": False})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout={int(SQLITE_BUSY_SECONDS * 1000)}")
        deadline = time.monotonic() + SQLITE_BUSY_SECONDS
        while True:  # processes opening a fresh file together: the switch to WAL may say "locked" at once
            try:
                cur.execute("PRAGMA journal_mode=WAL")
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(random.uniform(0.005, 0.05))
        cur.execute("PRAGMA synchronous=FULL")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn):
        conn.connection.cursor().execute("BEGIN IMMEDIATE")  # the driver's: SQLAlchemy's costs more than it

    return engine


def create(engine: Engine, *more: MetaData) -> None:
    """The engine's tables (and the process service's own, `more`), and the indexes a database
    made by an older version lacks (create_all adds none to a table that exists); another
    process creating them at the same moment is no error (it looks again)."""
    for md in (metadata, *more):
        for attempt in range(3):
            try:
                md.create_all(engine)
                break
            except DBAPIError:
                if attempt == 2:
                    raise
    for index in INSTANCES.indexes:
        try:
            index.create(engine, checkfirst=True)
        except DBAPIError:
            if not inspect(engine).has_index(INSTANCES.name, index.name):
                raise


@contextmanager
def transaction(engine: Engine, durable: bool = True):
    """One transaction, committed in the greenthread. Not in an OS thread (eventlet tpool, as
    legacy_wrappers/legacy_db.py commits): the process database has one connection, so no other
    transaction could run during the fsync anyway, and through tpool the commit came back only
    when the hub came round again (after the consumer's parsing, the relay's publishing) while
    the connection stayed held, and each handoff cost CPU; messages that arrive during the fsync
    join the next batch instead (bench/README.md, process rows).
    `durable=False`: a change a power cut may lose without harm (the relay's marks of rows sent:
    such rows are sent again, as after a crash, and receivers absorb them by their keys) commits
    without waiting for the disk (SQLite: synchronous NORMAL for it, whose WAL frames the next
    durable commit syncs with its own; PostgreSQL: synchronous_commit off)."""
    with engine.connect() as conn:
        sqlite = conn.dialect.name == "sqlite"
        if not durable and sqlite:  # before BEGIN: SQLite refuses it inside a transaction
            conn.connection.cursor().execute("PRAGMA synchronous=NORMAL")
        try:
            tx = conn.begin()
            if not durable and not sqlite:
                conn.exec_driver_sql("SET LOCAL synchronous_commit = off")
            try:
                yield conn
            except BaseException:
                tx.rollback()
                raise
            tx.commit()
        finally:
            if not durable and sqlite:
                conn.connection.cursor().execute("PRAGMA synchronous=FULL")


I = INSTANCES.c
_INBOX_KEYS = ("CONSUMER", "IDEM_KEY", "MESSAGE_ID", "RECEIVED_TS")
_CLAIM = {name: Compiled(statement, _INBOX_KEYS) for name, statement in upsert(INBOX).items()}
_INSTANCE_KEYS = ("PROCESS_ID", "PROCESS", "CORR_KEY", "STATE", "STEP", "ROUND", "VERSION", "DATA", "STEPS", "DUE_AT",
                  "TRACE_ID", "CREATED_AT", "UPDATED_AT")
_INSERT_NEW = {name: Compiled(statement, _INSTANCE_KEYS)
               for name, statement in upsert(INSTANCES, index_elements=["PROCESS", "CORR_KEY"]).items()}
_LOAD = Compiled(select(INSTANCES).where(I.PROCESS_ID == bindparam("pid"), I.PROCESS == bindparam("process")))
_SAVE = Compiled(update(INSTANCES).where(I.PROCESS_ID == bindparam("pid"), I.VERSION == bindparam("read")).values(
    STATE=bindparam("state"), STEP=bindparam("step"), ROUND=bindparam("round"), VERSION=bindparam("version"),
    DATA=bindparam("data"), STEPS=bindparam("steps"), DUE_AT=bindparam("due_at"), UPDATED_AT=bindparam("at")))
_HISTORY = Compiled(HISTORY.insert(), ("PROCESS_ID", "AT", "STEP", "WHAT", "DETAIL"))
_OUTBOX_KEYS = ("EVENT_ID", "EXCHANGE", "ROUTING_KEY", "CORRELATION_ID", "BODY", "CREATED_TS", "NEXT_AT", "ATTEMPTS")
_OUTBOX = Compiled(OUTBOX.insert(), _OUTBOX_KEYS)


def claim(conn: Connection, consumer: str, key: str, message_id: str, at: str | None = None) -> bool:
    """Record the message's key in the caller's transaction (`at`: its time, default now); False:
    applied before."""
    row = dict(CONSUMER=consumer, IDEM_KEY=key, MESSAGE_ID=message_id, RECEIVED_TS=at or now_iso())
    return _CLAIM[conn.dialect.name].cursor(conn, row).rowcount == 1


@dataclass
class Instance:
    """An instance as read; `steps[i]`: {"status", "attempts", "sent_at", "reason"}."""

    process_id: str
    process: str
    key: str
    state: str
    step: int
    round: int
    version: int
    data: dict
    steps: list[dict]
    due_at: float | None
    trace_id: str
    created_at: str
    updated_at: str = ""
    history: list[tuple[str | None, str, dict]] = field(default_factory=list)  # to append on save

    @classmethod
    def of(cls, row: dict) -> "Instance":
        return cls(row["PROCESS_ID"], row["PROCESS"], row["CORR_KEY"], row["STATE"], row["STEP"], row["ROUND"],
                   row["VERSION"], orjson.loads(row["DATA"]), orjson.loads(row["STEPS"]), row["DUE_AT"],
                   row["TRACE_ID"], row["CREATED_AT"], row["UPDATED_AT"])

    def note(self, step: str | None, what: str, **detail) -> None:
        self.history.append((step, what, detail))


def insert_new(conn: Connection, inst: Instance) -> bool:
    """Insert a new instance; False when its process and key have one already."""
    now = now_iso()
    row = dict(PROCESS_ID=inst.process_id, PROCESS=inst.process, CORR_KEY=inst.key, STATE=inst.state,
               STEP=inst.step, ROUND=inst.round, VERSION=0, DATA="{}", STEPS=_json(inst.steps),
               DUE_AT=None, TRACE_ID=inst.trace_id, CREATED_AT=now, UPDATED_AT=now)
    return _INSERT_NEW[conn.dialect.name].cursor(conn, row).rowcount == 1


def load(conn: Connection, process: str, process_id: str) -> Instance | None:
    cursor = _LOAD.cursor(conn, {"pid": process_id, "process": process})
    found = cursor.fetchone()
    if found is None:
        return None
    return Instance.of(dict(zip((d[0] for d in cursor.description), found)))


def save(conn: Connection, inst: Instance, at: str | None = None) -> list[dict]:
    """Write the instance over the version it was read at (`at`: the change's time, default now);
    returns its new history rows, for `write` (a batch's rows go in one statement)."""
    inst.updated_at = at or now_iso()
    done = _SAVE.cursor(conn, dict(
        pid=inst.process_id, read=inst.version, state=inst.state, step=inst.step, round=inst.round,
        version=inst.version + 1, data=_json(inst.data), steps=_json(inst.steps), due_at=inst.due_at,
        at=inst.updated_at)).rowcount
    if done != 1:
        raise ConcurrentUpdate(f"process {inst.process_id} changed since version {inst.version}")
    inst.version += 1
    rows = [dict(PROCESS_ID=inst.process_id, AT=inst.updated_at, STEP=step, WHAT=what,
                 DETAIL=_json(detail) if detail else None) for step, what, detail in inst.history]
    inst.history = []
    return rows


def message_row(event_id: str, exchange: str, routing_key: str, correlation_id: str, body: bytes,
                at: str | None = None) -> dict:
    """An outbox row, for `write` (`at`: when it was queued, default now)."""
    return dict(EVENT_ID=event_id, EXCHANGE=exchange, ROUTING_KEY=routing_key, CORRELATION_ID=correlation_id,
                BODY=body.decode(), CREATED_TS=at or now_iso(), NEXT_AT=0.0, ATTEMPTS=0)


def queue_message(conn: Connection, event_id: str, exchange: str, routing_key: str, correlation_id: str,
                  body: bytes) -> None:
    """One message into the outbox in the caller's transaction, outside a transition (a
    service's own command, e.g. a cancellation a process waits for)."""
    _OUTBOX.cursor(conn, message_row(event_id, exchange, routing_key, correlation_id, body))


def write(conn: Connection, history: list[dict], outbox: list[dict]) -> None:
    """History lines and outbox messages of the transitions of one transaction."""
    if history:
        _HISTORY.many(conn, history)
    if outbox:
        _OUTBOX.many(conn, outbox)


def due(engine: Engine, process: str, at: float, limit: int) -> list[str]:
    """Instances of `process` whose awaited reply is late at `at`, earliest first."""
    c = INSTANCES.c
    with engine.connect() as conn:
        return list(conn.execute(select(c.PROCESS_ID).where(c.DUE_AT <= at, c.PROCESS == process)
                                 .order_by(c.DUE_AT).limit(limit)).scalars())


def counts(engine: Engine, process: str) -> dict[str, int]:
    c = INSTANCES.c
    with engine.connect() as conn:
        return dict(conn.execute(select(c.STATE, func.count()).where(c.PROCESS == process).group_by(c.STATE)).all())


def prune_completed(engine: Engine, older_than: datetime, limit: int) -> int:
    """Up to `limit` completed instances last changed before `older_than`, oldest first, with
    their history; returns how many. Running, compensating and failed instances (a failed one
    has an open case, which `cases retry` runs on) are never taken. A start message redelivered
    later is still known by its inbox key (kept `inbox_days`, past any redelivery); a late
    reply finds no instance ("orphan"), as a completed one would have ignored it."""
    c = INSTANCES.c
    with transaction(engine) as conn:
        ids = list(conn.execute(select(c.PROCESS_ID).where(c.STATE == "completed",
                                                           c.UPDATED_AT < older_than.isoformat())
                                .order_by(c.UPDATED_AT).limit(limit)).scalars())
        if ids:
            # the instances first: a transition racing on PostgreSQL then finds its row gone (ConcurrentUpdate)
            gone = list(conn.execute(delete(INSTANCES).where(c.PROCESS_ID.in_(ids), c.STATE == "completed")
                                     .returning(c.PROCESS_ID)).scalars())
            if gone:
                conn.execute(delete(HISTORY).where(HISTORY.c.PROCESS_ID.in_(gone)))
    return len(ids)


def prune(engine: Engine, older_than: datetime, limit: int) -> int:
    """Inbox keys and sent outbox rows from before `older_than`, up to `limit` of each."""
    cut, gone = older_than.isoformat(), 0
    with transaction(engine) as conn:
        for table, column in ((INBOX, INBOX.c.RECEIVED_TS), (OUTBOX, OUTBOX.c.SENT_TS)):
            keys = [c for c in table.primary_key.columns]
            old = conn.execute(select(*keys).where(column.is_not(None), column < cut).limit(limit)).all()
            for row in old:
                conn.execute(delete(table).where(*(k == v for k, v in zip(keys, row))))
            gone += len(old)
    return gone
