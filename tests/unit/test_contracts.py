"""Contracts: every message refuses bad input at the right field path, and the envelope
carries money through JSON without losing a cent."""
from __future__ import annotations

import copy
import json
from datetime import date, datetime, timezone

import pytest
from pydantic import ValidationError

from contracts import registry
from contracts.envelope import CloudEvent
from contracts.errors import ContractError
from contracts.customer import CustomerValues
from contracts.pos import PosReturnV1, PosSaleV1, PosStockQueryV1

pytestmark = pytest.mark.unit

BIG = 99_999_999_999  # beyond float32 and typical 32-bit columns; must survive exactly


def valid_sale(**overrides) -> dict:
    """A sale that satisfies every rule: 2 x 1250 - 100 + 1 x 500 = 2900, paid 2000 card + 900 cash."""
    sale = {
        "store_id": "S001", "terminal_id": "07", "pos_txn_id": "S001-07-000123",
        "business_day": "2024-03-01", "occurred_at": "2024-03-01T10:15:00+01:00",
        "currency": "EUR",
        "lines": [
            {"line_no": 1, "sku": "SKU-1", "quantity": 2, "unit_price_minor": 1250,
             "discount_minor": 100, "line_total_minor": 2400},
            {"line_no": 2, "sku": "SKU-2", "quantity": 1, "unit_price_minor": 500,
             "line_total_minor": 500},
        ],
        "total_minor": 2900,
        "tenders": [{"kind": "card", "amount_minor": 2000, "reference": "AUTH42"},
                    {"kind": "cash", "amount_minor": 900}],
        "loyalty_card": "LC-1", "customer_id": None,
    }
    sale.update(overrides)
    return sale


def valid_return(**overrides) -> dict:
    ret = valid_sale(pos_txn_id="S001-07-000200")
    ret["lines"] = ret["lines"][1:]
    original = {"store_id": "S001", "pos_txn_id": "S001-07-000123", "business_day": "2024-03-01"}
    ret.update(total_minor=500, tenders=[{"kind": "cash", "amount_minor": 500}],
               original=original, reason="damaged", **overrides)
    return ret


def valid_payloads() -> dict[str, dict]:
    posted = {"store_id": "S001", "pos_txn_id": "S001-07-000123", "doc_no": "INV-9",
              "business_day": "2024-03-01", "posted_at": "2024-03-01T10:16:00Z",
              "currency": "EUR", "total_minor": 2900, "loyalty_card": "LC-1",
              "lines": [{"sku": "SKU-1", "quantity": 2, "line_total_minor": 2400},
                        {"sku": "SKU-2", "quantity": 1, "line_total_minor": 500}]}
    points = {"card": "LC-1", "store_id": "S001", "pos_txn_id": "S001-07-000123",
              "business_day": "2024-03-01", "points": 29, "basis_minor": 2900,
              "currency": "EUR"}
    hold = {"hold_id": "01J0HOLD", "card": "LC-1", "store_id": "S001", "pos_txn_id": "S001-07-000123",
            "points": 500, "offline": False}
    return {
        "pos.sale.v1": valid_sale(),
        "pos.return.v1": valid_return(),
        "pos.stock_query.v1": {"store_id": "S001", "skus": ["SKU-1", "SKU-2"]},
        "erp.sale_posted.v1": posted,
        "erp.return_posted.v1": {**posted, "original_pos_txn_id": "S001-07-000100",
                                 "original_doc_no": None},
        "erp.stock_changed.v1": {"store_id": "S001", "sku": "SKU-1", "on_hand": -3,
                                 "changed_at": "2024-03-01T10:16:00Z"},
        "erp.stock_changes.v1": {"items": [{"idempotencykey": "erp.stock_changed.v1:S001:SKU-1:t:-3", "change": {
            "store_id": "S001", "sku": "SKU-1", "on_hand": -3, "changed_at": "2024-03-01T10:16:00Z"}}]},
        "customer.updated.v1": {"customer_id": "C1", "name": "Ada", "email": "ada@example.org",
                                "phone": "+33 1 23", "loyalty_card": "LC-1",
                                "updated_at": "2024-03-01T02:00:00Z"},
        **customer_payloads(),
        "loyalty.points_accrued.v1": points,
        "loyalty.points_reversed.v1": {**points, "original_pos_txn_id": "S001-07-000100"},
        "loyalty.redemption_authorized.v1": {**hold, "expires_at": "2024-03-01T10:30:00Z"},
        "loyalty.redemption_captured.v1": hold,
        "loyalty.redemption_released.v1": {**hold, "reason": "voided"},
        "loyalty.settlement.v1": {"store_id": "S001", "business_day": "2024-03-01", "points_issued": 290,
                                  "points_redeemed": 500, "points_reversed": 0, "point_value_minor": 1,
                                  "liability_minor": -210,
                                  "currency": "EUR"},
        "routing.table_applied.v1": {"version": 4, "table": "version: 4\n", "reason": "test"},
        "store.control_totals.v1": {
            "store_id": "S001", "business_day": "2024-03-01", "as_of": 7, "taken_at": "2024-03-01T22:00:00Z",
            "sales": {"count": 1, "amount_minor": {"EUR": 2900}, "transactions": [
                {"pos_txn_id": "S001-07-000123", "total_minor": 2900, "currency": "EUR",
                 "loyalty_card": True, "via": "bus"}]},
            "returns": {"count": 0, "amount_minor": {}, "transactions": []}},
        "store.control_totals.v2": {
            "store_id": "S001", "business_day": "2024-03-01", "as_of": 7, "taken_at": "2024-03-01T22:00:00Z",
            "sales": {"count": 1, "amount_minor": {"EUR": 2900}, "digest": "0123456789abcdef",
                      "loyalty_count": 1, "loyalty_digest": "00000000000000ff"},
            "returns": {"count": 0, "amount_minor": {}, "digest": "0000000000000000",
                        "loyalty_count": 0, "loyalty_digest": "0000000000000000"}},
        "journal.hops.v1": {"hops": [{"id": "01J", "hop": "written", "outcome": "ok", "time": 1.5,
                                      "items": [{"key": "k:2", "row": 2, "refs": ["C1"]}]}]},
        "event.batch.v1": {"item_type": "customer.updated.v1", "file": "customers_1.csv",
                           "sha256": "a" * 64, "items": [{"row": 2, "idempotencykey": "a:2",
                                                          "data": {"customer_id": "C1"}}]},
        "case.opened.v1": {"case_id": "return_over_quantity:S001-R-1", "case_type": "return_over_quantity",
                           "store_id": "S001", "process": "return_refund", "process_id": "S001-R-1",
                           "transaction_id": "S001-R-1", "summary": "2 returned, 1 sold",
                           "opened_at": "2026-03-01T10:00:00+00:00"},
        "process.step_retry.v1": {"process": "return_refund", "process_id": "S001-R-1",
                                  "case_id": "loyalty_reversal_refused:S001-R-1", "requested_by": "ops"},
        **return_payloads(posted),
        "process.step_failed.v1": {"command_type": "loyalty.return_points.v1", "command_id": "01J8Z3Q5W8N4T6B2C9D0E1F2G3",
                                   "code": "insufficient_points", "reason": "points: 120 asked, 40 available"},
        **order_payloads(),
        **order_process_payloads(),
    }


def customer_payloads() -> dict[str, dict]:
    """Customer mastering (contracts/customer.py, contracts/mastering.py)."""
    at = "2026-12-07T10:00:00Z"
    return {
        "customer.updated.v2": {"origin": "crm", "record_id": "C1", "changed_at": at,
                                "values": {"name": "Ada", "email": None, "consent_sms": False}},
        "crm.customer_exported.v1": {"customer_id": "C1", "name": "Ada", "email": "ada@example.org", "phone": None,
                                     "loyalty_card": "LC-1", "updated_at": at, "consent_marketing_email": "Y",
                                     "consent_sms": "N", "consent_data_sharing": None},
        "customer.mastered.v1": {"mastered_at": at, "writes": [
            {"system": "erp", "record_id": "C1", "golden_id": "G00000000001", "origin": "crm", "create": True,
             "write_golden_id": True, "values": {"name": "Ada", "tax_id": None}}]},
        "customer.merged.v1": {"survivor": "G00000000001", "retired": "G00000000002", "matched_on": ["email"],
                               "origin": "loyalty", "merged_at": at},
        "consent.changed.v1": {"golden_id": "G00000000001", "consent": "sms", "granted": False, "origin": "crm",
                               "source_record": "crm:C1", "changed_at": at},
    }


def return_payloads(posted: dict) -> dict[str, dict]:
    """Return to refund (contracts/returns.py): the commands and replies of its steps."""
    ret = {"store_id": "S001", "terminal_id": "07", "pos_txn_id": "S001-07-R1", "business_day": "2024-03-02",
           "currency": "EUR", "lines": [{"line_no": 1, "sku": "SKU-2", "quantity": 1, "unit_price_minor": 500,
                                          "line_total_minor": 500}],
           "total_minor": 500, "tenders": [{"kind": "cash", "amount_minor": 500}],
           "original": {"store_id": "S001", "pos_txn_id": "S001-07-000123"}}
    returned = {**posted, "pos_txn_id": "S001-07-R1", "doc_no": "R00000001", "total_minor": 500,
                "lines": [{"sku": "SKU-2", "quantity": 1, "line_total_minor": 500}],
                "original_pos_txn_id": "S001-07-000123", "original_doc_no": "INV-9",
                "original": {"doc_no": "INV-9", "business_day": "2024-03-01", "loyalty_card": "LC-1",
                             "lines": posted["lines"], "returned_before": []}}
    return {
        "erp.post_return.v1": {"pos_return": ret},
        "loyalty.return_points.v1": {"action": "reverse", "posted": returned, "clawback_points": 50,
                                     "clawback_promotion": "spend-100"},
        "loyalty.return_points_booked.v1": {"store_id": "S001", "pos_txn_id": "S001-07-R1", "action": "reverse",
                                            "card": "LC-1", "points": 55, "clawback_points": 50},
        "crm.record_return.v1": {"store_id": "S001", "pos_txn_id": "S001-07-R1", "loyalty_card": "LC-1",
                                 "amount_minor": 500, "posted_at": "2024-03-02T10:00:00Z",
                                 "original_pos_txn_id": "S001-07-000123"},
        "crm.return_recorded.v1": {"store_id": "S001", "pos_txn_id": "S001-07-R1", "customer_id": "C1",
                                   "recorded": True},
    }


def order_payloads() -> dict[str, dict]:
    """Click and collect (contracts/orders.py, inventory.py, fulfilment.py)."""
    at = "2026-12-07T10:00:00Z"
    order, store = {"order_id": "W-01J0ORDER"}, {"order_id": "W-01J0ORDER", "store_id": "S001"}
    level = {"sku": "100001", "quantity": 2, "on_hand": 5, "reserved": 2}
    return {
        "order.placed.v1": {**order, "customer_id": "C00001", "loyalty_card": "LC0000000001", "pickup_store": "S001",
                            "currency": "EUR", "lines": [{"line_no": 1, "sku": "100001", "quantity": 2,
                                                          "unit_price_minor": 1999, "line_total_minor": 3998}],
                            "total_minor": 3998, "points": 500, "points_minor": 500, "paid_minor": 3498,
                            "payment_reference": "PSP-AUTH-77", "placed_at": at},
        "order.cancel_requested.v1": {**order, "reason": "changed my mind", "requested_at": at},
        "order.collected.v1": {**store, "collected_at": at, "revenue_doc_no": "O00000002", "points_redeemed": 500,
                               "points_earned": 34},
        "order.cancelled.v1": {**store, "reason": "out_of_stock", "detail": "100001: 2 wanted, 1 available",
                               "cancelled_at": at},
        "inventory.reserved.v1": {**store, "lines": [level], "expires_at": "2026-12-11T10:00:00Z", "at": at},
        "inventory.released.v1": {**store, "lines": [level], "reason": "cancelled", "at": at},
        "inventory.unavailable.v1": {**store, "shortages": [{"sku": "100001", "wanted": 2, "available": 1}],
                                     "at": at},
        "fulfilment.task_created.v1": {**store, "customer_id": "C00001", "lines": [
            {"line_no": 1, "sku": "100001", "quantity": 2}], "collect_by": "2026-12-10T10:00:00Z", "created_at": at},
        "fulfilment.task_cancelled.v1": {**store, "reason": "customer_cancelled", "cancelled_at": at},
        "fulfilment.picked.v1": {**store, "terminal_id": "A1", "picked_at": at},
        "fulfilment.collected.v1": {**store, "terminal_id": "A1", "collected_at": at},
        "fulfilment.task_withdrawn.v1": {**store, "reason": "not_collected", "withdrawn_at": at},
    }


def order_process_payloads() -> dict[str, dict]:
    """The click-and-collect process's commands and replies (contracts/order_process.py)."""
    order = {"order_id": "W-01J0ORDER", "store_id": "S001"}
    placed = order_payloads()["order.placed.v1"]
    card, day = {"card": "LC0000000001"}, {"business_day": "2026-12-08"}
    return {
        "erp.reserve_stock.v1": {**order, "lines": [{"sku": "100001", "quantity": 2}],
                                 "expires_at": "2026-12-11T10:00:00Z"},
        "erp.release_stock.v1": order,
        "erp.commit_order.v1": {"order": placed},
        "erp.order_committed.v1": {**order, "doc_no": "O00000001", "total_minor": 3998, "currency": "EUR"},
        "erp.reverse_order.v1": {**order, **day},
        "erp.order_reversed.v1": {**order, "doc_no": "O00000002"},
        "erp.fulfil_order.v1": {**order, **day},
        "erp.order_fulfilled.v1": {**order, "revenue_doc_no": "O00000002", "total_minor": 3998, "currency": "EUR"},
        "loyalty.hold_points.v1": {**order, **card, "points": 500, "ttl_seconds": 345600,
                                   "answer_by": "2026-12-07T10:02:00Z"},
        "loyalty.redemption_refused.v1": {**card, "store_id": "S001", "pos_txn_id": "W-01J0ORDER", "points": 500,
                                          "code": "insufficient_points", "reason": "balance 120"},
        "loyalty.capture_points.v1": {**order, "hold_id": "01J0HOLD"},
        "loyalty.release_points.v1": {**order, "hold_id": "01J0HOLD"},
        "loyalty.accrue_order.v1": {**order, **card, **day, "currency": "EUR",
                                    "lines": [{"sku": "100001", "quantity": 2, "line_total_minor": 3998}]},
        "loyalty.order_accrued.v1": {**order, **card, **day, "points": 39},
        "crm.record_order.v1": {**order, "customer_id": "C00001", "outcome": "collected", "amount_minor": 3998,
                                "currency": "EUR", "at": "2026-12-08T15:00:00Z"},
        "crm.order_recorded.v1": {**order, "customer_id": "C00001"},
        "order.close.v1": {**order, "outcome": "collected", "at": "2026-12-08T15:00:00Z", "detail": "collected",
                           "revenue_doc_no": "O00000002", "points_redeemed": 500, "points_earned": 39},
    }


def paths_of(type_name: str, data: dict) -> list[str]:
    with pytest.raises(ContractError) as info:
        registry.parse(type_name, data)
    return info.value.paths


def test_every_registered_type_has_a_valid_example_and_a_json_schema():
    examples = valid_payloads()
    assert sorted(examples) == registry.types()
    for type_name, data in examples.items():
        model = registry.parse(type_name, data)
        assert type(model) is registry.model_for(type_name)
        assert type(model).TYPE == type_name
        schema = registry.json_schema(type_name)
        assert schema["type"] == "object" and schema["additionalProperties"] is False
        assert set(schema["required"]) <= set(schema["properties"])
        event = CloudEvent.new(type_name, "test/contracts", data, idempotencykey=type_name)
        assert CloudEvent.from_json(event.to_json()).payload() == model


def test_sale_parses_to_typed_model():
    sale = registry.parse("pos.sale.v1", valid_sale())
    assert isinstance(sale, PosSaleV1)
    assert sale.business_day == date(2024, 3, 1)
    assert sale.occurred_at.utcoffset().total_seconds() == 3600
    assert [line.line_total_minor for line in sale.lines] == [2400, 500]
    assert sale.lines[1].discount_minor == 0
    with pytest.raises(ValidationError):
        sale.total_minor = 1  # frozen: a message is a fact, not a working copy


def _mutate(data: dict, path: str, value) -> dict:
    """Copy of `data` with the value at dotted `path` (list indexes as digits) replaced."""
    data = copy.deepcopy(data)
    *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
    target = data
    for part in parents:
        target = target[part]
    target[last] = value
    return data


SALE_CASES = [
    # (mutated path, value, expected error path)
    ("lines", [], "data.lines"), ("tenders", [], "data.tenders"),
    ("lines.0.quantity", 0, "data.lines.0.quantity"), ("lines.0.quantity", 2.0, "data.lines.0.quantity"),
    ("lines.0.unit_price_minor", -1, "data.lines.0.unit_price_minor"),
    ("lines.0.unit_price_minor", 12.5, "data.lines.0.unit_price_minor"),
    ("lines.0.unit_price_minor", "1250", "data.lines.0.unit_price_minor"),
    ("lines.0.discount_minor", -5, "data.lines.0.discount_minor"),
    ("lines.0.line_total_minor", 2401, "data.lines.0.line_total_minor"),
    ("lines.1.line_no", 1, "data.lines"),
    ("lines.0.line_no", 0, "data.lines.0.line_no"),
    ("lines.0.sku", "", "data.lines.0.sku"),
    ("total_minor", 3000, "data.total_minor"),
    ("tenders.1.amount_minor", 800, "data.tenders"),
    ("tenders.0.kind", "bitcoin", "data.tenders.0.kind"),
    ("currency", "eur", "data.currency"), ("currency", "EURO", "data.currency"),
    ("occurred_at", "2024-03-01T10:15:00", "data.occurred_at"),
    ("business_day", "2024-02-30", "data.business_day"),
    ("store_id", "s001", "data.store_id"), ("store_id", "S0010000X", "data.store_id"),
    ("terminal_id", "07-A", "data.terminal_id"),
    ("pos_txn_id", "", "data.pos_txn_id"), ("pos_txn_id", "x" * 41, "data.pos_txn_id"),
    ("cashier", "bob", "data.cashier"), ("lines.0.colour", "red", "data.lines.0.colour"),
]


@pytest.mark.parametrize(("path", "value", "expected"), SALE_CASES)
def test_sale_rejects_bad_input_at_field_path(path, value, expected):
    assert paths_of("pos.sale.v1", _mutate(valid_sale(), path, value)) == [expected]


ORDER_CASES = [
    ("lines.0.line_total_minor", 3997, "data.lines.0.line_total_minor"),
    ("total_minor", 4000, "data.total_minor"),
    ("paid_minor", 3998, "data.paid_minor"),  # the points pay 500 of it
    ("loyalty_card", None, "data.points"),  # points without a card
    ("lines.0.quantity", 0, "data.lines.0.quantity"),
    ("order_id", "W/1", "data.order_id"), ("payment_reference", "", "data.payment_reference"),
]


@pytest.mark.parametrize(("path", "value", "expected"), ORDER_CASES)
def test_order_rejects_bad_input_at_field_path(path, value, expected):
    assert paths_of("order.placed.v1", _mutate(order_payloads()["order.placed.v1"], path, value)) == [expected]


def test_sale_line_correction_with_negative_quantity_is_accepted():
    sale = valid_sale()
    sale["lines"].append({"line_no": 3, "sku": "SKU-2", "quantity": -1,
                          "unit_price_minor": 500, "line_total_minor": -500})
    sale["total_minor"] = 2400
    sale["tenders"] = [{"kind": "card", "amount_minor": 2400}]
    assert registry.parse("pos.sale.v1", sale).total_minor == 2400


@pytest.mark.parametrize(("type_name", "field"), [
    ("pos.sale.v1", "business_day"),
    ("pos.return.v1", "lines"),
    ("erp.return_posted.v1", "doc_no"),
    ("customer.updated.v1", "updated_at"),
])
def test_missing_required_field_is_named(type_name, field):
    data = valid_payloads()[type_name]
    del data[field]
    assert paths_of(type_name, data) == [f"data.{field}"]


RETURN_CASES = [
    ("lines.0.quantity", -1, "data.lines.0.quantity"), ("lines.0.quantity", 0, "data.lines.0.quantity"),
    ("lines.0.line_total_minor", 499, "data.lines.0.line_total_minor"),
    ("total_minor", 400, "data.total_minor"),
    ("tenders.0.amount_minor", 400, "data.tenders"),
    ("original.store_id", "bad id", "data.original.store_id"),
    ("original.pos_txn_id", "", "data.original.pos_txn_id"),
    ("original.till", "07", "data.original.till"),
]


@pytest.mark.parametrize(("path", "value", "expected"), RETURN_CASES)
def test_return_rejects_bad_input_at_field_path(path, value, expected):
    assert paths_of("pos.return.v1", _mutate(valid_return(), path, value)) == [expected]


def test_return_allows_receiptless_original_day():
    parsed = registry.parse("pos.return.v1", _mutate(valid_return(), "original.business_day", None))
    assert isinstance(parsed, PosReturnV1) and parsed.original.business_day is None


@pytest.mark.parametrize(("skus", "expected"), [
    ([], "data.skus"), (["SKU"] * 101, "data.skus"),
    (["SKU-1", ""], "data.skus.1"), (["SKU-1", "  "], "data.skus.1"),
])
def test_stock_query_bounds(skus, expected):
    assert paths_of("pos.stock_query.v1", {"store_id": "S001", "skus": skus}) == [expected]
    assert isinstance(registry.parse("pos.stock_query.v1", {"store_id": "S001", "skus": ["A"] * 100}),
                      PosStockQueryV1)


OTHER_CASES = [
    ("erp.sale_posted.v1", "doc_no", "", "data.doc_no"),
    ("erp.sale_posted.v1", "posted_at", "2024-03-01T10:16:00", "data.posted_at"),
    ("erp.sale_posted.v1", "lines", [], "data.lines"),
    ("erp.sale_posted.v1", "lines.0.line_total_minor", 24.0, "data.lines.0.line_total_minor"),
    ("erp.sale_posted.v1", "currency", "E1R", "data.currency"),
    ("erp.return_posted.v1", "original_pos_txn_id", "", "data.original_pos_txn_id"),
    ("erp.stock_changed.v1", "changed_at", "2024-03-01T10:16:00", "data.changed_at"),
    ("erp.stock_changed.v1", "on_hand", 1.5, "data.on_hand"),
    ("erp.stock_changed.v1", "warehouse", "W1", "data.warehouse"),
    ("erp.stock_changes.v1", "items", [], "data.items"),
    ("erp.stock_changes.v1", "items.0.change.on_hand", 1.5, "data.items.0.change.on_hand"),
    ("customer.updated.v1", "name", "", "data.name"),
    ("customer.updated.v1", "email", "not-an-email", "data.email"),
    ("customer.updated.v1", "email", "", "data.email"),
    ("customer.updated.v1", "updated_at", "2024-03-01T02:00:00", "data.updated_at"),
    ("customer.updated.v2", "values.email", "not-an-email", "data.values.email"),
    ("customer.updated.v2", "values.consent_sms", "N", "data.values.consent_sms"),
    ("customer.updated.v2", "values.shoe_size", "42", "data.values.shoe_size"),
    ("customer.updated.v2", "origin", "CRM", "data.origin"),
    ("crm.customer_exported.v1", "consent_sms", "yes", "data.consent_sms"),
    ("customer.mastered.v1", "writes.0.golden_id", "C1", "data.writes.0.golden_id"),
    ("customer.mastered.v1", "writes", [], "data.writes"),
    ("loyalty.points_accrued.v1", "points", 0, "data.points"),
    ("loyalty.points_accrued.v1", "basis_minor", 29.0, "data.basis_minor"),
    ("loyalty.points_accrued.v1", "store_id", "", "data.store_id"),
    ("loyalty.points_reversed.v1", "points", -29, "data.points"),
    ("loyalty.points_reversed.v1", "original_pos_txn_id", "", "data.original_pos_txn_id"),
]


@pytest.mark.parametrize(("type_name", "path", "value", "expected"), OTHER_CASES)
def test_other_messages_reject_bad_input_at_field_path(type_name, path, value, expected):
    data = _mutate(valid_payloads()[type_name], path, value)
    assert paths_of(type_name, data) == [expected]


def test_money_beyond_int64_is_refused():
    huge = 2**63
    sale = valid_sale(lines=[{"line_no": 1, "sku": "X", "quantity": 1,
                              "unit_price_minor": huge, "line_total_minor": huge}],
                      total_minor=huge, tenders=[{"kind": "card", "amount_minor": huge}])
    assert "data.lines.0.unit_price_minor" in paths_of("pos.sale.v1", sale)


# --- registry ---------------------------------------------------------------------------

def test_unknown_type_lists_known_types_and_non_object_data_is_named():
    with pytest.raises(ContractError) as info:
        registry.model_for("pos.sale.v9")
    assert "pos.sale.v9" in str(info.value) and "pos.sale.v1" in str(info.value)
    assert info.value.paths == ["type"]
    assert paths_of("pos.sale.v1", ["not", "an", "object"]) == ["data"]


@pytest.mark.parametrize(("name", "expected"), [
    ("pos.sale.v1", ("pos.sale", 1)), ("erp.sale_posted.v12", ("erp.sale_posted", 12)),
    ("loyalty.points_reversed.v2", ("loyalty.points_reversed", 2)),
])
def test_base_and_version(name, expected):
    assert registry.base_and_version(name) == expected


@pytest.mark.parametrize("name", ["pos.sale", "Pos.Sale.v1", "pos.sale.v0", "pos.sale.v", "v1", "pos..v1"])
def test_base_and_version_rejects_bad_names(name):
    with pytest.raises(ContractError):
        registry.base_and_version(name)


# --- envelope ---------------------------------------------------------------------------

def big_sale() -> PosSaleV1:
    line_total = 3 * BIG - 7
    return PosSaleV1.model_validate(valid_sale(
        lines=[{"line_no": 1, "sku": "GOLD", "quantity": 3, "unit_price_minor": BIG,
                "discount_minor": 7, "line_total_minor": line_total}],
        total_minor=line_total, tenders=[{"kind": "card", "amount_minor": line_total - 1},
                                         {"kind": "cash", "amount_minor": 1}]))


def new_event(**overrides) -> CloudEvent:
    args = {"type": "pos.sale.v1", "source": "store/S001/pos/07", "data": big_sale(),
            "idempotencykey": "S001:S001-07-000123"}
    args.update(overrides)
    return CloudEvent.new(**args)


def test_new_fills_defaults_and_omits_absent_subject_on_the_wire():
    event = new_event()
    assert (event.specversion, event.datacontenttype) == ("1.0", "application/json")
    assert len(event.id) == 26 and event.correlationid == event.id
    assert event.data["lines"][0]["unit_price_minor"] == BIG
    assert event.data["business_day"] == "2024-03-01"
    wire = json.loads(event.to_json())
    assert "subject" not in wire and wire["time"].endswith("Z")
    assert wire["idempotencykey"] == "S001:S001-07-000123" and wire["correlationid"] == wire["id"]


def test_new_keeps_given_ids():
    given = {"id": "01HQ0000000000000000000000", "correlationid": "chain-1", "subject": "T-1"}
    event = new_event(**given)
    assert (event.id, event.correlationid, event.subject) == tuple(given.values())


def test_envelope_round_trips_through_json_with_exact_money():
    event = new_event(subject="S001-07-000123")
    raw = event.to_json()
    assert isinstance(raw, bytes) and b"\n" not in raw and b": " not in raw
    back = CloudEvent.from_json(raw)
    assert back == event
    assert CloudEvent.from_json(raw.decode()) == event
    sale = back.payload()
    assert isinstance(sale, PosSaleV1)
    assert sale == big_sale()
    assert sale.lines[0].unit_price_minor == BIG
    assert sale.total_minor == 3 * BIG - 7 == 299_999_999_990
    assert json.loads(raw)["data"]["total_minor"] == 299_999_999_990


def test_envelope_beyond_what_the_fast_json_reader_takes_is_read_or_named():
    """orjson reads envelopes; pydantic takes what orjson refuses and names what is wrong."""
    wire = json.loads(new_event().to_json())
    wire["data"]["lines"][0]["unit_price_minor"] = 2**70  # valid JSON, beyond 64 bits
    event = CloudEvent.from_json(json.dumps(wire))
    assert event.data["lines"][0]["unit_price_minor"] == 2**70
    with pytest.raises(ContractError) as refused:
        event.payload()
    assert refused.value.paths == ["data.lines.0.unit_price_minor"]
    with pytest.raises(ContractError, match="invalid event: .*[Ii]nvalid JSON"):
        CloudEvent.from_json(b'{"specversion": "1.0", ')
    with pytest.raises(ContractError) as no_object:
        CloudEvent.from_json(b"[1, 2]")
    assert no_object.value.paths == ["<root>"]
    wire.pop("source")
    with pytest.raises(ContractError) as missing:
        CloudEvent.from_json(json.dumps(wire).encode())
    assert missing.value.paths == ["source"]


def test_new_validates_registered_dict_payload():
    event = new_event(data=valid_sale())
    assert isinstance(event.payload(), PosSaleV1)
    assert event.data["occurred_at"] == "2024-03-01T10:15:00+01:00"
    with pytest.raises(ContractError) as info:
        new_event(data=valid_sale(total_minor=1))
    assert info.value.paths == ["data.total_minor"]


def test_new_rejects_model_of_the_wrong_type():
    with pytest.raises(ContractError) as info:
        new_event(type="pos.return.v1")
    assert info.value.paths == ["data"]


def test_unregistered_type_carries_any_dict_but_has_no_payload():
    event = new_event(type="ops.routes_applied.v4", data={"version": 4})
    assert CloudEvent.from_json(event.to_json()) == event
    with pytest.raises(ContractError, match="ops.routes_applied.v4"):
        event.payload()


@pytest.mark.parametrize(("overrides", "expected"), [
    ({"type": "pos.sale"}, "type"), ({"type": "POS.SALE.V1"}, "type"),
    ({"source": ""}, "source"), ({"idempotencykey": ""}, "idempotencykey"),
    ({"id": "not-a-ulid"}, "id"),
    ({"correlationid": ""}, "correlationid"),
])
def test_new_rejects_bad_envelope_fields(overrides, expected):
    with pytest.raises(ContractError) as info:
        new_event(**overrides)
    assert info.value.paths == [expected]


def test_new_requires_idempotencykey():
    with pytest.raises(TypeError):
        CloudEvent.new("pos.sale.v1", "store/S001/pos/07", big_sale())  # type: ignore[call-arg]


def _wire(**changes) -> str:
    """A valid event's JSON with attributes changed; None removes the attribute."""
    wire = json.loads(new_event().to_json())
    wire.update(changes)
    return json.dumps({k: v for k, v in wire.items() if v is not None})


@pytest.mark.parametrize(("changes", "expected"), [
    ({"specversion": "0.3"}, ["specversion"]),
    ({"time": "2024-03-01T10:15:00"}, ["time"]),
    ({"type": "pos.sale.v1.extra"}, ["type"]),
    ({"data": "a string"}, ["data"]),
    ({"traceparent": "00-abc"}, ["traceparent"]),
    ({"idempotencykey": None}, ["idempotencykey"]),
    ({"source": None, "data": None}, ["source", "data"]),
])
def test_from_json_names_bad_attributes(changes, expected):
    with pytest.raises(ContractError) as info:
        CloudEvent.from_json(_wire(**changes))
    assert info.value.paths == expected


def test_from_json_without_correlationid_correlates_to_own_id():
    event = CloudEvent.from_json(_wire(correlationid=None, id="01HQ0000000000000000000000"))
    assert event.correlationid == event.id == "01HQ0000000000000000000000"


@pytest.mark.parametrize("raw", [b"{not json", b"", b"\xff\xfe", b"[1, 2]", b"null"])
def test_invalid_json_is_a_contract_error(raw):
    with pytest.raises(ContractError) as info:
        CloudEvent.from_json(raw)
    assert info.value.errors


def test_payload_reports_nested_path():
    wire = json.loads(new_event().to_json())
    wire["data"]["lines"][0]["quantity"] = 0
    event = CloudEvent.from_json(json.dumps(wire))  # envelope alone is fine
    with pytest.raises(ContractError) as info:
        event.payload()
    assert info.value.paths == ["data.lines.0.quantity"]
    assert "data.lines.0.quantity" in str(info.value)


def test_naive_time_is_rejected_in_python_too():
    attrs = {"type": "pos.sale.v1", "source": "s", "data": {}, "idempotencykey": "k"}
    with pytest.raises(ValidationError):
        CloudEvent(**attrs, time=datetime(2024, 3, 1, 10, 0))
    assert CloudEvent(**attrs, time=datetime(2024, 3, 1, 10, tzinfo=timezone.utc)).time.hour == 10


def test_customer_values_say_held_empty_apart_from_not_held():
    """null: the system holds the attribute empty; left out: the system does not hold it.
    The difference survives the envelope's JSON."""
    data = valid_payloads()["customer.updated.v2"]
    event = CloudEvent.new("customer.updated.v2", "crm", registry.parse("customer.updated.v2", data),
                           idempotencykey="k")
    again = CloudEvent.from_json(event.to_json()).payload()
    assert event.data["values"] == {"name": "Ada", "email": None, "consent_sms": False}
    assert again.values.given() == {"name": "Ada", "email": None, "consent_sms": False}
    row = registry.parse("crm.customer_exported.v1", valid_payloads()["crm.customer_exported.v1"])
    assert CustomerValues(**row.given()).given() == row.given() == {"name": "Ada", "email": "ada@example.org", "phone": None, "loyalty_card": "LC-1",
                                    "consent_marketing_email": True, "consent_sms": False}
