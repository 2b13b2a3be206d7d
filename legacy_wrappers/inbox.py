"""The idempotent inbox: a consumer's effect and the message's idempotency key
are committed in one transaction, so a redelivered or duplicated message is
recognised and not applied twice. The table lives beside the effect (in the
legacy database) because only one transaction can make both durable at once.

A key is kept `RETAILBUS.retention.inbox_days`, which the settings refuse to set
shorter than a message can come back (`prune`, in small batches by age).
"""
from __future__ import annotations

import weakref
from datetime import datetime, timezone
from typing import Callable, TypeVar

from sqlalchemy import Column, Index, MetaData, String, Table, delete, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from contracts.envelope import CloudEvent
from legacy_wrappers.legacy_db import commit_off_hub, create_indexes, create_tables, pairs_in
from legacy_wrappers.prepared import Prepared
from bus import metrics
from bus.consumer import DUPLICATE

T = TypeVar("T")

metadata = MetaData()
INBOX = Table(
    "RB_INBOX", metadata,
    Column("CONSUMER", String(120), primary_key=True),
    Column("IDEM_KEY", String(200), primary_key=True),
    Column("MESSAGE_ID", String(40), nullable=False),
    Column("RECEIVED_TS", String(32), nullable=False),
    Index("IX_RB_INBOX_RECEIVED", "RECEIVED_TS"),  # pruning by age reads the oldest keys only
)

_ready: "weakref.WeakSet[Engine]" = weakref.WeakSet()


def ensure_inbox(engine: Engine) -> None:
    """Create RB_INBOX once per engine (never while this greenthread holds a connection
    of a one-connection SQLite pool: create_all needs one of its own)."""
    if engine not in _ready:
        create_tables(engine, metadata)
        create_indexes(engine, INBOX)  # an inbox created before the index was added
        _ready.add(engine)


# Built and compiled once per dialect: a Core statement costs more to build than to run.
_CLAIM = {name: Prepared(insert(INBOX).on_conflict_do_nothing())
          for name, insert in (("sqlite", sqlite.insert), ("postgresql", postgresql.insert))}


def claim(conn: Connection, consumer: str, key: str, message_id: str) -> bool:
    """Record `key` for `consumer` in the caller's transaction; False if it was taken.

    Run it first in the transaction that applies the effect: a concurrent
    duplicate then blocks on the key (the row lock in PostgreSQL, the write
    lock in SQLite) until the first commits, and sees it taken, so two
    workers racing on one sale make one posting. `ON CONFLICT DO NOTHING`
    keeps the transaction usable after a conflict (PostgreSQL would abort it
    on an IntegrityError).
    """
    row = dict(CONSUMER=consumer, IDEM_KEY=key, MESSAGE_ID=message_id,
               RECEIVED_TS=datetime.now(timezone.utc).isoformat())
    if _CLAIM[conn.dialect.name](conn, row).rowcount == 1:
        return True
    metrics.DUPLICATES.labels(consumer).inc()
    return False


_CLAIM_MANY = {name: Prepared(insert(INBOX).on_conflict_do_nothing().returning(INBOX.c.CONSUMER, INBOX.c.IDEM_KEY))
               for name, insert in (("sqlite", sqlite.insert), ("postgresql", postgresql.insert))}


def claim_many(conn: Connection, claims: list[tuple[str, str, str]]) -> list[bool]:
    """`claim` for many (consumer, key, message id) at once, in one statement; True
    where the key was free. A key repeated within `claims` is taken by its first."""
    now = datetime.now(timezone.utc).isoformat()
    first: dict[tuple[str, str], str] = {}
    for consumer, key, message_id in claims:
        first.setdefault((consumer, key), message_id)
    rows = [dict(CONSUMER=c, IDEM_KEY=k, MESSAGE_ID=m, RECEIVED_TS=now) for (c, k), m in first.items()]
    taken = {tuple(r) for r in _CLAIM_MANY[conn.dialect.name](conn, rows)}
    result, seen = [], set()
    for consumer, key, _ in claims:
        fresh = (consumer, key) in taken and (consumer, key) not in seen
        seen.add((consumer, key))
        if not fresh:
            metrics.DUPLICATES.labels(consumer).inc()
        result.append(fresh)
    return result


def apply_once(engine: Engine, consumer: str, event: CloudEvent, effect: Callable[[Connection], T]) -> T:
    """`effect(conn)` in its own transaction, once per `event.idempotencykey`; DUPLICATE for a repeat.

    For handlers without a per-worker transaction; with `LegacyDatabase` use
    `claim(self.db.conn, ...)` so the key commits with the worker's effects.
    """
    ensure_inbox(engine)
    with engine.begin() as conn:
        if not claim(conn, consumer, event.idempotencykey, event.id):
            return DUPLICATE
        return effect(conn)


def prune(engine: Engine, older_than: datetime, limit: int) -> int:
    """Delete up to `limit` keys received before `older_than` (any consumer); returns how many."""
    ensure_inbox(engine)
    c = INBOX.c
    with engine.connect() as conn:
        tx = conn.begin()
        old = conn.execute(select(c.CONSUMER, c.IDEM_KEY).where(c.RECEIVED_TS < older_than.isoformat())
                           .order_by(c.RECEIVED_TS).limit(limit)).all()
        if old:
            conn.execute(delete(INBOX).where(pairs_in(c.CONSUMER, c.IDEM_KEY, old)))
        commit_off_hub(tx)  # SQLite's fsync in an OS thread: the consumers' loop goes on
    return len(old)
