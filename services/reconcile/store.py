"""The reconcile service's own small database: the latest control totals each
store sent for each business day. A snapshot only replaces one taken at a
smaller `as_of`, so a redelivered or late older message never hides a newer one.
A v2 snapshot (digests) is a few hundred bytes; a v1 one (an agent not moved
yet) holds the day's list. Days older than `RETAILBUS.retention.reconcile_days`
are pruned (`prune`)."""
from __future__ import annotations

from datetime import UTC, date, datetime
from pathlib import Path

from sqlalchemy import (BigInteger, Column, Engine, MetaData, String, Table, Text, create_engine, delete, func, select,
                        update)

from contracts.control import StoreControlTotalsV1, StoreControlTotalsV2

Totals = StoreControlTotalsV1 | StoreControlTotalsV2
from legacy_wrappers.legacy_db import create_tables

metadata = MetaData()

CONTROL_TOTALS = Table(
    "control_totals", metadata,
    Column("store_id", String(8), primary_key=True),
    Column("business_day", String(10), primary_key=True),  # YYYY-MM-DD
    Column("as_of", BigInteger, nullable=False),
    Column("received_at", String(32), nullable=False),
    Column("body", Text, nullable=False),  # the StoreControlTotalsV1 or V2 as JSON
)


def open_engine(dsn: str) -> Engine:
    """The database at `dsn` (an absolute SQLAlchemy URL); its table is created when missing."""
    if dsn.startswith("sqlite:///"):
        Path(dsn[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(dsn, pool_pre_ping=not dsn.startswith("sqlite"))
    create_tables(engine, metadata)
    return engine


def keep_latest(engine: Engine, totals: Totals) -> bool:
    """Store `totals` unless a snapshot at the same or a later `as_of` is held; True if stored."""
    c = CONTROL_TOTALS.c
    key = (c.store_id == totals.store_id) & (c.business_day == totals.business_day.isoformat())
    row = dict(as_of=totals.as_of, received_at=datetime.now(UTC).isoformat(), body=totals.model_dump_json())
    with engine.begin() as conn:
        held = conn.execute(select(c.as_of).where(key)).scalar()
        if held is None:
            conn.execute(CONTROL_TOTALS.insert().values(
                store_id=totals.store_id, business_day=totals.business_day.isoformat(), **row))
            return True
        if held >= totals.as_of:
            return False
        conn.execute(update(CONTROL_TOTALS).where(key, c.as_of < totals.as_of).values(**row))
        return True


def parse(body: str) -> Totals:
    """The held JSON as the version it was sent in (v2 carries digests, v1 the list)."""
    if '"digest"' in body:
        return StoreControlTotalsV2.model_validate_json(body)
    return StoreControlTotalsV1.model_validate_json(body)


def totals_for(engine: Engine, day: date, store_id: str | None = None) -> dict[str, Totals]:
    c = CONTROL_TOTALS.c
    query = select(c.store_id, c.body).where(c.business_day == day.isoformat())
    if store_id:
        query = query.where(c.store_id == store_id)
    with engine.connect() as conn:
        return {s: parse(body) for s, body in conn.execute(query)}


def latest_days(engine: Engine) -> dict[str, date]:
    """Each store's most recent business day with totals: what the schedule reconciles."""
    c = CONTROL_TOTALS.c
    with engine.connect() as conn:
        return {s: date.fromisoformat(d) for s, d in conn.execute(
            select(c.store_id, func.max(c.business_day)).group_by(c.store_id))}


def prune(engine: Engine, before: date, limit: int) -> int:
    """Delete up to `limit` snapshots of business days before `before`; returns how many."""
    c = CONTROL_TOTALS.c
    with engine.begin() as conn:
        old = conn.execute(select(c.store_id, c.business_day).where(c.business_day < before.isoformat())
                           .limit(limit)).all()
        for store_id, day in old:
            conn.execute(delete(CONTROL_TOTALS).where(c.store_id == store_id, c.business_day == day))
    return len(old)
