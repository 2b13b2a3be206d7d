"""The daily settlement per store: what the platform issued, redeemed and took back for
a business day, for the ERP to book as liability (plain functions over the service's tables).

A durable schedule, not a clock: every pass looks at the closed business days of the
last `lookback_days` (a day closes `close_after_hours` after it ended, UTC), works out
each store's figures from what this service recorded (LOY_ACCRUAL: what the platform
earned per sale; LOY_REVERSAL: what returns took back and refunded; LOY_HOLD: the
captured redemptions, dated by their sale), subtracts what earlier settlements of that
day already carried, and records what is new as the next settlement (sequence 1 for
the day, then supplements for postings that came late) in LOY_SETTLEMENT, committed
before anything is sent. Sending is a second step: every recorded settlement not yet
confirmed by the broker is published and then marked. So a restart neither misses a
day (the next pass finds it) nor repeats one (the recorded figures are the ones sent,
under one idempotency key per sequence, which the erp's inbox holds), and two
processes racing on a day record it once (the primary key).
"""
from __future__ import annotations

from datetime import date, datetime, timedelta
from typing import NamedTuple

from sqlalchemy import and_, func, select, update
from sqlalchemy.engine import Connection

from contracts.loyalty import LoyaltySettlementV1
from services.loyalty.accrual import upsert
from services.loyalty.rules import LoyaltyConfig
from services.loyalty.tables import ACCRUALS, HOLDS, REVERSALS, SETTLEMENTS


class Figures(NamedTuple):
    issued: int = 0
    redeemed: int = 0
    reversed: int = 0

    def __sub__(self, other: "Figures") -> "Figures":
        return Figures(*(a - b for a, b in zip(self, other)))


Key = tuple[str, str]  # (store, business day YYYY-MM-DD)


def closed_days(now: datetime, config: LoyaltyConfig) -> tuple[date, date]:
    """The first and last business day a pass at `now` settles."""
    s = config.settlement
    last = (now - timedelta(hours=s.close_after_hours)).date() - timedelta(days=1)
    return last - timedelta(days=s.lookback_days - 1), last


def figures(conn: Connection, first: date, last: date) -> dict[Key, Figures]:
    """Every store and day in [first, last] with a posting recorded here, and its figures now."""
    a, r, h = ACCRUALS.c, REVERSALS.c, HOLDS.c
    span = (first.isoformat(), last.isoformat())
    out: dict[Key, list[int]] = {}
    for store, day, points in conn.execute(
            select(a.STORE_ID, a.BUSINESS_DAY, func.sum(a.POINTS)).where(a.BUSINESS_DAY.between(*span))
            .group_by(a.STORE_ID, a.BUSINESS_DAY)):
        out.setdefault((store, day), [0, 0, 0])[0] += int(points)
    for store, day, points, refunded in conn.execute(
            select(r.STORE_ID, r.BUSINESS_DAY, func.sum(r.POINTS), func.sum(r.REFUNDED))
            .where(r.BUSINESS_DAY.between(*span)).group_by(r.STORE_ID, r.BUSINESS_DAY)):
        entry = out.setdefault((store, day), [0, 0, 0])
        entry[0] += int(refunded)
        entry[2] += int(points)
    sales = (select(a.STORE_ID, a.POS_TXN_ID, a.BUSINESS_DAY).where(a.BUSINESS_DAY.between(*span))
             .distinct().subquery())
    for store, day, points in conn.execute(
            select(sales.c.STORE_ID, sales.c.BUSINESS_DAY, func.sum(h.POINTS))
            .join_from(HOLDS, sales, and_(h.STORE_ID == sales.c.STORE_ID, h.POS_TXN_ID == sales.c.POS_TXN_ID))
            .where(h.STATUS == "captured").group_by(sales.c.STORE_ID, sales.c.BUSINESS_DAY)):
        out.setdefault((store, day), [0, 0, 0])[1] += int(points)
    return {key: Figures(*values) for key, values in out.items()}


def settled(conn: Connection, first: date, last: date) -> dict[Key, tuple[Figures, int]]:
    """What the recorded settlements of each store and day carry in all, and their last sequence."""
    s = SETTLEMENTS.c
    rows = conn.execute(select(s.STORE_ID, s.BUSINESS_DAY, func.sum(s.POINTS_ISSUED), func.sum(s.POINTS_REDEEMED),
                               func.sum(s.POINTS_REVERSED), func.max(s.SEQUENCE))
                        .where(s.BUSINESS_DAY.between(first.isoformat(), last.isoformat()))
                        .group_by(s.STORE_ID, s.BUSINESS_DAY))
    return {(store, day): (Figures(int(i), int(rd), int(rv)), int(seq)) for store, day, i, rd, rv, seq in rows}


def due(now_figures: dict[Key, Figures], before: dict[Key, tuple[Figures, int]]) -> dict[Key, tuple[int, Figures]]:
    """(sequence, figures) to settle per store and day: the whole day when none was settled
    yet, else what grew since (a supplement); nothing when nothing grew. A figure that
    shrank (it cannot: every source only adds) is left to reconciliation, never sent negative."""
    out = {}
    for key, current in now_figures.items():
        carried, sequence = before.get(key, (Figures(), 0))
        delta = current - carried
        if sequence == 0 or (any(delta) and min(delta) >= 0):
            out[key] = (sequence + 1, Figures(*(max(0, v) for v in delta)))
    return out


def record_due(conn: Connection, now: datetime, config: LoyaltyConfig) -> int:
    """Record the settlements due at `now` (in the caller's transaction); returns how many."""
    first, last = closed_days(now, config)
    todo = due(figures(conn, first, last), settled(conn, first, last))
    for (store, day), (sequence, f) in sorted(todo.items()):
        upsert(conn, SETTLEMENTS, dict(STORE_ID=store, BUSINESS_DAY=day, SEQUENCE=sequence, POINTS_ISSUED=f.issued,
                                       POINTS_REDEEMED=f.redeemed, POINTS_REVERSED=f.reversed,
                                       POINT_VALUE_MINOR=config.redemption.point_value_minor,
                                       CURRENCY=config.settlement.currency, CREATED_AT=now.isoformat()))
    return len(todo)


def unsent(conn: Connection, limit: int = 500) -> list[dict]:
    s = SETTLEMENTS.c
    return [dict(r) for r in conn.execute(select(SETTLEMENTS).where(s.PUBLISHED_AT.is_(None))
                                          .order_by(s.BUSINESS_DAY, s.STORE_ID, s.SEQUENCE).limit(limit)).mappings()]


def message(row: dict) -> LoyaltySettlementV1:
    issued, redeemed, reversed_ = row["POINTS_ISSUED"], row["POINTS_REDEEMED"], row["POINTS_REVERSED"]
    return LoyaltySettlementV1(
        store_id=row["STORE_ID"], business_day=date.fromisoformat(row["BUSINESS_DAY"]), sequence=row["SEQUENCE"],
        points_issued=issued, points_redeemed=redeemed, points_reversed=reversed_,
        point_value_minor=row["POINT_VALUE_MINOR"],
        liability_minor=(issued - reversed_ - redeemed) * row["POINT_VALUE_MINOR"], currency=row["CURRENCY"])


def key(row: dict) -> str:
    return f"{LoyaltySettlementV1.TYPE}:{row['STORE_ID']}:{row['BUSINESS_DAY']}:{row['SEQUENCE']}"


def mark_sent(conn: Connection, rows: list[dict], at: datetime) -> None:
    s = SETTLEMENTS.c
    for row in rows:
        conn.execute(update(SETTLEMENTS).where(s.STORE_ID == row["STORE_ID"], s.BUSINESS_DAY == row["BUSINESS_DAY"],
                                               s.SEQUENCE == row["SEQUENCE"]).values(PUBLISHED_AT=at.isoformat()))
