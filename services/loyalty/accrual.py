"""What a posting means for points, and the rows that remember it (plain functions).

`earn` applies the earning rules to a posted sale; `plan_reversal` works out what a
posted return takes back at the platform (the points its lines earned there, never
more than the sale earned in all) and what it refunds of the points redeemed on the sale (in
proportion to the amount returned, never more than was redeemed).
"""
from __future__ import annotations

from datetime import datetime, timezone
from typing import NamedTuple

from sqlalchemy import func, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from contracts.erp import ErpReturnPostedV1, ErpSalePostedV1
from contracts.errors import RetailbusError
from services.loyalty.platform import UnknownMemberError
from services.loyalty.rules import Earning, eligible_spend, reversal, sale_points, threshold_promotion
from services.loyalty.tables import ACCRUALS, HOLDS, REVERSALS


PROMOTION_LINE = 0  # LOY_ACCRUAL's line of a sale's threshold promotion bonus


class Earned(NamedTuple):
    tier: str
    points: list[int]  # per line of the sale, in order
    bonus: int = 0     # a threshold promotion's, on top of the lines'
    promotion: str | None = None

    @property
    def total(self) -> int:
        return sum(self.points) + self.bonus


class Reversal(NamedTuple):
    card: str
    original_pos_txn_id: str
    points: int   # earned points taken back
    refund: int   # redeemed points given back


class OriginalNotSeenError(RetailbusError):
    """Raised when a return's sale has not been settled here yet: retried until it has."""


def now() -> str:
    return datetime.now(timezone.utc).isoformat()


def upsert(conn: Connection, table, row: dict) -> None:
    """Insert `row` unless its key exists (a replay of the same fact)."""
    insert = (postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert)(table)
    conn.execute(insert.values(**row).on_conflict_do_nothing())


def record_hold(conn: Connection, hold: dict, store: str, pos_txn_id: str, offline: bool,
                status: str = "held") -> None:
    upsert(conn, HOLDS, dict(HOLD_ID=hold["hold_id"], CARD=hold["card"], STORE_ID=store, POS_TXN_ID=pos_txn_id,
                             POINTS=hold["points"], STATUS=status, OFFLINE=int(offline),
                             EXPIRES_AT=hold["expires_at"], UPDATED_AT=now()))


def mark_hold(conn: Connection, hold_id: str, status: str) -> None:
    conn.execute(update(HOLDS).where(HOLDS.c.HOLD_ID == hold_id).values(STATUS=status, UPDATED_AT=now()))


def holds_of(engine: Engine, keys: list[tuple[str, str]]) -> dict[tuple[str, str], tuple[list[dict], bool]]:
    """Per (store, POS id): its holds still held, and whether its store redeemed offline for
    it; one read for a batch of sales."""
    out: dict[tuple[str, str], tuple[list[dict], bool]] = {key: ([], False) for key in keys}
    if not keys:
        return out
    c = HOLDS.c
    with engine.connect() as conn:  # by the POS id's index: SQLite scans the table for a (store, id) IN list
        rows = conn.execute(select(HOLDS).where(c.POS_TXN_ID.in_(sorted({pos for _, pos in keys})),
                                                or_(c.STATUS == "held", c.OFFLINE == 1))).mappings().all()
    for row in rows:
        if (row["STORE_ID"], row["POS_TXN_ID"]) not in out:
            continue  # another store's transaction of the same POS id
        held, offline = out[(row["STORE_ID"], row["POS_TXN_ID"])]
        if row["STATUS"] == "held":
            held.append(dict(row))
        out[(row["STORE_ID"], row["POS_TXN_ID"])] = (held, offline or bool(row["OFFLINE"]))
    return out


def online_holds(engine: Engine, store: str, pos_txn_id: str) -> list[dict]:
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(select(HOLDS).where(
            HOLDS.c.STORE_ID == store, HOLDS.c.POS_TXN_ID == pos_txn_id, HOLDS.c.OFFLINE == 0)).mappings()]


def settled_holds(engine: Engine, store: str, pos_txn_id: str) -> int:
    """How many of the transaction's online holds were released: the attempt a new one is."""
    with engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(HOLDS).where(
            HOLDS.c.STORE_ID == store, HOLDS.c.POS_TXN_ID == pos_txn_id, HOLDS.c.OFFLINE == 0,
            HOLDS.c.STATUS == "released")).scalar()


def expired_holds(engine: Engine, at: str, limit: int = 200) -> list[dict]:
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(select(HOLDS).where(
            HOLDS.c.STATUS == "held", HOLDS.c.EXPIRES_AT < at).limit(limit)).mappings()]


def earn(platform, earning: Earning, doc: ErpSalePostedV1) -> Earned | None:
    """The sale's points per line at the member's tier; None for a card the platform does not know."""
    try:
        tier = platform.member(doc.loyalty_card)["tier"]
    except UnknownMemberError:
        return None
    lines = [(line.sku, line.quantity, line.line_total_minor) for line in doc.lines]
    promotion = threshold_promotion(earning, doc.business_day,
                                    eligible_spend(earning, [(line.sku, line.line_total_minor) for line in doc.lines]))
    return Earned(tier, sale_points(earning, tier, doc.business_day, lines),
                  promotion.bonus_points if promotion else 0, promotion.name if promotion else None)


def record_sale(conn: Connection, doc: ErpSalePostedV1, booked: Earned | None) -> None:
    """The sale's lines and what each earned at the platform (`booked`; 0 where the platform
    booked nothing: no card, or the points file earned it): a return takes back what the
    platform earned for its lines, whatever the mode then, and needs the lines in any mode
    to refund redeemed points in proportion; the daily settlement sums these points."""
    points = booked.points if booked else [0] * len(doc.lines)
    for n, (line, line_points) in enumerate(zip(doc.lines, points), start=1):
        upsert(conn, ACCRUALS, dict(STORE_ID=doc.store_id, POS_TXN_ID=doc.pos_txn_id, LINE_NO=n,
                                    CARD=doc.loyalty_card or "", BUSINESS_DAY=doc.business_day.isoformat(),
                                    SKU=line.sku, QUANTITY=line.quantity,
                                    LINE_TOTAL_MINOR=line.line_total_minor, POINTS=line_points))
    if booked and booked.bonus:  # line 0: the promotion's bonus, which no returned SKU matches
        upsert(conn, ACCRUALS, dict(STORE_ID=doc.store_id, POS_TXN_ID=doc.pos_txn_id, LINE_NO=PROMOTION_LINE,
                                    CARD=doc.loyalty_card or "", BUSINESS_DAY=doc.business_day.isoformat(),
                                    SKU=f"promotion:{booked.promotion}", QUANTITY=0, LINE_TOTAL_MINOR=0,
                                    POINTS=booked.bonus))


def plan_reversal(engine: Engine, doc: ErpReturnPostedV1) -> Reversal | None:
    if not doc.original_pos_txn_id:
        return None  # a receipt-less return earned nothing here and redeemed nothing
    with engine.connect() as conn:
        sale = list(conn.execute(select(ACCRUALS).where(
            ACCRUALS.c.STORE_ID == doc.store_id, ACCRUALS.c.POS_TXN_ID == doc.original_pos_txn_id)).mappings())
        redeemed = conn.execute(select(func.coalesce(func.sum(HOLDS.c.POINTS), 0)).where(
            HOLDS.c.STORE_ID == doc.store_id, HOLDS.c.POS_TXN_ID == doc.original_pos_txn_id,
            HOLDS.c.STATUS == "captured")).scalar()
        before = conn.execute(select(func.coalesce(func.sum(REVERSALS.c.POINTS), 0),
                                     func.coalesce(func.sum(REVERSALS.c.REFUNDED), 0)).where(
            REVERSALS.c.STORE_ID == doc.store_id, REVERSALS.c.ORIGINAL_TXN_ID == doc.original_pos_txn_id,
            REVERSALS.c.RETURN_TXN_ID != doc.pos_txn_id)).one()
    if not sale:
        # The ERP's record of a sale without a card says it earned and redeemed nothing here:
        # its lines may be gone already (services/loyalty/retention.py), so none to wait for.
        if doc.loyalty_card and not (doc.original is not None and not doc.original.loyalty_card):
            raise OriginalNotSeenError(f"{doc.store_id}/{doc.original_pos_txn_id}: sale not settled here yet")
        return None
    card = sale[0]["CARD"] or doc.loyalty_card or ""
    if not card:
        return None
    accrued = [(r["SKU"], r["QUANTITY"], r["POINTS"]) for r in sale]
    returned = [(line.sku, abs(line.quantity)) for line in doc.lines]
    earned_total = sum(p for _, _, p in accrued)
    points = min(reversal(accrued, returned), max(0, earned_total - before[0]))
    sale_total = sum(r["LINE_TOTAL_MINOR"] for r in sale)
    refund = 0
    if redeemed and sale_total > 0:
        refund = min(redeemed * min(abs(doc.total_minor), sale_total) // sale_total, max(0, redeemed - before[1]))
    return Reversal(card, doc.original_pos_txn_id, points, refund)


def record_reversal(conn: Connection, doc: ErpReturnPostedV1, plan: Reversal) -> None:
    upsert(conn, REVERSALS, dict(STORE_ID=doc.store_id, RETURN_TXN_ID=doc.pos_txn_id,
                                 ORIGINAL_TXN_ID=plan.original_pos_txn_id, CARD=plan.card,
                                 BUSINESS_DAY=doc.business_day.isoformat(), POINTS=plan.points,
                                 REFUNDED=plan.refund))
