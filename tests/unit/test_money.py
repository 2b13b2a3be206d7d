"""Money as a person reads it: minor units shown with the currency's own decimals."""
from __future__ import annotations

from datetime import date

import pytest

from contracts.money import format_money
from services.reconcile.compare import Finding, Side, StoreReport, render

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(("minor", "currency", "shown"), [
    (15000, "EUR", "150.00 EUR"), (5, "EUR", "0.05 EUR"), (-1999, "GBP", "-19.99 GBP"),
    (123456789, "USD", "1,234,567.89 USD"), (1500, "JPY", "1,500 JPY"), (1500, "KWD", "1.500 KWD"),
    (0, "EUR", "0.00 EUR"), (2**63 - 1, "EUR", "92,233,720,368,547,758.07 EUR"),
])
def test_minor_units_are_shown_with_the_currency_decimals(minor, currency, shown):
    assert format_money(minor, currency) == shown


def test_the_reconciliation_report_shows_amounts_not_minor_units():
    side = Side(count=2, amount_minor={"EUR": 15000, "JPY": 1500})
    report = StoreReport(store_id="S001", business_day=date(2026, 11, 27), totals_received=True,
                         agent={"sale": side, "return": Side()}, erp={"sale": side, "return": Side()},
                         loyalty={"sale": 0, "return": 0},
                         amount_mismatch=[Finding(kind="sale", pos_txn_id="A1", detail="agent 39.98 EUR")])
    text = render(report)
    assert "agent      2 / 150.00 EUR, 1,500 JPY" in text and "15000" not in text, text
