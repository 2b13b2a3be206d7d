"""The return authorisation policy (config/returns.yaml) and what it says of a posted return.

Plain functions over plain values, unit-tested without a broker. A return is judged
after the ERP posted it (the till refunded already, so a return against the policy is
posted all the same and opens a case for store operations), by the ERP's record of the
original sale (`erp.return_posted.v1`'s `original`): the return window counted from the
sale's business day; per SKU, units not above those sold minus those returned before
(by the ERP's document order); the refund not above the price actually paid after
discounts for the units returned; and, without a receipt, a customer's receipt-less
returns per period (counted here, RET_RECEIPTLESS, in the transaction of the judgement;
pruned once older than any period still judged: `receiptless_days`).

Campaign eligibility: a threshold promotion (spend X get Y bonus points, in
config/loyalty.yaml, `earning.threshold_promotions`) the sale reached and that this
return takes it back below is clawed back: the bonus, once per sale (the return that
crosses the threshold). The spend is the earning lines' amount paid, what is left of
each SKU valued at its price paid.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import date, timedelta
from fractions import Fraction
from math import ceil
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import Column, Integer, MetaData, String, Table, delete, func, select, tuple_
from sqlalchemy.engine import Connection

from bus import yaml_config
from contracts.erp import ErpReturnPostedV1
from contracts.errors import RetailbusError
from contracts.pos import PosReturnV1
from services.loyalty.rules import Earning, eligible, threshold_promotion


class ReturnsConfigError(RetailbusError):
    """Raised when config/returns.yaml is missing or invalid; names the field (or the YAML line)."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Receiptless(Strict):
    max_returns: int = Field(2, ge=0, description="receipt-less returns a customer may make per period")
    max_amount_minor: int = Field(10_000, ge=0, description="their refunds' total per period, in minor units")
    period_days: int = Field(30, ge=1, le=366, description="the period, in business days up to the return's")


class ReturnPolicy(Strict):
    window_days: int = Field(30, ge=0, le=3650, description="days after the sale's business day a return is in time")
    receiptless: Receiptless = Receiptless()


class ReturnsConfig(Strict):
    policy: ReturnPolicy = ReturnPolicy()


def load(path: Path | str) -> ReturnsConfig:
    return yaml_config.load_model(path, ReturnsConfig, ReturnsConfigError)


metadata = MetaData()
RECEIPTLESS = Table(
    "RET_RECEIPTLESS", metadata,                       # receipt-less returns, for the limit per customer
    Column("STORE_ID", String(16), primary_key=True),
    Column("POS_TXN_ID", String(64), primary_key=True),
    Column("CUSTOMER", String(80), nullable=False, index=True),   # customer id, else card, else anonymous@store
    Column("BUSINESS_DAY", String(10), nullable=False),
    Column("AMOUNT_MINOR", Integer, nullable=False),
)


@dataclass(frozen=True)
class Finding:
    case_type: str
    summary: str


def judge(ret: PosReturnV1, posted: ErpReturnPostedV1, policy: ReturnPolicy,
          receiptless: tuple[int, int] | None = None) -> list[Finding]:
    """What the return breaks of the policy, as cases to open. `receiptless`: for a return
    without a receipt, (count, amount) of the customer's receipt-less returns in the
    period, this one included."""
    what = f"return {ret.store_id}/{ret.pos_txn_id}"
    if ret.original is None:
        count, amount = receiptless or (1, ret.total_minor)
        limit = policy.receiptless
        if count > limit.max_returns or amount > limit.max_amount_minor:
            return [Finding("return_receiptless_over_limit", (
                f"{what} without a receipt: {count} receipt-less returns for {amount} minor units in "
                f"{limit.period_days} days, the limit is {limit.max_returns} for {limit.max_amount_minor}"))]
        return []
    sale = posted.original
    if sale is None:
        return [Finding("return_original_not_found", f"{what}: the sale {ret.original.store_id}/"
                                                      f"{ret.original.pos_txn_id} is not posted in the ERP")]
    found = []
    late = (ret.business_day - sale.business_day).days - policy.window_days
    if late > 0:
        found.append(Finding("return_outside_window", (
            f"{what}: {late} days after the {policy.window_days}-day window of the sale {sale.doc_no} "
            f"of {sale.business_day}")))
    sold, paid, before = _sold(sale)
    over, above = [], []
    for sku, (units, refund) in sorted(_per_sku(ret.lines).items()):
        left = sold.get(sku, 0) - before.get(sku, 0)
        if units > left:
            over.append(f"{sku}: {units} returned, {sold.get(sku, 0)} sold, {before.get(sku, 0)} returned before")
        elif refund > (allowed := ceil(Fraction(paid[sku] * units, sold[sku]))):
            above.append(f"{sku}: {refund} refunded for {units}, {allowed} paid for them")
    if over:
        found.append(Finding("return_over_quantity", f"{what} against {sale.doc_no}: " + "; ".join(over)))
    if above:
        found.append(Finding("return_above_price_paid", f"{what} against {sale.doc_no}: " + "; ".join(above)))
    return found


def clawback(earning: Earning, posted: ErpReturnPostedV1) -> tuple[str, int] | None:
    """(promotion, bonus points) this return takes back: the sale reached the promotion's
    threshold before it and no longer does after it; None otherwise."""
    sale = posted.original
    if sale is None or not sale.loyalty_card:
        return None
    spend: dict[str, list[int]] = defaultdict(lambda: [0, 0])  # sku -> [units, paid] of the earning lines
    for line in sale.lines:
        if eligible(earning, line.sku, line.line_total_minor):
            spend[line.sku][0] += line.quantity
            spend[line.sku][1] += line.line_total_minor
    promotion = threshold_promotion(earning, sale.business_day, sum(paid for _, paid in spend.values()))
    if promotion is None:
        return None
    _, _, before = _sold(sale)
    now = {sku: units for sku, (units, _) in _per_sku(posted.lines).items()}

    def left(returned: dict[str, int]) -> Fraction:
        return sum((Fraction(paid * max(0, units - returned.get(sku, 0)), units)
                    for sku, (units, paid) in spend.items() if units > 0), Fraction(0))

    after = {sku: before.get(sku, 0) + now.get(sku, 0) for sku in set(before) | set(now)}
    if left(before) >= promotion.min_spend_minor > left(after):
        return promotion.name, promotion.bonus_points
    return None


def receiptless_in_period(conn: Connection, ret: PosReturnV1, period_days: int) -> tuple[int, int]:
    """Record a receipt-less return (once) and count (returns, amount) of its customer's in the
    period up to its business day, this one included. The customer: its customer id, else
    its card, else every anonymous receipt-less return of the store counts together."""
    customer = (ret.customer_id or ret.loyalty_card or f"anonymous@{ret.store_id}")[:80]
    r = RECEIPTLESS.c
    if conn.execute(select(r.POS_TXN_ID).where(r.STORE_ID == ret.store_id, r.POS_TXN_ID == ret.pos_txn_id)).first() \
            is None:
        conn.execute(RECEIPTLESS.insert().values(STORE_ID=ret.store_id, POS_TXN_ID=ret.pos_txn_id, CUSTOMER=customer,
                                                 BUSINESS_DAY=ret.business_day.isoformat(),
                                                 AMOUNT_MINOR=ret.total_minor))
    since = (ret.business_day - timedelta(days=period_days - 1)).isoformat()
    count, amount = conn.execute(select(func.count(), func.coalesce(func.sum(r.AMOUNT_MINOR), 0)).where(
        r.CUSTOMER == customer, r.BUSINESS_DAY.between(since, ret.business_day.isoformat()))).one()
    return int(count), int(amount)


def receiptless_days(policy: ReturnPolicy, late_days: float) -> float:
    """Days (by business day) a receipt-less return is counted for: the period, and `late_days`
    more, the longest a return can still arrive after its business day (a store's outbox
    replayed, a parked message replayed, retries: RetailbusSettings.redelivery_days) and one
    for the business day against the clock. An older row falls in no period still judged."""
    return policy.receiptless.period_days + late_days + 1


def prune_receiptless(conn: Connection, older_than: date, limit: int) -> int:
    """Up to `limit` RET_RECEIPTLESS rows of business days before `older_than`; how many went."""
    r = RECEIPTLESS.c
    oldest = select(r.STORE_ID, r.POS_TXN_ID).where(r.BUSINESS_DAY < older_than.isoformat()).limit(limit)
    # the keys a subquery: SQLite searches the primary key (a list of row values scans the table)
    return conn.execute(delete(RECEIPTLESS).where(tuple_(r.STORE_ID, r.POS_TXN_ID).in_(oldest))).rowcount


def _sold(sale) -> tuple[dict[str, int], dict[str, int], dict[str, int]]:
    """Per SKU: units sold, amount paid, units returned before."""
    sold: dict[str, int] = defaultdict(int)
    paid: dict[str, int] = defaultdict(int)
    for line in sale.lines:
        sold[line.sku] += line.quantity
        paid[line.sku] += line.line_total_minor
    return sold, paid, {line.sku: line.quantity for line in sale.returned_before}


def _per_sku(lines) -> dict[str, tuple[int, int]]:
    """(units, amount) per SKU of return lines (a till's or the ERP's)."""
    out: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for line in lines:
        out[line.sku][0] += abs(line.quantity)
        out[line.sku][1] += abs(line.line_total_minor)
    return {sku: (units, amount) for sku, (units, amount) in out.items()}
