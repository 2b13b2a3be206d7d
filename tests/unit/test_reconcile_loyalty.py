"""services/reconcile/loyalty.py: the loyalty platform's ledger vs the loyalty service vs the
ERP's loyalty postings, as plain values; and the points-file side following the accrual
mode of each posting."""
from __future__ import annotations

from datetime import date, datetime, timedelta, timezone

import pytest

from contracts.control import StoreControlTotalsV1
from services.loyalty.settlement import Figures
from services.reconcile import loyalty
from services.reconcile.compare import ErpDoc, StoreReport, reconcile
from services.reconcile.loyalty_sources import LoyaltyRecords

pytestmark = pytest.mark.unit

DAY = date(2026, 12, 6)


def records(**kw) -> LoyaltyRecords:
    base = dict(sales={"T1", "T2", "T3"}, earned={"T1": 10, "T2": 20}, captured={"T3": [50]},
                reversed={"R1": (5, 25)}, settled=Figures(50, 50, 5), current=Figures(50, 50, 5))
    return LoyaltyRecords(**{**base, **kw})


AT_PLATFORM = {("EARN", "T1"): [10], ("EARN", "T2"): [20], ("REDEEM", "T3"): [-50], ("ADJUST", "R1"): [-5],
               ("REFUND", "R1"): [25]}


def names(found: dict) -> dict:
    return {k: [(f.kind, f.pos_txn_id) for f in v] for k, v in found.items() if v}


def test_a_day_that_agrees_has_no_finding():
    assert names(loyalty.compare_platform(records(), AT_PLATFORM, set())) == {}


def test_missing_doubled_mismatched_and_unexpected_bookings_are_named():
    platform = {**AT_PLATFORM, ("EARN", "T2"): [20, 20], ("REDEEM", "T3"): [-60], ("ADJUST", "T1"): [-1],
                ("EARN", "ZZ"): [7], ("EARN", "OLD"): [3]}
    del platform[("EARN", "T1")]
    found = loyalty.compare_platform(records(), platform, known={"OLD"})  # OLD: a transaction of another day
    assert names(found) == {"platform_missing": [("earn", "T1")], "platform_doubled": [("earn", "T2")],
                            "platform_mismatch": [("redeem", "T3")],
                            "platform_unexpected": [("adjust", "T1"), ("earn", "ZZ")]}
    assert found["platform_doubled"][0].detail == "platform 2 entries, 40 points; the loyalty service booked " \
                                                  "1 entry, 20 points"
    assert found["platform_mismatch"][0].detail == "platform -60 points; the loyalty service booked -50"


def test_the_erp_loyalty_tender_matches_what_was_authorised_offline_too():
    r = records(over_redeemed={"T2": 30})
    assert loyalty.compare_redemptions(r, {"T3": 100, "T2": 60}, point_value=2) == []
    found = loyalty.compare_redemptions(r, {"T3": 90, "T9": 10}, point_value=2)
    assert [(f.pos_txn_id, f.detail) for f in found] == [
        ("T2", "ERP loyalty tender 0 cents; authorised 30 points x 2 = 60 cents"),
        ("T3", "ERP loyalty tender 90 cents; authorised 50 points x 2 = 100 cents"),
        ("T9", "ERP loyalty tender 10 cents; the loyalty service has not seen this sale posted")]


def test_a_closed_day_is_settled_at_the_erp_as_the_loyalty_service_settled_it():
    erp = [{"POINTS_ISSUED": 40, "POINTS_REDEEMED": 50, "POINTS_REVERSED": 5},
           {"POINTS_ISSUED": 10, "POINTS_REDEEMED": 0, "POINTS_REVERSED": 0}]
    assert loyalty.compare_settlement(records(), erp, closed=True) == ([], [])
    assert loyalty.compare_settlement(records(), [], closed=False) == ([], [])
    mismatch, _ = loyalty.compare_settlement(records(), erp[:1], closed=True)
    assert mismatch[0].detail == ("loyalty settled issued 50, redeemed 50, reversed 5; the ERP posted issued 40, "
                                  "redeemed 50, reversed 5 in 1 document(s)")
    missing, _ = loyalty.compare_settlement(records(settled=None), [], closed=True)
    assert "has not settled it" in missing[0].detail
    _, pending = loyalty.compare_settlement(records(current=Figures(60, 50, 5)), erp, closed=True)
    assert "the next pass sends a supplement" in pending[0].detail


def test_the_findings_count_in_the_gap_and_pending_does_not():
    report = StoreReport(store_id="S001", business_day=DAY, totals_received=True, agent={}, erp={}, loyalty={})
    out = loyalty.add_to(report, records(over_redeemed={"T2": 30}, exceptions=[("over_redemption", "T2", "x")],
                                         current=Figures(60, 50, 5)),
                         {k: v for k, v in AT_PLATFORM.items() if k != ("EARN", "T1")}, set(), {"T3": 50, "T2": 30},
                         [{"POINTS_ISSUED": 50, "POINTS_REDEEMED": 50, "POINTS_REVERSED": 5}], 1, True)
    assert out.gap == 2 and [f.kind for f in out.pending] == ["settlement"]
    assert [f.pos_txn_id for f in out.platform_missing + out.loyalty_exception] == ["T1", "T2"]
    assert loyalty.unavailable(report, "loyalty platform: refused").gap == 1


def test_the_points_file_is_expected_only_for_postings_the_file_earned():
    switch = datetime(2026, 12, 6, 12, tzinfo=timezone.utc)
    totals = StoreControlTotalsV1.model_validate({
        "store_id": "S001", "business_day": DAY, "as_of": 2, "taken_at": switch + timedelta(hours=1),
        "sales": {"count": 2, "amount_minor": {"EUR": 4000}, "transactions": [
            {"pos_txn_id": t, "total_minor": 2000, "currency": "EUR", "loyalty_card": True, "via": "bus"}
            for t in ("BEFORE", "AFTER")]},
        "returns": {"count": 0, "amount_minor": {}, "transactions": []}})
    docs = [ErpDoc("sale", "BEFORE", 2000, "EUR", "S1", "2026-12-06T11:59:59.000000"),
            ErpDoc("sale", "AFTER", 2000, "EUR", "S2", "2026-12-06T12:00:00.000000")]

    def file_earns(created):
        return datetime.fromisoformat(created).replace(tzinfo=timezone.utc) < switch
    report = reconcile("S001", DAY, totals, docs, [], file_earns=file_earns)
    assert [f.pos_txn_id for f in report.loyalty_missing] == ["BEFORE"] and report.gap == 1


def test_a_transaction_booked_a_moment_ago_is_pending_not_a_gap():
    report = StoreReport(store_id="S001", business_day=DAY, totals_received=True, agent={}, erp={}, loyalty={})
    r = records(sales={"T1", "T2", "T3", "T4"})
    out = loyalty.add_to(report, r, {k: v for k, v in AT_PLATFORM.items() if k != ("EARN", "T1")}, set(),
                         {"T3": 50, "T4": 10}, [], 1, False, recent=frozenset({"T1", "T4"}))
    assert out.gap == 0
    assert sorted((f.kind, f.pos_txn_id) for f in out.pending) == [("earn", "T1"), ("redemption", "T4")]
    later = loyalty.add_to(report, r, {k: v for k, v in AT_PLATFORM.items() if k != ("EARN", "T1")}, set(),
                           {"T3": 50, "T4": 10}, [], 1, False)
    assert later.gap == 2 and not later.pending
