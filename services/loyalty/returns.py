"""A return's points at the platform, on the return process's command (services/returns).

`refund` gives back the points redeemed on the sale, in proportion to the amount
returned; `reverse` takes back what the returned lines earned and the bonus of a
threshold promotion the sale no longer reaches (never more than the sale was granted,
recorded in LOY_CLAWBACK); `undo_refund` / `undo_reverse` take back exactly what the
step booked (the process's compensations). Every platform write is keyed by the
command's idempotency key, which a process keeps when it sends a command again, so
a repeat books nothing twice; a business refusal (the balance cannot cover a
reversal) raises `StepRefused`. LOY_REVERSAL keeps what each return refunded and
took back, as reconciliation and the daily settlement read it.

Plain functions: the platform calls come first, then the rows, in the caller's
transaction.
"""
from __future__ import annotations

from sqlalchemy import Column, Integer, MetaData, String, Table, delete, func, select, update
from sqlalchemy.engine import Connection, Engine

from bus.process import StepRefused
from contracts.erp import ErpReturnPostedV1
from contracts.returns import LoyaltyReturnPointsBookedV1, LoyaltyReturnPointsV1
from services.loyalty import accrual
from services.loyalty.platform import InsufficientPointsError, LoyaltyRefusedError
from services.loyalty.tables import ACCRUALS, REVERSALS

metadata = MetaData()
CLAWBACKS = Table(
    "LOY_CLAWBACK", metadata,                            # a threshold promotion's bonus a return took back
    Column("STORE_ID", String(16), primary_key=True),
    Column("RETURN_TXN_ID", String(64), primary_key=True),
    Column("ORIGINAL_TXN_ID", String(64), nullable=False, index=True),
    Column("PROMOTION", String(64), nullable=False),
    Column("POINTS", Integer, nullable=False),           # part of the return's LOY_REVERSAL.POINTS
)


class Refused(StepRefused):
    """The platform refused (`code`); the caller records the exception before it answers."""


def book(platform, engine: Engine, command: LoyaltyReturnPointsV1, key: str) -> LoyaltyReturnPointsBookedV1:
    """The platform part of `command`; raises Refused (the balance cannot cover it, the card
    is blocked) or the platform's unavailability (retried)."""
    doc, action = command.posted, command.action
    if action in ("refund", "reverse"):
        plan = accrual.plan_reversal(engine, doc)
        if plan is None:
            return _booked(doc, action, None, 0)
        points, clawback = plan.refund, 0
        if action == "reverse":
            clawback = min(command.clawback_points, _bonus_left(engine, doc)) if command.clawback_points else 0
            points = plan.points + clawback
        if points:
            kind, signed = ("REFUND", points) if action == "refund" else ("ADJUST", -points)
            _book(platform, plan.card, kind, signed, doc, key)
        return _booked(doc, action, plan.card, points, clawback)
    row = _reversal(engine, doc)
    points = (row.REFUNDED if action == "undo_refund" else row.POINTS) if row is not None else 0
    if points:
        _book(platform, row.CARD, "ADJUST", -points if action == "undo_refund" else points, doc, key)
    return _booked(doc, action, row.CARD if row is not None else None, points)


def record(conn: Connection, command: LoyaltyReturnPointsV1, booked: LoyaltyReturnPointsBookedV1) -> None:
    """What `book` booked, in LOY_REVERSAL (and LOY_CLAWBACK), in the caller's transaction."""
    doc, action = command.posted, command.action
    if booked.card is None:
        return
    accrual.upsert(conn, REVERSALS, dict(STORE_ID=doc.store_id, RETURN_TXN_ID=doc.pos_txn_id,
                                         ORIGINAL_TXN_ID=doc.original_pos_txn_id or "", CARD=booked.card,
                                         BUSINESS_DAY=doc.business_day.isoformat(), POINTS=0, REFUNDED=0))
    column = {"refund": "REFUNDED", "undo_refund": "REFUNDED", "reverse": "POINTS", "undo_reverse": "POINTS"}[action]
    value = booked.points if action in ("refund", "reverse") else 0
    r = REVERSALS.c
    conn.execute(update(REVERSALS).where(r.STORE_ID == doc.store_id, r.RETURN_TXN_ID == doc.pos_txn_id)
                 .values(**{column: value}))
    c = CLAWBACKS.c
    if action == "undo_reverse" or (action == "reverse" and booked.clawback_points):
        conn.execute(delete(CLAWBACKS).where(c.STORE_ID == doc.store_id, c.RETURN_TXN_ID == doc.pos_txn_id))
    if action == "reverse" and booked.clawback_points:
        conn.execute(CLAWBACKS.insert().values(STORE_ID=doc.store_id, RETURN_TXN_ID=doc.pos_txn_id,
                                               ORIGINAL_TXN_ID=doc.original_pos_txn_id or "",
                                               PROMOTION=command.clawback_promotion or "",
                                               POINTS=booked.clawback_points))


def _book(platform, card: str, kind: str, points: int, doc: ErpReturnPostedV1, key: str) -> None:
    try:
        platform.book(card, kind, points, f"{doc.store_id}/{doc.pos_txn_id}", doc.store_id, key=key)
    except InsufficientPointsError as exc:
        raise Refused("insufficient_points", f"card {card}: {kind} {points} points refused, the balance "
                      f"cannot cover it: {exc}") from exc
    except LoyaltyRefusedError as exc:
        raise Refused(getattr(exc, "code", None) or "refused", f"card {card}: {kind} {points} points "
                      f"refused: {exc}") from exc


def _booked(doc: ErpReturnPostedV1, action: str, card: str | None, points: int,
            clawback: int = 0) -> LoyaltyReturnPointsBookedV1:
    return LoyaltyReturnPointsBookedV1(store_id=doc.store_id, pos_txn_id=doc.pos_txn_id, action=action, card=card,
                                       points=points, clawback_points=clawback)


def _reversal(engine: Engine, doc: ErpReturnPostedV1):
    r = REVERSALS.c
    with engine.connect() as conn:
        return conn.execute(select(REVERSALS).where(r.STORE_ID == doc.store_id,
                                                    r.RETURN_TXN_ID == doc.pos_txn_id)).first()


def _bonus_left(engine: Engine, doc: ErpReturnPostedV1) -> int:
    """The sale's promotion bonus not taken back by another return yet."""
    a, c = ACCRUALS.c, CLAWBACKS.c
    with engine.connect() as conn:
        granted = conn.execute(select(func.coalesce(func.sum(a.POINTS), 0)).where(
            a.STORE_ID == doc.store_id, a.POS_TXN_ID == doc.original_pos_txn_id,
            a.LINE_NO == accrual.PROMOTION_LINE)).scalar()
        taken = conn.execute(select(func.coalesce(func.sum(c.POINTS), 0)).where(
            c.STORE_ID == doc.store_id, c.ORIGINAL_TXN_ID == doc.original_pos_txn_id,
            c.RETURN_TXN_ID != doc.pos_txn_id)).scalar()
    return max(0, granted - taken)
