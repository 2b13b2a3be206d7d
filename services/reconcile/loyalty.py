"""A store's business day on the loyalty side, held three ways: the loyalty platform's
ledger, the loyalty service's records (what it booked there, the holds it captured for
the stores' redemptions), and the ERP's loyalty postings (the LOYALTY tender's GL 1300
debits, the daily settlement). Plain functions over plain values.

Rules, per transaction (a reference `<store>/<POS id>` at the platform):
- each booking the loyalty service made (EARN for a sale the platform earned, REDEEM
  per captured hold, ADJUST and REFUND for a return) is one ledger entry with the same
  points: none is `platform_missing`, more `platform_doubled`, other points
  `platform_mismatch`; an entry of the day's transactions the service did not book, or
  of a transaction it never saw, is `platform_unexpected`;
- each bus-posted sale's LOYALTY tender (GL 1300 debit) is the points the stores had
  authorised for it (captured, or offline and not covered) at the point value:
  `redemption_mismatch` names the sale and both amounts;
- an offline redemption the balance could not cover (or a reversal the platform
  refused) is a `loyalty_exception` finding, with the service's detail;
- once the day is closed (the settlement rules), the ERP's settlements carry what the
  loyalty service settled, else `settlement_mismatch`; what grew since the last
  settlement is `pending` (the next pass sends a supplement).
A transaction booked a moment ago (RETAILBUS.reconcile.loyalty_pending_seconds) may
still be on its way through the loyalty service: its findings are `pending`.
"""
from __future__ import annotations

from services.loyalty.settlement import Figures
from services.reconcile.compare import Finding, StoreReport
from services.reconcile.loyalty_sources import LoyaltyRecords

BOOKINGS = ("EARN", "REDEEM", "ADJUST", "REFUND")


def expected_bookings(records: LoyaltyRecords) -> dict[tuple[str, str], list[int]]:
    """(type, POS id) -> the signed points of each ledger entry the loyalty service booked."""
    out: dict[tuple[str, str], list[int]] = {}
    for txn, points in records.earned.items():
        out[("EARN", txn)] = [points]
    for txn, holds in records.captured.items():
        out[("REDEEM", txn)] = [-p for p in holds]
    for txn, (points, refunded) in records.reversed.items():
        if points:
            out[("ADJUST", txn)] = [-points]
        if refunded:
            out[("REFUND", txn)] = [refunded]
    return out


def _points(values: list[int]) -> str:
    return f"{len(values)} entr{'y' if len(values) == 1 else 'ies'}, {sum(values)} points"


def compare_platform(records: LoyaltyRecords, entries: dict[tuple[str, str], list[int]],
                     known: set[str]) -> dict[str, list[Finding]]:
    """`entries`: the platform's (type, POS id) -> signed points, for the store; `known`: the
    POS ids of those entries that the loyalty service recorded on any day."""
    out: dict[str, list[Finding]] = {"platform_missing": [], "platform_doubled": [], "platform_mismatch": [],
                                     "platform_unexpected": []}
    expected = expected_bookings(records)
    ours = records.sales | set(records.reversed)
    keys = set(expected) | {k for k in entries if k[1] in ours and k[0] in BOOKINGS}
    for kind, txn in sorted(keys):
        want, got = expected.get((kind, txn), []), entries.get((kind, txn), [])
        finding = lambda name, detail: out[name].append(Finding(kind=kind.lower(), pos_txn_id=txn, detail=detail))  # noqa: E731
        if not want:
            finding("platform_unexpected", f"platform {_points(got)}; the loyalty service booked none")
        elif len(got) < len(want):
            finding("platform_missing", f"platform {_points(got)}; the loyalty service booked {_points(want)}")
        elif len(got) > len(want):
            finding("platform_doubled", f"platform {_points(got)}; the loyalty service booked {_points(want)}")
        elif sorted(got) != sorted(want):
            finding("platform_mismatch", f"platform {sum(got)} points; the loyalty service booked {sum(want)}")
    for kind, txn in sorted(k for k in entries if k[1] not in ours and k[1] not in known):
        out["platform_unexpected"].append(Finding(kind=kind.lower(), pos_txn_id=txn, detail=(
            f"platform {_points(entries[(kind, txn)])}; the loyalty service never saw this transaction")))
    return out


def compare_redemptions(records: LoyaltyRecords, erp_tenders: dict[str, int], point_value: int) -> list[Finding]:
    """Each bus-posted sale's LOYALTY tender against the points authorised for it."""
    out = []
    for txn in sorted(set(erp_tenders) | set(records.captured) | set(records.over_redeemed)):
        points = sum(records.captured.get(txn, ())) + records.over_redeemed.get(txn, 0)
        erp, ours = erp_tenders.get(txn, 0), points * point_value
        if txn not in records.sales:
            out.append(Finding(kind="redemption", pos_txn_id=txn, detail=(
                f"ERP loyalty tender {erp} cents; the loyalty service has not seen this sale posted")))
        elif erp != ours:
            out.append(Finding(kind="redemption", pos_txn_id=txn, detail=(
                f"ERP loyalty tender {erp} cents; authorised {points} points x {point_value} = {ours} cents")))
    return out


def _figures(f: Figures) -> str:
    return f"issued {f.issued}, redeemed {f.redeemed}, reversed {f.reversed}"


def compare_settlement(records: LoyaltyRecords, erp_rows: list[dict], closed: bool) -> tuple[list[Finding],
                                                                                              list[Finding]]:
    """(settlement_mismatch, pending) for a day: nothing to say while the day is open."""
    if not closed or not (records.sales or records.reversed or erp_rows):
        return [], []
    posted = Figures(*(sum(int(r[c]) for r in erp_rows) for c in ("POINTS_ISSUED", "POINTS_REDEEMED",
                                                                    "POINTS_REVERSED")))
    settled = records.settled
    mismatch, pending = [], []
    if settled is None:
        mismatch.append(Finding(kind="settlement", pos_txn_id="-", detail=(
            "the day is closed and the loyalty service has not settled it" + (
                f"; the ERP posted {_figures(posted)}" if erp_rows else ""))))
    elif posted != settled:
        mismatch.append(Finding(kind="settlement", pos_txn_id="-", detail=(
            f"loyalty settled {_figures(settled)}; the ERP posted {_figures(posted)} "
            f"in {len(erp_rows)} document(s)")))
    if settled is not None and records.current != settled:
        pending.append(Finding(kind="settlement", pos_txn_id="-", detail=(
            f"recorded since the last settlement: now {_figures(records.current)}, settled {_figures(settled)}; "
            "the next pass sends a supplement")))
    return mismatch, pending


def add_to(report: StoreReport, records: LoyaltyRecords, entries: dict[tuple[str, str], list[int]],
           known: set[str], erp_tenders: dict[str, int], erp_rows: list[dict], point_value: int,
           closed: bool, recent: frozenset[str] = frozenset()) -> StoreReport:
    """`report` with the loyalty findings of its store and day. A finding about one of
    `recent` (POS ids the ERP or the platform booked a moment ago: the loyalty service
    may still be on its way) is pending, not a gap."""
    found = {**compare_platform(records, entries, known),
             "redemption_mismatch": compare_redemptions(records, erp_tenders, point_value)}
    mismatch, pending = compare_settlement(records, erp_rows, closed)
    for name, findings in found.items():
        pending += [f for f in findings if f.pos_txn_id in recent]
        found[name] = [f for f in findings if f.pos_txn_id not in recent]
    summary = {kind.lower(): sum(sum(v) for (k, t), v in entries.items() if k == kind
                                 and (t in records.sales or t in records.reversed)) for kind in BOOKINGS}
    return report.model_copy(update={
        **found, "loyalty_checked": True, "loyalty_platform": summary,
        "loyalty_exception": [Finding(kind=kind, pos_txn_id=txn, detail=detail)
                              for kind, txn, detail in sorted(records.exceptions)],
        "settlement_mismatch": mismatch, "pending": [*report.pending, *pending]})


def unavailable(report: StoreReport, reason: str) -> StoreReport:
    """`report` when the platform's ledger could not be read: a finding, the day is not proven."""
    return report.model_copy(update={"loyalty_checked": True, "loyalty_unavailable": [
        Finding(kind="platform", pos_txn_id="-", detail=reason)]})
