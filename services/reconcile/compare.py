"""One store's business day held three ways: what the agent accepted (its
control totals), what the legacy ERP posted (SLS_HDR), what the loyalty points
file carried. Plain functions over plain rows, so every rule is unit-tested.

Rules:
- every accepted sale/return is one ERP document of its type (S/R) with the
  same total: none is `erp_missing`, two or more `erp_duplicated`, another
  total `amount_mismatch`; a document the agent never accepted is `erp_unexpected`;
- a sale/return that travelled the bus (the erp service posts it and announces
  it; the files service writes the points file) with a loyalty card and at
  least one point is one record in the points file (A for a sale, R for a
  return): `loyalty_missing`, `loyalty_duplicated`, `loyalty_unexpected` likewise,
  while the accrual mode at its posting (config/loyalty.yaml, by the ERP's
  CREATED_TS) says the file earns it (`file`, `shadow`; in `api` the platform
  does, which services/reconcile/loyalty.py checks). Legacy-mode transactions
  never reach the points file: the legacy ERP API does not announce its postings.
The gap is the number of findings; zero means the day reconciles.

The agent's totals cover what it had accepted when they were taken; a sale
posted since (a burst just now) is in the ERP and not yet in them. So a
document not in the totals but posted after they were taken, less
PENDING_SECONDS (the agent notes a legacy-mode sale just after the ERP booked
it, and the two clocks may differ a little), is `pending`, with its points
record: reported, not counted in the gap; the agent's next totals (every
`RETAILBUS.agent.control_totals_interval`) settle it either way.

With v2 totals (digests) the day is first compared digest to digest
(`digest_report`): when the ERP's and the points file's digests equal the
agent's, nothing can be named and the list is never fetched. Otherwise the
agent's list is fetched and compared as above; if the agent cannot be asked,
each differing side is a `digest_mismatch` finding with the counts.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from typing import Callable, ClassVar

from pydantic import BaseModel, ConfigDict, Field, computed_field

from contracts.control import ControlTxn, StoreControlTotalsV1, StoreControlTotalsV2, TxnDigest
from contracts.money import format_money
from services.files.mapping import points_for

ERP_KIND = {"S": "sale", "R": "return"}
LOYALTY_KIND = {"A": "sale", "R": "return"}
PENDING_SECONDS = 30.0


@dataclass(frozen=True)
class ErpDoc:
    kind: str  # sale | return
    pos_txn_id: str
    total_minor: int
    currency: str
    doc_no: str = ""
    created: str = ""  # CREATED_TS: when the ERP booked it (legacy format, UTC)


@dataclass(frozen=True)
class PointsRow:
    kind: str  # sale (A) | return (R)
    pos_txn_id: str
    points: int
    file: str = ""


class Finding(BaseModel):
    model_config = ConfigDict(frozen=True)

    kind: str
    pos_txn_id: str
    detail: str = ""


class Side(BaseModel):
    count: int = 0
    amount_minor: dict[str, int] = Field(default_factory=dict)


def _side(items) -> Side:
    amounts: dict[str, int] = {}
    for item in items:
        amounts[item.currency] = amounts.get(item.currency, 0) + item.total_minor
    return Side(count=len(items), amount_minor=amounts)


class StoreReport(BaseModel):
    store_id: str
    business_day: date
    totals_received: bool
    as_of: int | None = None
    agent: dict[str, Side]
    erp: dict[str, Side]
    loyalty: dict[str, int]
    erp_missing: list[Finding] = Field(default_factory=list)
    erp_duplicated: list[Finding] = Field(default_factory=list)
    erp_unexpected: list[Finding] = Field(default_factory=list)
    amount_mismatch: list[Finding] = Field(default_factory=list)
    loyalty_missing: list[Finding] = Field(default_factory=list)
    loyalty_duplicated: list[Finding] = Field(default_factory=list)
    loyalty_unexpected: list[Finding] = Field(default_factory=list)
    digest_mismatch: list[Finding] = Field(default_factory=list)
    # the loyalty platform's ledger vs the loyalty service vs the ERP's loyalty postings (reconcile/loyalty.py)
    loyalty_checked: bool = False
    loyalty_platform: dict[str, int] = Field(default_factory=dict)  # points per booking type at the platform
    platform_missing: list[Finding] = Field(default_factory=list)
    platform_doubled: list[Finding] = Field(default_factory=list)
    platform_mismatch: list[Finding] = Field(default_factory=list)
    platform_unexpected: list[Finding] = Field(default_factory=list)
    redemption_mismatch: list[Finding] = Field(default_factory=list)
    loyalty_exception: list[Finding] = Field(default_factory=list)
    settlement_mismatch: list[Finding] = Field(default_factory=list)
    loyalty_unavailable: list[Finding] = Field(default_factory=list)
    # click-and-collect orders: the experience API vs the ERP's order documents vs loyalty (reconcile/orders.py)
    orders_checked: bool = False
    orders: dict[str, int] = Field(default_factory=dict)  # accepted, collected, cancelled, open, erp_documents
    order_erp_missing: list[Finding] = Field(default_factory=list)
    order_unexpected: list[Finding] = Field(default_factory=list)
    order_status_mismatch: list[Finding] = Field(default_factory=list)
    order_amount_mismatch: list[Finding] = Field(default_factory=list)
    order_capture_mismatch: list[Finding] = Field(default_factory=list)
    pending: list[Finding] = Field(default_factory=list)  # posted after the totals were taken: no gap

    FINDINGS: ClassVar[tuple[str, ...]] = ("erp_missing", "erp_duplicated", "erp_unexpected", "amount_mismatch",
                "loyalty_missing", "loyalty_duplicated", "loyalty_unexpected", "digest_mismatch",
                "platform_missing", "platform_doubled", "platform_mismatch", "platform_unexpected",
                "redemption_mismatch", "loyalty_exception", "settlement_mismatch", "loyalty_unavailable",
                "order_erp_missing", "order_unexpected", "order_status_mismatch", "order_amount_mismatch",
                "order_capture_mismatch")

    @computed_field
    @property
    def gap(self) -> int:
        return sum(len(getattr(self, name)) for name in self.FINDINGS)


def _accepted(totals: StoreControlTotalsV1 | None) -> dict[tuple[str, str], ControlTxn]:
    if totals is None:
        return {}
    return {**{("sale", t.pos_txn_id): t for t in totals.sales.transactions},
            **{("return", t.pos_txn_id): t for t in totals.returns.transactions}}


def expects_points(txn: ControlTxn) -> bool:
    return txn.via == "bus" and txn.loyalty_card and points_for(txn.total_minor) > 0


def file_always(created: str | None) -> bool:
    return True


def reconcile(store_id: str, day: date, totals: StoreControlTotalsV1 | None,
              erp_docs: list[ErpDoc], points: list[PointsRow] | None,
              taken_at: datetime | None = None, file_earns: Callable[[str | None], bool] = file_always) -> StoreReport:
    """`points` None: no points file is configured, so the loyalty side is not checked.
    `taken_at`: when the totals whose transactions these are were taken (default theirs).
    `file_earns(created)`: whether the points file earns a transaction the ERP booked at
    `created` (CREATED_TS; None: not booked), by the accrual mode then (config/loyalty.yaml)."""
    accepted = _accepted(totals)
    taken_at = taken_at or (totals.taken_at if totals else None)
    since = None if taken_at is None else (taken_at - timedelta(seconds=PENDING_SECONDS)).astimezone(
        timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")
    report = StoreReport(
        store_id=store_id, business_day=day, totals_received=totals is not None,
        as_of=totals.as_of if totals else None,
        agent={kind: _side([t for (k, _), t in accepted.items() if k == kind]) for kind in ("sale", "return")},
        erp={kind: _side([d for d in erp_docs if d.kind == kind]) for kind in ("sale", "return")},
        loyalty={kind: sum(1 for p in points or () if p.kind == kind) for kind in ("sale", "return")})

    docs: dict[tuple[str, str], list[ErpDoc]] = {}
    for doc in erp_docs:
        docs.setdefault((doc.kind, doc.pos_txn_id), []).append(doc)
    for key in sorted(accepted.keys() | docs.keys()):
        kind, txn_id = key
        txn, found = accepted.get(key), docs.get(key, [])
        if txn is None:
            if since is not None and any(d.created >= since for d in found):
                report.pending.append(Finding(kind=kind, pos_txn_id=txn_id, detail=f"{_doc_nos(found)} posted "
                                              f"after the control totals of {taken_at.isoformat(timespec='seconds')}"))
                continue
            report.erp_unexpected.append(Finding(kind=kind, pos_txn_id=txn_id, detail=_doc_nos(found)))
            continue
        if not found:
            report.erp_missing.append(Finding(kind=kind, pos_txn_id=txn_id))
        elif len(found) > 1:
            report.erp_duplicated.append(Finding(kind=kind, pos_txn_id=txn_id,
                                                 detail=f"{len(found)} documents: {_doc_nos(found)}"))
        wrong = [d for d in found if (d.total_minor, d.currency) != (txn.total_minor, txn.currency)]
        if wrong:
            report.amount_mismatch.append(Finding(
                kind=kind, pos_txn_id=txn_id,
                detail=f"agent {format_money(txn.total_minor, txn.currency)}, ERP "
                       + ", ".join(f"{d.doc_no} {format_money(d.total_minor, d.currency)}" for d in wrong)))

    if points is None:
        return report
    rows = Counter((p.kind, p.pos_txn_id) for p in points)
    expected = {key for key, txn in accepted.items()
                if expects_points(txn) and file_earns(docs[key][0].created if docs.get(key) else None)}
    pending = {(f.kind, f.pos_txn_id) for f in report.pending}
    for key in sorted(expected | (rows.keys() - pending)):
        kind, txn_id = key
        if key not in expected:
            report.loyalty_unexpected.append(Finding(kind=kind, pos_txn_id=txn_id))
        elif rows[key] == 0:
            report.loyalty_missing.append(Finding(kind=kind, pos_txn_id=txn_id))
        elif rows[key] > 1:
            files = sorted({p.file for p in points if (p.kind, p.pos_txn_id) == key})
            report.loyalty_duplicated.append(Finding(kind=kind, pos_txn_id=txn_id,
                                                     detail=f"{rows[key]} records in {', '.join(files)}"))
    return report


KINDS = ("sale", "return")


def _differing(totals: StoreControlTotalsV2, erp: dict[str, TxnDigest],
               points: dict[str, TxnDigest] | None) -> list[tuple[str, str, TxnDigest, TxnDigest]]:
    """(kind, side, agent's digest, the side's digest) for every side that differs."""
    agent = {"sale": totals.sales, "return": totals.returns}
    out = [(kind, "erp", agent[kind].txns(), erp[kind]) for kind in KINDS if not agent[kind].txns().same(erp[kind])]
    if points is not None:
        out += [(kind, "loyalty", agent[kind].loyalty(), points[kind]) for kind in KINDS
                if not agent[kind].loyalty().same(points[kind])]
    return out


def digest_report(store_id: str, day: date, totals: StoreControlTotalsV2, erp: dict[str, TxnDigest],
                  points: dict[str, TxnDigest] | None, unlisted: str | None = None) -> StoreReport | None:
    """The report from digests alone: None when a side differs and the list is needed;
    with `unlisted` (why the agent's list could not be had) each differing side is a finding."""
    differing = _differing(totals, erp, points)
    if differing and unlisted is None:
        return None
    agent = {"sale": totals.sales, "return": totals.returns}
    return StoreReport(
        store_id=store_id, business_day=day, totals_received=True, as_of=totals.as_of,
        agent={k: Side(count=agent[k].count, amount_minor=dict(agent[k].amount_minor)) for k in KINDS},
        erp={k: Side(count=erp[k].count, amount_minor=dict(erp[k].amount_minor)) for k in KINDS},
        loyalty={k: points[k].count if points else 0 for k in KINDS},
        digest_mismatch=[Finding(kind=kind, pos_txn_id="-", detail=f"{side} {theirs.count} vs agent {ours.count} "
                                 f"transactions, digests differ; the agent's list: {unlisted}")
                         for kind, side, ours, theirs in differing])


def _doc_nos(docs: list[ErpDoc]) -> str:
    return ", ".join(d.doc_no for d in docs)


def render(report: StoreReport) -> str:
    """The report as ops read it."""
    status = "OK" if report.gap == 0 else f"GAP {report.gap}"
    if report.pending:
        status += f", {len(report.pending)} pending (posted after the latest control totals)"
    lines = [f"store {report.store_id}  business day {report.business_day}  {status}"]
    if not report.totals_received:
        lines.append("  no control totals received from this store for the day")

    def side(s: Side) -> str:
        amounts = ", ".join(format_money(v, c) for c, v in sorted(s.amount_minor.items())) or "0"
        return f"{s.count:>6} / {amounts}"
    for kind in ("sale", "return"):
        lines.append(f"  {kind + 's':<8} agent {side(report.agent[kind])}   ERP {side(report.erp[kind])}"
                     f"   loyalty records {report.loyalty[kind]}")
    if report.loyalty_checked and report.loyalty_platform:
        lines.append("  loyalty platform points: " + ", ".join(f"{k} {v}" for k, v in report.loyalty_platform.items()))
    if report.orders_checked:
        lines.append("  click-and-collect orders: " + ", ".join(f"{k.replace('_', ' ')} {v}"
                                                              for k, v in report.orders.items()))
    for name in (*StoreReport.FINDINGS, "pending"):
        for f in getattr(report, name):
            lines.append(f"  {name.replace('_', ' '):<19} {f.kind:<6} {f.pos_txn_id}"
                         + (f"  ({f.detail})" if f.detail else ""))
    return "\n".join(lines)
