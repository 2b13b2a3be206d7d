"""services/reconcile/orders.py: a store's day of click-and-collect orders, the experience API's
against the ERP's order documents against the loyalty captures, each gap named by order."""
from __future__ import annotations

from datetime import date

import pytest

from services.reconcile.compare import reconcile, render
from services.reconcile.orders import ApiOrder, ErpOrder, add_to, compare

pytestmark = pytest.mark.unit


def api(order_id, status, total=1000, points=0):
    return ApiOrder(order_id, status, total, points)


def erp(order_id, status, total=1000, points=0):
    return ErpOrder(order_id, status, total, points, f"D-{order_id}", None if status == "O" else f"E-{order_id}",
                    "2026-12-07T10:00:00.000000")


def test_a_day_that_reconciles_has_no_findings():
    found = compare([api("W1", "collected", points=200), api("W2", "cancelled"), api("W3", "cancelled"),
                     api("W4", "reserved")],
                    [erp("W1", "C", points=200), erp("W2", "X"), erp("W4", "O")], {"W1": [200]})
    assert not any(found.values()), found  # W3 was cancelled before its commitment: no document is right


def test_each_gap_is_named_by_order():
    found = compare(
        [api("W1", "collected"), api("W2", "cancelled", points=100), api("W3", "collected", total=2000, points=300),
         api("W4", "collected", points=300), api("W5", "reserved", points=50)],
        [erp("W2", "C", points=100), erp("W3", "C", total=1999, points=300), erp("W4", "C", points=300),
         erp("W9", "O"), erp("W5", "O", points=50)],
        {"W2": [100], "W3": [300, 300], "W5": [50]})
    named = {name: [f.pos_txn_id for f in findings] for name, findings in found.items() if findings}
    assert named == {"order_erp_missing": ["W1"], "order_unexpected": ["W9"], "order_status_mismatch": ["W2"],
                     "order_amount_mismatch": ["W3"], "order_capture_mismatch": ["W2", "W3", "W4", "W5"]}
    assert "2 hold(s), 600 points" in next(f.detail for f in found["order_capture_mismatch"] if f.pos_txn_id == "W3")


def test_recent_changes_are_pending_and_the_report_counts_the_orders():
    report = reconcile("S001", date(2026, 12, 7), None, [], None)
    report = add_to(report, [api("W1", "ready_for_pickup"), api("W2", "collected")], [erp("W1", "C"), erp("W2", "C")],
                    None, recent=frozenset({"W1"}))
    assert report.gap == 0 and [f.pos_txn_id for f in report.pending] == ["W1"]
    assert report.orders == {"accepted": 2, "collected": 1, "cancelled": 0, "open": 1, "erp_documents": 2}
    assert "click-and-collect orders: accepted 2, collected 1" in render(report)
