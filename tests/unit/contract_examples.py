"""Valid examples of the bus's messages, one per registered type (and builders for a few),
for the contract tests to mutate one field at a time."""
from __future__ import annotations

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
