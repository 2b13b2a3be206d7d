"""The journal database: hop records, indexed by every name a message or a row goes by.

`journal_hops` holds one row per hop, indexed by message id, correlation id and
subject. A batch hop (a chunk of 500 file rows, a written batch file) is
stored once with its items as JSON (a compact chunk of file rows is expanded
to its items here, off the files service's path); `journal_refs` indexes each item's key
and names (`refs`) with its position, so a single row's customer id or key
finds the batch hop and the row's line in it. SQLAlchemy Core; SQLite (WAL,
so `retailbus trace` reads while the service writes) or PostgreSQL.

Hops older than `RETAILBUS.retention.journal_days` go, and the oldest go
whatever their age while the database is over `journal_max_mb` (`prune`,
oldest first by `pk`, which grows with time, so no index on time is needed).
"""
from __future__ import annotations

import json
from itertools import takewhile

from sqlalchemy import (Column, Float, Index, Integer, MetaData, String, Table, Text, create_engine, delete, event,
                        func, or_, select, text)
from sqlalchemy.engine import Connection, Engine

from contracts.journal import JournalHopsV1
from legacy_wrappers.legacy_db import create_indexes, create_tables, switch_to_wal

metadata = MetaData()
HOPS = Table(
    "journal_hops", metadata,
    Column("pk", Integer, primary_key=True, autoincrement=True),
    Column("id", String(200)),
    Column("correlationid", String(200)),
    Column("subject", String(200)),
    Column("hop", String(40), nullable=False),
    Column("outcome", String(40), nullable=False),
    Column("time", Float, nullable=False),
    Column("service", String(80), nullable=False),
    Column("detail", Text),
    Column("items", Text),
    Index("ix_journal_hops_id", "id"),
    Index("ix_journal_hops_correlationid", "correlationid"),
    Index("ix_journal_hops_subject", "subject"),
)
REFS = Table(
    "journal_refs", metadata,
    Column("ref", String(200), nullable=False),
    Column("hop_pk", Integer, nullable=False),
    Column("item", Integer, nullable=False),
    Index("ix_journal_refs_ref", "ref"),
    Index("ix_journal_refs_hop", "hop_pk"),  # pruning a hop takes its refs
)
CONSUMER = "journal.on_hops"


def open_engine(dsn: str, create: bool = True) -> Engine:
    """The journal's engine; SQLite in WAL mode with a generous lock timeout."""
    sqlite = dsn.startswith("sqlite")
    engine = create_engine(dsn, connect_args={"timeout": 30} if sqlite else {})
    if sqlite:
        @event.listens_for(engine, "connect")
        def _wal(dbapi_conn, _record):
            switch_to_wal(dbapi_conn)
            dbapi_conn.execute("PRAGMA synchronous=NORMAL")
    if create:
        create_tables(engine, metadata)
        create_indexes(engine, REFS)  # a journal created before the index was added
    return engine


def write(conn: Connection, batch: JournalHopsV1, service: str) -> int:
    """Insert a batch of hops in the caller's transaction; returns how many."""
    plain, batched = [], []
    for hop in batch.hops:
        items = hop.all_items()  # a compact chunk of file rows is stored as its items
        row = dict(id=hop.id, correlationid=hop.correlationid, subject=hop.subject, hop=hop.hop,
                   outcome=hop.outcome, time=hop.time, service=hop.service or service,
                   detail=json.dumps(hop.detail, default=str) if hop.detail else None,
                   items=json.dumps([i.model_dump(exclude_defaults=True) for i in items]) if items else None)
        (batched if items else plain).append((row, items))
    if plain:
        conn.execute(HOPS.insert(), [row for row, _ in plain])
    for row, items in batched:
        pk = conn.execute(HOPS.insert().values(**row)).inserted_primary_key[0]
        refs = {(name, n) for n, item in enumerate(items) for name in (item.key, *item.refs) if name}
        conn.execute(REFS.insert(), [dict(ref=name, hop_pk=pk, item=n) for name, n in sorted(refs)])
    return len(batch.hops)


def direct(conn: Connection, name: str, by_subject: bool) -> list:
    """Hops whose message id or correlation id (or subject) is `name`."""
    h = HOPS.c
    where = [h.id == name, h.correlationid == name] + ([h.subject == name] if by_subject else [])
    return conn.execute(select(HOPS).where(or_(*where))).all()


def by_ref(conn: Connection, name: str) -> list:
    """(hop row, item position) of every batch item known by `name`."""
    return conn.execute(select(HOPS, REFS.c.item).join(REFS, REFS.c.hop_pk == HOPS.c.pk)
                        .where(REFS.c.ref == name)).all()


def prune(engine: Engine, older_than: float | None, limit: int) -> int:
    """Delete up to `limit` of the oldest hops (and their refs): those before `older_than`
    (unix time), or, with None, the oldest whatever their age. Returns how many."""
    h = HOPS.c
    with engine.begin() as conn:
        oldest = conn.execute(select(h.pk, h.time).order_by(h.pk).limit(limit)).all()
        if older_than is not None:  # up to the first young one: pk order is nearly time order
            oldest = list(takewhile(lambda row: row.time < older_than, oldest))
        pks = [row.pk for row in oldest]
        if pks:
            conn.execute(delete(REFS).where(REFS.c.hop_pk.in_(pks)))
            conn.execute(delete(HOPS).where(h.pk.in_(pks)))
    return len(pks)


def used_bytes(engine: Engine) -> int:
    """What the journal's data takes (SQLite: pages in use, not the free ones a prune left)."""
    with engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            pages = conn.exec_driver_sql("PRAGMA page_count").scalar() - conn.exec_driver_sql(
                "PRAGMA freelist_count").scalar()
            return pages * conn.exec_driver_sql("PRAGMA page_size").scalar()
        return conn.execute(select(func.pg_total_relation_size(text("'journal_hops'")) +
                                   func.pg_total_relation_size(text("'journal_refs'")))).scalar()
