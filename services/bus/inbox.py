"""The idempotent inbox: a consumer's effect and the message's idempotency key
are committed in one transaction, so a redelivered or duplicated message is
recognised and not applied twice. The table lives beside the effect (in the
legacy database) because only one transaction can make both durable at once.
"""
from __future__ import annotations

import weakref
from datetime import datetime, timezone
from typing import Callable, TypeVar

from sqlalchemy import Column, MetaData, String, Table
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError

from contracts.envelope import CloudEvent
from services.bus import metrics
from services.bus.consumer import DUPLICATE

T = TypeVar("T")

metadata = MetaData()
INBOX = Table(
    "RB_INBOX", metadata,
    Column("CONSUMER", String(120), primary_key=True),
    Column("IDEM_KEY", String(200), primary_key=True),
    Column("MESSAGE_ID", String(40), nullable=False),
    Column("RECEIVED_TS", String(32), nullable=False),
)


class _AlreadyApplied(Exception):
    pass


_ready: "weakref.WeakSet[Engine]" = weakref.WeakSet()


def ensure_inbox(engine: Engine) -> None:
    if engine not in _ready:
        metadata.create_all(engine)
        _ready.add(engine)


def apply_once(engine: Engine, consumer: str, event: CloudEvent,
               effect: Callable[[Connection], T]) -> T:
    """Run `effect(conn)` unless `event.idempotencykey` was applied by `consumer` before.

    The key is claimed first: a concurrent duplicate blocks on it and then
    sees it taken, so two workers racing on one sale make one posting.
    Returns DUPLICATE for a repeat.
    """
    ensure_inbox(engine)
    try:
        with engine.begin() as conn:
            try:
                conn.execute(INBOX.insert().values(
                    CONSUMER=consumer, IDEM_KEY=event.idempotencykey, MESSAGE_ID=event.id,
                    RECEIVED_TS=datetime.now(timezone.utc).isoformat()))
            except IntegrityError:
                raise _AlreadyApplied from None
            return effect(conn)
    except _AlreadyApplied:
        metrics.DUPLICATES.labels(consumer).inc()
        return DUPLICATE
