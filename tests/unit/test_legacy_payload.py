"""routing/legacy_payload.py: the legacy POS JSON (UPPER-CASE, cents) maps onto the
contracts, and every refusal names the field the way the POS spells it (lines from 1)."""
from __future__ import annotations

import copy
from datetime import date, datetime, timezone

import pytest

from contracts.errors import ContractError
from contracts.pos import PosReturnV1, PosSaleV1
from routing.legacy_payload import _legacy_path, return_from_legacy, sale_from_legacy

pytestmark = pytest.mark.unit


def legacy_sale(**overrides) -> dict:
    payload = {
        "STORE": "S001", "TERMINAL": "07", "TXN_ID": "S001-07-000001", "TXN_DATE": "20261127",
        "TXN_TIME": "101502", "CURRENCY": "EUR", "LOYALTY_CARD": "LC0000000001", "CUST_NO": "C00001",
        "LINES": [{"SKU": "100001", "QTY": 2, "PRICE": 1999, "DISC": 100, "LINE": 3898},
                  {"SKU": "100002", "QTY": 3, "PRICE": 500, "LINE": 1500}],
        "TOTAL": 5398,
        "TENDERS": [{"TYPE": "CARD", "AMOUNT": 5000}, {"TYPE": "CASH", "AMOUNT": 398}],
    }
    payload.update(overrides)
    return payload


def legacy_return(**overrides) -> dict:
    payload = legacy_sale(TXN_ID="S001-07-R00001", LINES=[{"SKU": "100002", "QTY": 1, "PRICE": 500, "LINE": 500}],
                          TOTAL=500, TENDERS=[{"TYPE": "CASH", "AMOUNT": 500}],
                          ORIG_STORE="S002", ORIG_TXN_ID="S002-01-000001", REASON="damaged")
    payload.update(overrides)
    return payload


def refusal(fn, payload) -> ContractError:
    with pytest.raises(ContractError) as info:
        fn(payload)
    return info.value


# --- good mapping -----------------------------------------------------------------------

def test_sale_maps_every_field():
    sale = sale_from_legacy(legacy_sale())
    assert isinstance(sale, PosSaleV1)
    assert (sale.store_id, sale.terminal_id, sale.pos_txn_id) == ("S001", "07", "S001-07-000001")
    assert sale.business_day == date(2026, 11, 27)
    assert sale.occurred_at == datetime(2026, 11, 27, 10, 15, 2, tzinfo=timezone.utc)
    assert sale.currency == "EUR" and sale.total_minor == 5398
    assert sale.loyalty_card == "LC0000000001" and sale.customer_id == "C00001"
    assert [(l.line_no, l.sku, l.quantity, l.unit_price_minor, l.discount_minor, l.line_total_minor)
            for l in sale.lines] == [(1, "100001", 2, 1999, 100, 3898), (2, "100002", 3, 500, 0, 1500)]
    assert [(t.kind, t.amount_minor) for t in sale.tenders] == [("card", 5000), ("cash", 398)]


def test_sale_without_optional_fields():
    payload = legacy_sale()
    for key in ("TXN_TIME", "LOYALTY_CARD", "CUST_NO"):
        del payload[key]
    sale = sale_from_legacy(payload)
    assert sale.business_day == date(2026, 11, 27)
    assert sale.occurred_at is None  # no time given: the legacy ERP stores none, nor do we
    assert sale.loyalty_card is None and sale.customer_id is None
    assert sale_from_legacy(legacy_sale(TXN_TIME="")).occurred_at is None


def test_payload_is_not_mutated():
    payload = legacy_sale()
    before = copy.deepcopy(payload)
    sale_from_legacy(payload)
    assert payload == before


def test_return_maps_original_and_reason():
    ret = return_from_legacy(legacy_return())
    assert isinstance(ret, PosReturnV1)
    assert ret.pos_txn_id == "S001-07-R00001"
    assert (ret.original.store_id, ret.original.pos_txn_id) == ("S002", "S002-01-000001")
    assert ret.reason == "damaged"
    assert [(l.sku, l.quantity) for l in ret.lines] == [("100002", 1)]


def test_return_original_store_defaults_to_own_store():
    payload = legacy_return()
    del payload["ORIG_STORE"]
    assert return_from_legacy(payload).original.store_id == "S001"


@pytest.mark.parametrize("path, legacy", [
    ("lines.0.quantity", "LINES[1].QTY"),
    ("lines.11.line_total_minor", "LINES[12].LINE"),
    ("tenders.1.kind", "TENDERS[2].TYPE"),
    ("total_minor", "TOTAL"),
    ("business_day", "TXN_DATE"),
    ("unknown_thing", "unknown_thing"),
])
def test_legacy_path(path, legacy):
    assert _legacy_path(path) == legacy


# --- refusals ---------------------------------------------------------------------------

def _without(key):
    def mutate(p):
        del p[key]
    return mutate


def _set(key, value):
    def mutate(p):
        p[key] = value
    return mutate


def _line(no, key, value):
    def mutate(p):
        p["LINES"][no][key] = value
    return mutate


def _tender(no, key, value):
    def mutate(p):
        p["TENDERS"][no][key] = value
    return mutate


@pytest.mark.parametrize("mutate, path", [
    (_without("TXN_ID"), "TXN_ID"),
    (_set("TXN_ID", ""), "TXN_ID"),
    (_without("STORE"), "STORE"),
    (_set("STORE", "s001"), "STORE"),
    (_without("TERMINAL"), "TERMINAL"),
    (_set("CURRENCY", "eur"), "CURRENCY"),
    (_without("TXN_DATE"), "TXN_DATE"),
    (_set("TXN_DATE", "2026-11-27"), "TXN_DATE"),
    (_set("TXN_DATE", "2026112"), "TXN_DATE"),
    (_set("TXN_TIME", "256000"), "TXN_TIME"),
    (_set("TXN_TIME", "10:15"), "TXN_TIME"),
    (_line(1, "QTY", 0), "LINES[2].QTY"),
    (_line(0, "QTY", 2.0), "LINES[1].QTY"),
    (_line(0, "QTY", "2"), "LINES[1].QTY"),
    (_line(0, "PRICE", -1), "LINES[1].PRICE"),
    (_line(1, "LINE", 1501), "LINES[2].LINE"),
    (_line(0, "SKU", None), "LINES[1].SKU"),
    (_set("TOTAL", 5399), "TOTAL"),
    (_set("TOTAL", 5398.0), "TOTAL"),
    (_tender(1, "AMOUNT", 397), "TENDERS"),
    (_tender(0, "TYPE", "CHEQUE"), "TENDERS[1].TYPE"),
    (_tender(0, "AMOUNT", None), "TENDERS[1].AMOUNT"),
    (_set("LINES", []), "LINES"),
    (_set("TENDERS", []), "TENDERS"),
    (_set("LINES", ["not an object"]), "LINES[1]"),
])
def test_sale_refusal_names_the_legacy_field(mutate, path):
    payload = legacy_sale()
    mutate(payload)
    err = refusal(sale_from_legacy, payload)
    assert path in err.paths, err.paths
    assert path in str(err)


def test_every_problem_is_reported():
    payload = legacy_sale()
    payload["LINES"][0]["QTY"] = 0
    payload["TERMINAL"] = "TOO-LONG"
    err = refusal(sale_from_legacy, payload)
    assert {"LINES[1].QTY", "TERMINAL"} <= set(err.paths)


@pytest.mark.parametrize("body", [None, [], "sale", 42, [legacy_sale()]])
def test_non_object_body(body):
    err = refusal(sale_from_legacy, body)
    assert err.paths == ["body"]


def test_non_object_body_on_return():
    assert refusal(return_from_legacy, ["x"]).paths == ["body"]


def test_return_refuses_negative_quantity():
    payload = legacy_return(LINES=[{"SKU": "100002", "QTY": -1, "PRICE": 500, "LINE": -500}],
                            TOTAL=-500, TENDERS=[{"TYPE": "CASH", "AMOUNT": -500}])
    assert "LINES[1].QTY" in refusal(return_from_legacy, payload).paths


def test_impossible_date_is_blamed_on_txn_date():
    err = refusal(sale_from_legacy, legacy_sale(TXN_DATE="20260230"))
    assert err.paths == ["TXN_DATE"]


@pytest.mark.parametrize("key", ["LINES", "TENDERS"])
def test_lines_or_tenders_not_a_list(key):
    err = refusal(sale_from_legacy, legacy_sale(**{key: 5}))
    assert key in err.paths


def test_bad_orig_store_is_named_orig_store():
    err = refusal(return_from_legacy, legacy_return(ORIG_STORE="s-1"))
    assert err.paths == ["ORIG_STORE"]


def test_return_without_receipt_is_accepted_like_the_legacy_erp():
    payload = legacy_return()
    del payload["ORIG_TXN_ID"], payload["ORIG_STORE"]
    assert return_from_legacy(payload).pos_txn_id == "S001-07-R00001"


def _sku(value):
    def mutate(p):
        p["LINES"][0]["SKU"] = value
    return mutate


@pytest.mark.parametrize("mutate", [
    _tender(0, "TYPE", "card"),
    _set("TXN_DATE", 20261127),
    _set("LOYALTY_CARD", "X" * 21),
    _sku("9" * 21),
], ids=["lower-case-tender", "numeric-date", "long-loyalty-card", "long-sku"])
def test_refuses_what_the_legacy_erp_refuses(mutate):
    from demo.legacy_erp.postings import ValidationError, parse_document

    payload = legacy_sale()
    mutate(payload)
    with pytest.raises(ValidationError):  # the legacy ERP answers 400 today
        parse_document(copy.deepcopy(payload), "S")
    refusal(sale_from_legacy, payload)
