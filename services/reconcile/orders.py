"""A store's day of click-and-collect orders held three ways: what the experience API accepted
(RB_ORDER, the orders the store was to hand over, by the day they were accepted), the ERP's order
documents (ORD_HDR) and the loyalty captures (the loyalty service's holds for the orders).
Plain functions over plain values.

Rules, per order:
- an order the API shows collected has an ERP document, closed as collected (`C`), and one
  the API shows cancelled has none (cancelled before its commitment: out of stock, points
  refused) or one reversed (`X`): else `order_erp_missing` or `order_status_mismatch`;
  an open order (accepted, reserved, ready for pickup) has none yet or an open one (`O`);
- an ERP order document the API never accepted is `order_unexpected`;
- the ERP's total and points are the API's (`order_amount_mismatch`);
- a collected order's points were captured at loyalty, once and in full; a cancelled or
  open one's not at all (`order_capture_mismatch`).
An order whose ERP document was closed a moment ago (RETAILBUS.reconcile.loyalty_pending_seconds)
may not have reached the API yet: its findings are `pending`.
"""
from __future__ import annotations

from dataclasses import dataclass

from services.reconcile.compare import Finding, StoreReport

FINDINGS = ("order_erp_missing", "order_unexpected", "order_status_mismatch", "order_amount_mismatch",
            "order_capture_mismatch")
ERP_STATUS = {"O": "open", "C": "collected", "X": "reversed"}
OPEN = ("accepted", "reserved", "ready_for_pickup")


@dataclass(frozen=True)
class ApiOrder:
    order_id: str
    status: str        # accepted, reserved, ready_for_pickup, collected, cancelled
    total_minor: int
    points: int


@dataclass(frozen=True)
class ErpOrder:
    order_id: str
    status: str        # O, C, X
    total_minor: int
    points: int
    doc_no: str
    end_doc_no: str | None
    changed: str       # UPD_TS, legacy UTC format


def compare(api: list[ApiOrder], erp: list[ErpOrder], captured: dict[str, list[int]] | None) -> dict[str, list[Finding]]:
    """`captured`: order -> points of each hold captured for it (None: the loyalty side is not checked)."""
    out: dict[str, list[Finding]] = {name: [] for name in FINDINGS}
    ours, theirs = {o.order_id: o for o in api}, {o.order_id: o for o in erp}

    def finding(name: str, order_id: str, detail: str) -> None:
        out[name].append(Finding(kind="order", pos_txn_id=order_id, detail=detail))

    for order_id in sorted(ours.keys() | theirs.keys()):
        mine, doc = ours.get(order_id), theirs.get(order_id)
        if mine is None:
            finding("order_unexpected", order_id, f"ERP document {doc.doc_no} ({ERP_STATUS[doc.status]}); "
                                                  "the experience API never accepted this order")
            continue
        if doc is None:
            if mine.status == "collected":
                finding("order_erp_missing", order_id, "collected for the customer; the ERP has no order document")
        else:
            expected = {"collected": ("C",), "cancelled": ("X",)}.get(mine.status, ("O",))
            if doc.status not in expected:
                finding("order_status_mismatch", order_id, f"{mine.status} for the customer; "
                                                           f"{ERP_STATUS[doc.status]} in the ERP ({doc.end_doc_no or doc.doc_no})")
            if (doc.total_minor, doc.points) != (mine.total_minor, mine.points):
                finding("order_amount_mismatch", order_id, f"API {mine.total_minor} with {mine.points} points; "
                                                           f"ERP {doc.total_minor} with {doc.points} points")
        if captured is not None:
            got = captured.get(order_id, [])
            want = [mine.points] if mine.status == "collected" and mine.points else []
            if sorted(got) != want:
                finding("order_capture_mismatch", order_id, f"{mine.status}, {mine.points} points redeemed; "
                                                            f"loyalty captured {len(got)} hold(s), {sum(got)} points")
    return out


def add_to(report: StoreReport, api: list[ApiOrder], erp: list[ErpOrder], captured: dict[str, list[int]] | None,
           recent: frozenset[str] = frozenset()) -> StoreReport:
    """`report` with the orders' findings; one about an order in `recent` (its ERP document
    changed a moment ago) is pending, not a gap."""
    found = compare(api, erp, captured)
    pending = [f for findings in found.values() for f in findings if f.pos_txn_id in recent]
    counts = {status: sum(1 for o in api if o.status == status) for status in ("collected", "cancelled")}
    counts["open"] = sum(1 for o in api if o.status in OPEN)
    return report.model_copy(update={
        **{name: [f for f in findings if f.pos_txn_id not in recent] for name, findings in found.items()},
        "orders_checked": True, "orders": {"accepted": len(api), **counts, "erp_documents": len(erp)},
        "pending": [*report.pending, *pending]})
