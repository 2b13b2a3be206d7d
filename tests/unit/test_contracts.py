"""Contracts: every message refuses bad input at the right field path, and the envelope
carries money through JSON without losing a cent."""
from __future__ import annotations

import copy
from datetime import date

import pytest
from pydantic import ValidationError

from contracts import registry
from contracts.envelope import CloudEvent
from contracts.errors import ContractError
from contracts.customer import CustomerValues
from contracts.pos import PosReturnV1, PosSaleV1, PosStockQueryV1

pytestmark = pytest.mark.unit

from tests.unit.contract_examples import (order_payloads, valid_payloads, valid_return, valid_sale)

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
