"""services/returns/policy.py: what the return policy says of a posted return, and the
threshold promotion a return claws back, without a broker."""
from __future__ import annotations

from datetime import date, datetime, timezone

import pytest

from contracts.erp import ErpReturnPostedV1
from contracts.pos import PosReturnV1
from services.loyalty.rules import Earning
from services.returns import policy

pytestmark = pytest.mark.unit

POLICY = policy.ReturnPolicy(window_days=30, receiptless={"max_returns": 2, "max_amount_minor": 5_000,
                                                          "period_days": 30})
EARNING = Earning(excluded_sku_prefixes=("99",), threshold_promotions=[
    {"name": "spend100", "min_spend_minor": 10_000, "bonus_points": 250, "valid_from": "2026-01-01",
     "valid_to": "2026-12-31"}])
SOLD = [{"sku": "100001", "quantity": 2, "line_total_minor": 9_000},   # 45.00 a unit after discounts
        {"sku": "100002", "quantity": 1, "line_total_minor": 3_000},
        {"sku": "990001", "quantity": 1, "line_total_minor": 5_000}]   # a gift card: spends nothing


def ret(units: dict[str, tuple[int, int]], original: bool = True, day: str = "2026-12-07") -> PosReturnV1:
    lines = [{"line_no": n, "sku": sku, "quantity": q, "unit_price_minor": -(-a // q),
              "discount_minor": -(-a // q) * q - a, "line_total_minor": a}
             for n, (sku, (q, a)) in enumerate(units.items(), start=1)]
    total = sum(line["line_total_minor"] for line in lines)
    return PosReturnV1.model_validate({
        "store_id": "S001", "terminal_id": "07", "pos_txn_id": "R1", "business_day": day, "currency": "EUR",
        "lines": lines, "total_minor": total, "tenders": [{"kind": "cash", "amount_minor": total}],
        "original": {"store_id": "S001", "pos_txn_id": "S1"} if original else None, "customer_id": "C1"})


def posted(r: PosReturnV1, before: list[dict] | None = None, sale_day: str = "2026-12-01",
           card: str | None = "L1", original: bool = True) -> ErpReturnPostedV1:
    return ErpReturnPostedV1.model_validate({
        "store_id": "S001", "pos_txn_id": r.pos_txn_id, "doc_no": "R00000009", "business_day": r.business_day,
        "posted_at": datetime.now(timezone.utc), "currency": "EUR", "total_minor": r.total_minor,
        "lines": [{"sku": line.sku, "quantity": line.quantity, "line_total_minor": line.line_total_minor}
                  for line in r.lines],
        "original_pos_txn_id": "S1" if original else None,
        "original": {"doc_no": "S00000001", "business_day": sale_day, "loyalty_card": card, "lines": SOLD,
                     "returned_before": before or []} if original else None})


def kinds(findings) -> list[str]:
    return [f.case_type for f in findings]


def test_a_return_within_the_policy_opens_no_case():
    r = ret({"100001": (1, 4_500), "100002": (1, 3_000)})
    assert policy.judge(r, posted(r), POLICY) == []


def test_more_units_than_sold_minus_returned_before_is_over_quantity():
    r = ret({"100001": (1, 4_500)})
    found = policy.judge(r, posted(r, before=[{"sku": "100001", "quantity": 2, "line_total_minor": 9_000}]), POLICY)
    assert kinds(found) == ["return_over_quantity"]
    assert "100001: 1 returned, 2 sold, 2 returned before" in found[0].summary
    r = ret({"100003": (1, 100)})  # never sold
    assert kinds(policy.judge(r, posted(r), POLICY)) == ["return_over_quantity"]


def test_a_refund_above_the_price_paid_after_discounts_is_a_case():
    r = ret({"100001": (1, 4_501)})  # 45.01 for a unit paid 45.00
    found = policy.judge(r, posted(r), POLICY)
    assert kinds(found) == ["return_above_price_paid"] and "4501 refunded for 1, 4500 paid" in found[0].summary


def test_after_the_window_is_outside_it_on_the_day_it_closes_is_not():
    r = ret({"100002": (1, 3_000)}, day="2026-12-31")
    assert kinds(policy.judge(r, posted(r, sale_day="2026-12-01"), POLICY)) == []
    r = ret({"100002": (1, 3_000)}, day="2027-01-01")
    assert kinds(policy.judge(r, posted(r, sale_day="2026-12-01"), POLICY)) == ["return_outside_window"]


def test_receiptless_returns_over_the_count_or_the_amount_are_a_case():
    r = ret({"100002": (1, 3_000)}, original=False)
    doc = posted(r, original=False)
    assert policy.judge(r, doc, POLICY, receiptless=(2, 4_000)) == []
    assert kinds(policy.judge(r, doc, POLICY, receiptless=(3, 4_000))) == ["return_receiptless_over_limit"]
    assert kinds(policy.judge(r, doc, POLICY, receiptless=(1, 6_000))) == ["return_receiptless_over_limit"]


def test_a_sale_not_posted_in_the_erp_is_a_case():
    r = ret({"100002": (1, 3_000)})
    doc = posted(r).model_copy(update={"original": None})
    assert kinds(policy.judge(r, doc, POLICY)) == ["return_original_not_found"]


def test_the_return_that_takes_the_sale_below_the_threshold_claws_the_bonus_back():
    # spend 120.00 (the gift card does not count): a 45.00 unit back leaves 75.00, below 100.00
    r = ret({"100001": (1, 4_500)})
    assert policy.clawback(EARNING, posted(r)) == ("spend100", 250)
    # the sale fell below with an earlier return: this one takes nothing back
    before = [{"sku": "100002", "quantity": 1, "line_total_minor": 3_000}]
    assert policy.clawback(EARNING, posted(r, before=before)) is None
    # still above the threshold after it (the gift card returned): nothing
    r = ret({"990001": (1, 5_000)})
    assert policy.clawback(EARNING, posted(r)) is None


def test_no_bonus_to_claw_back_without_a_card_or_a_promotion_that_day():
    r = ret({"100001": (1, 4_500)})
    assert policy.clawback(EARNING, posted(r, card=None)) is None
    assert policy.clawback(EARNING, posted(r, sale_day="2025-12-31")) is None


def test_a_bad_policy_file_is_refused_naming_the_field(tmp_path):
    path = tmp_path / "returns.yaml"
    path.write_text("policy:\n  receiptless:\n    max_returns: -1\n")
    with pytest.raises(policy.ReturnsConfigError, match=r"returns.yaml:3: policy\.receiptless\.max_returns: "):
        policy.load(path)
    path.write_text("policy:\n  window: 30\n")
    with pytest.raises(policy.ReturnsConfigError, match=r"returns.yaml:2: policy: unknown key 'window' \(known keys: window_days, receiptless\)"):
        policy.load(path)
