"""The erp's posted events are assembled, not validated: they must still be exactly
what the contract and CloudEvent.new would have made of the same posting."""
import json

import pytest

from contracts import registry
from contracts.envelope import CloudEvent
from contracts.pos import PosReturnV1, PosSaleV1
from services.erp import events

pytestmark = pytest.mark.unit

LINES = [{"line_no": 1, "sku": "SKU-1", "quantity": 2, "unit_price_minor": 250, "line_total_minor": 500},
         {"line_no": 2, "sku": "Ä 'quoted\"", "quantity": -1, "unit_price_minor": 100, "line_total_minor": -100}]
SALE = {"store_id": "S001", "terminal_id": "07", "pos_txn_id": "T-1 ; DROP", "business_day": "2026-11-27",
        "occurred_at": "2026-11-27T10:15:00+01:00", "currency": "EUR", "lines": LINES, "total_minor": 400,
        "tenders": [{"kind": "card", "amount_minor": 400}], "loyalty_card": "LC-9"}
RETURN = {**SALE, "lines": [{**LINES[0], "quantity": 1, "line_total_minor": 250}], "total_minor": 250,
          "tenders": [{"kind": "cash", "amount_minor": 250}], "loyalty_card": None,
          "original": {"store_id": "S002", "pos_txn_id": "T-0"}}


def built(event: CloudEvent) -> dict:
    return json.loads(event.to_json())


def reference(type_name: str, data: dict, doc_no: str, correlationid: str | None) -> dict:
    """What CloudEvent.new writes for the same payload, validated by the contract."""
    return built(CloudEvent.new(type_name, events.SOURCE, registry.parse(type_name, data), subject=doc_no,
                                correlationid=correlationid, idempotencykey=f"{type_name}:{doc_no}"))


def comparable(envelope: dict) -> dict:
    """Without what is minted per event (id, time, posted_at; a new chain's correlation id)."""
    drop = {"id", "time"} | ({"correlationid"} if envelope["correlationid"] == envelope["id"] else set())
    return {**{k: v for k, v in envelope.items() if k not in drop},
            "data": {k: v for k, v in envelope["data"].items() if k != "posted_at"}}


@pytest.mark.parametrize("correlationid", ["corr-1", None])
def test_a_sale_posted_event_is_what_the_contract_and_cloudevent_make_of_it(correlationid):
    sale = PosSaleV1.model_validate(SALE)
    ours = built(events.sale_posted(sale, "S00000042", correlationid))
    assert comparable(ours) == comparable(reference("erp.sale_posted.v1", ours["data"], "S00000042", correlationid))
    assert ours["data"]["lines"][1] == {"sku": "Ä 'quoted\"", "quantity": -1, "line_total_minor": -100}
    assert ours["data"]["posted_at"].endswith("Z")
    assert (ours["correlationid"] == ours["id"]) is (correlationid is None)
    assert CloudEvent.from_json(json.dumps(ours)).payload().doc_no == "S00000042"


@pytest.mark.parametrize("original_doc_no", ["S00000042", None])
def test_a_return_posted_event_is_what_the_contract_and_cloudevent_make_of_it(original_doc_no):
    ret = PosReturnV1.model_validate(RETURN)
    ours = built(events.return_posted(ret, "R00000007", original_doc_no, "corr-2"))
    assert comparable(ours) == comparable(reference("erp.return_posted.v1", ours["data"], "R00000007", "corr-2"))
    assert (ours["data"]["original_pos_txn_id"], ours["data"]["original_doc_no"]) == ("T-0", original_doc_no)


def test_a_receipt_less_return_names_no_original():
    ret = PosReturnV1.model_validate({k: v for k, v in RETURN.items() if k != "original"})
    data = built(events.return_posted(ret, "R00000008", None, None))["data"]
    assert (data["original_pos_txn_id"], data["original_doc_no"]) == (None, None)
    registry.parse("erp.return_posted.v1", data)
