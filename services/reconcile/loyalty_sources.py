"""Read the loyalty sides of a store's business day: what the loyalty service recorded
(its own database, read-only: what the platform earned per sale, the holds captured,
the returns' reversals and refunds, the exceptions, the settlements), the loyalty
platform's ledger (its HTTP API) and the ERP's loyalty postings (the LOYALTY tender's
GL 1300 debits of the day's bus-posted sales, RB_LOY_SETTLEMENT).

The platform is asked by creation date for the business day and the days either
side (a sale is booked when the ERP posts it, around its business day); what is
expected and still not found is asked for by its reference, so a store that posted
days late is looked up, not reported missing.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone

from sqlalchemy import BigInteger, Column, Engine, MetaData, String, Table, func, select

from legacy_wrappers.legacy_http import LegacyHttpClient
from services.erp.loyalty_gl import SETTLEMENTS as ERP_SETTLEMENTS
from services.loyalty import settlement
from services.loyalty.platform import SYSTEM, LoyaltyRefusedError, LoyaltyUnavailableError, PlatformClient
from services.loyalty.tables import ACCRUALS, EXCEPTIONS, HOLDS, REVERSALS, SETTLEMENTS

# The legacy ERP's columns we read (demo/legacy_erp/schema.py is the contract).
_legacy = MetaData()
SLS_HDR = Table("SLS_HDR", _legacy, Column("DOC_NO", String(12)), Column("DOC_TYPE", String(1)),
                Column("STORE_NO", String(8)), Column("POS_TXN_ID", String(40)), Column("TXN_DATE", String(8)),
                Column("CHANNEL", String(8)))
GL_PST = Table("GL_PST", _legacy, Column("DOC_NO", String(12)), Column("ACCOUNT", String(10)),
               Column("DR_CENTS", BigInteger), Column("CR_CENTS", BigInteger))
LOYALTY_ACCOUNT = "1300"


@dataclass
class LoyaltyRecords:
    """The loyalty service's view of one store and day."""
    sales: set[str] = field(default_factory=set)                      # every posted sale it saw
    earned: dict[str, int] = field(default_factory=dict)              # sale -> points the platform earned
    captured: dict[str, list[int]] = field(default_factory=dict)      # sale -> points of each captured hold
    over_redeemed: dict[str, int] = field(default_factory=dict)       # sale -> offline points not covered
    reversed: dict[str, tuple[int, int]] = field(default_factory=dict)  # return -> (points back, refunded)
    exceptions: list[tuple[str, str, str]] = field(default_factory=list)  # (kind, POS id, detail)
    settled: settlement.Figures | None = None                         # what its settlements carried
    current: settlement.Figures = settlement.Figures()                # what its tables say now


def loyalty_records(engine: Engine, store: str, day: date) -> LoyaltyRecords:
    a, h, r, x, s = ACCRUALS.c, HOLDS.c, REVERSALS.c, EXCEPTIONS.c, SETTLEMENTS.c
    out = LoyaltyRecords()
    iso = day.isoformat()
    with engine.connect() as conn:
        for txn, points in conn.execute(select(a.POS_TXN_ID, func.sum(a.POINTS)).where(
                a.STORE_ID == store, a.BUSINESS_DAY == iso).group_by(a.POS_TXN_ID)):
            out.sales.add(txn)
            if points:
                out.earned[txn] = int(points)
        sales = select(a.POS_TXN_ID).where(a.STORE_ID == store, a.BUSINESS_DAY == iso).distinct().subquery()
        for txn, points, status in conn.execute(
                select(h.POS_TXN_ID, h.POINTS, h.STATUS).join_from(HOLDS, sales, h.POS_TXN_ID == sales.c.POS_TXN_ID)
                .where(h.STORE_ID == store, h.STATUS.in_(("captured", "over_redeemed")))):
            if status == "captured":
                out.captured.setdefault(txn, []).append(int(points))
            else:
                out.over_redeemed[txn] = out.over_redeemed.get(txn, 0) + int(points)
        for txn, points, refunded in conn.execute(select(r.RETURN_TXN_ID, r.POINTS, r.REFUNDED).where(
                r.STORE_ID == store, r.BUSINESS_DAY == iso)):
            out.reversed[txn] = (int(points), int(refunded))
        day_txns = out.sales | set(out.reversed)
        for kind, txn, detail in conn.execute(select(x.KIND, x.POS_TXN_ID, x.DETAIL).where(
                x.STORE_ID == store, x.KIND.in_(("over_redemption", "reversal_refused")))):
            if txn in day_txns:
                out.exceptions.append((kind, txn, detail))
        [(count, *sums)] = conn.execute(select(func.count(), func.sum(s.POINTS_ISSUED), func.sum(s.POINTS_REDEEMED),
                                               func.sum(s.POINTS_REVERSED))
                                        .where(s.STORE_ID == store, s.BUSINESS_DAY == iso)).all()
        out.settled = settlement.Figures(*(int(v) for v in sums)) if count else None
        out.current = settlement.figures(conn, day, day).get((store, iso), settlement.Figures())
    return out


def known_txns(engine: Engine, store: str, txns: set[str]) -> set[str]:
    """Those of `txns` the loyalty service recorded on any day (a sale, a return or a hold)."""
    if not txns:
        return set()
    known: set[str] = set()
    wanted = sorted(txns)
    with engine.connect() as conn:
        for n in range(0, len(wanted), 500):
            part = wanted[n:n + 500]
            for table, column in ((ACCRUALS, ACCRUALS.c.POS_TXN_ID), (REVERSALS, REVERSALS.c.RETURN_TXN_ID),
                                  (HOLDS, HOLDS.c.POS_TXN_ID)):
                known.update(conn.execute(select(column).where(table.c.STORE_ID == store, column.in_(part))).scalars())
    return known


class PlatformUnavailableError(LoyaltyUnavailableError):
    """Raised when the loyalty platform cannot list its ledger for reconciliation."""


def platform_client(http: str, timeout: float) -> PlatformClient:
    return PlatformClient(LegacyHttpClient(f"http://{http}", timeout, system=SYSTEM))


def platform_entries(client: PlatformClient, store: str, day: date, wanted: set[str]) -> list[dict]:
    """The ledger entries of `store` booked around `day`, and those whose reference is one of
    `wanted` (`<store>/<POS id>`) wherever they were booked; each entry once."""
    try:
        entries = {}
        for offset in (-1, 0, 1):
            for e in client.transactions(day=(day + timedelta(days=offset)).isoformat()):
                if e.get("store") == store:
                    entries[e["txn_id"]] = e
        for reference in sorted(wanted - {e["reference"] for e in entries.values()}):
            for e in client.transactions(reference=reference):
                entries[e["txn_id"]] = e
    except (LoyaltyUnavailableError, LoyaltyRefusedError) as exc:
        raise PlatformUnavailableError(f"loyalty platform: {exc}") from None
    return list(entries.values())


def erp_loyalty_tenders(legacy: Engine, store: str, day: date) -> dict[str, int]:
    """POS id -> the GL 1300 debit (LOYALTY tender, cents) of each bus-posted sale of the day
    (a legacy-route sale never reaches the loyalty service: its redemption is not ours)."""
    h, g = SLS_HDR.c, GL_PST.c
    with legacy.connect() as conn:
        rows = conn.execute(select(h.POS_TXN_ID, func.sum(g.DR_CENTS))
                            .join_from(SLS_HDR, GL_PST, g.DOC_NO == h.DOC_NO)
                            .where(h.STORE_NO == store, h.TXN_DATE == day.strftime("%Y%m%d"), h.DOC_TYPE == "S",
                                   h.CHANNEL == "RBUS", g.ACCOUNT == LOYALTY_ACCOUNT, g.DR_CENTS > 0)
                            .group_by(h.POS_TXN_ID)).all()
    return {txn: int(cents) for txn, cents in rows}


def erp_settlements(legacy: Engine, store: str, day: date) -> list[dict]:
    """RB_LOY_SETTLEMENT rows of the store and day (none before the erp posted any)."""
    c = ERP_SETTLEMENTS.c
    with legacy.connect() as conn:
        if not legacy.dialect.has_table(conn, ERP_SETTLEMENTS.name):
            return []
        return [dict(r) for r in conn.execute(select(ERP_SETTLEMENTS).where(
            c.STORE_NO == store, c.BUSINESS_DAY == day.strftime("%Y%m%d"))).mappings()]


def day_closed(config, day: date, now: datetime | None = None) -> bool:
    """Whether the loyalty service settles `day` by now (its settlement rules)."""
    return settlement.closed_days(now or datetime.now(timezone.utc), config)[1] >= day


def group_entries(entries: list[dict], store: str) -> dict[tuple[str, str], list[int]]:
    """(type, POS id) -> the signed points of each entry."""
    out: dict[tuple[str, str], list[int]] = defaultdict(list)
    prefix = f"{store}/"
    for e in entries:
        if e["reference"].startswith(prefix):
            out[(e["type"], e["reference"][len(prefix):])].append(int(e["points"]))
    return out
