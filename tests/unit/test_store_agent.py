"""routing/agent.py: the store agent's HTTP handlers answer like the legacy ERP and commit
every accepted sale to the outbox first (worker_factory, a real outbox file, no broker)."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from nameko.testing.services import worker_factory
from werkzeug.test import EnvironBuilder

from contracts.envelope import CloudEvent
from routing import agent as agent_module
from routing.agent import MAX_BODY, StoreAgent
from routing.outbox import Outbox

pytestmark = pytest.mark.unit


def legacy_sale(txn_id="S001-07-000001", store="S001", lines=None) -> dict:
    lines = lines or [{"SKU": "100001", "QTY": 2, "PRICE": 1999, "LINE": 3998}]
    total = sum(line["LINE"] for line in lines)
    return {"STORE": store, "TERMINAL": "07", "TXN_ID": txn_id, "TXN_DATE": "20261127",
            "TXN_TIME": "101500", "CURRENCY": "EUR", "LINES": lines, "TOTAL": total,
            "TENDERS": [{"TYPE": "CARD", "AMOUNT": total}]}


class FakeForwarder:
    def __init__(self):
        self.wakes = 0
        self.bus = SimpleNamespace(publisher=SimpleNamespace(connected=False))

    def wake(self):
        self.wakes += 1


@pytest.fixture
def outbox(tmp_path):
    box = Outbox(tmp_path / "outbox.db")
    yield box
    box.close()


@pytest.fixture
def store(outbox):
    return SimpleNamespace(store_id="S001", outbox=outbox, forwarder=FakeForwarder())


@pytest.fixture
def service(store):
    return worker_factory(StoreAgent, store=store)


def request(path="/erp/sales", body=None, data=None, content_type="application/json", method="POST"):
    if data is None and body is not None:
        data = json.dumps(body)
    return EnvironBuilder(method=method, path=path, data=data, content_type=content_type).get_request()


def answer(response) -> tuple[int, dict]:
    return response.status_code, json.loads(response.get_data())


def test_sale_is_committed_and_answered_in_legacy_shape(service, store, outbox):
    status, body = answer(service.post_sale(request(body=legacy_sale())))
    assert status == 200
    assert body["STATUS"] == "OK" and body["DOC_NO"] == "PENDING" and body["DUPLICATE"] is False
    [entry] = outbox.unsent(10)
    assert body["REF"] == entry.event_id
    event = CloudEvent.from_json(entry.body)
    assert event.type == entry.type == "pos.sale.v1"
    assert event.source == "store/S001/pos/07" and event.subject == "S001-07-000001"
    assert event.idempotencykey == "pos.sale.v1:S001:S001-07-000001"
    sale = event.payload()
    assert sale.total_minor == 3998 and sale.lines[0].sku == "100001"
    assert store.forwarder.wakes == 1


def test_same_txn_id_twice_is_one_row(service, outbox):
    _, first = answer(service.post_sale(request(body=legacy_sale())))
    status, second = answer(service.post_sale(request(body=legacy_sale())))
    assert status == 200 and second["STATUS"] == "OK"
    assert second["DUPLICATE"] is True and second["REF"] == first["REF"]
    assert len(outbox.unsent(10)) == 1


def test_return_goes_to_the_outbox_as_a_return(service, outbox):
    payload = {**legacy_sale("S001-07-R00001"), "ORIG_TXN_ID": "S001-07-000001", "REASON": "damaged"}
    status, body = answer(service.post_return(request("/erp/returns", body=payload)))
    assert status == 200 and body["DUPLICATE"] is False
    [entry] = outbox.unsent(10)
    assert entry.type == "pos.return.v1"
    ret = CloudEvent.from_json(entry.body).payload()
    assert ret.original.pos_txn_id == "S001-07-000001" and ret.reason == "damaged"


def test_sale_and_return_with_one_txn_id_are_distinct(service, outbox):
    service.post_sale(request(body=legacy_sale("T1")))
    payload = {**legacy_sale("T1"), "ORIG_TXN_ID": "T0"}
    _, body = answer(service.post_return(request("/erp/returns", body=payload)))
    assert body["DUPLICATE"] is False
    assert [e.type for e in outbox.unsent(10)] == ["pos.sale.v1", "pos.return.v1"]


def test_other_store_is_400_naming_store(service, store, outbox):
    status, body = answer(service.post_sale(request(body=legacy_sale(store="S002"))))
    assert status == 400 and body["STATUS"] == "ERROR"
    assert body["MESSAGE"].startswith("STORE")
    assert "S002" in body["MESSAGE"] and "S001" in body["MESSAGE"]
    assert outbox.unsent(10) == [] and store.forwarder.wakes == 0


def test_invalid_payload_is_400_naming_the_legacy_field(service, outbox):
    payload = legacy_sale()
    payload["LINES"][0]["QTY"] = 0
    status, body = answer(service.post_sale(request(body=payload)))
    assert status == 400 and "LINES[1].QTY" in body["MESSAGE"]
    assert outbox.unsent(10) == []


@pytest.mark.parametrize("data", [b"{not json", b'{"STORE": "S001",}', b"[1, 2"])
def test_bad_json_is_400(service, outbox, data):
    status, body = answer(service.post_sale(request(data=data)))
    assert status == 400 and body["STATUS"] == "ERROR"
    assert "invalid JSON" in body["MESSAGE"]
    assert outbox.unsent(10) == []


@pytest.mark.parametrize("data", [b"", b"null", b"[]", b'"sale"'])
def test_empty_or_non_object_body_is_400(service, outbox, data):
    status, body = answer(service.post_sale(request(data=data)))
    assert status == 400 and body["MESSAGE"].startswith("body")
    assert outbox.unsent(10) == []


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded",
                                          "application/xml"])
def test_wrong_content_type_is_415(service, outbox, content_type):
    req = request(data=json.dumps(legacy_sale()), content_type=content_type)
    status, body = answer(service.post_sale(req))
    assert status == 415 and content_type in body["MESSAGE"]
    assert outbox.unsent(10) == []


def test_json_with_charset_is_accepted(service, outbox):
    req = request(data=json.dumps(legacy_sale()), content_type="application/json; charset=utf-8")
    assert service.post_sale(req).status_code == 200
    assert len(outbox.unsent(10)) == 1


def test_body_over_the_limit_is_413(service, outbox):
    data = json.dumps({**legacy_sale(), "PAD": "x" * MAX_BODY}).encode()
    assert len(data) > MAX_BODY
    status, body = answer(service.post_sale(request(data=data)))
    assert status == 413 and str(MAX_BODY) in body["MESSAGE"]
    assert outbox.unsent(10) == []


def test_body_just_under_the_limit_is_accepted(service, outbox):
    base = json.dumps({**legacy_sale(), "PAD": ""}).encode()
    data = json.dumps({**legacy_sale(), "PAD": "x" * (MAX_BODY - len(base))}).encode()
    assert len(data) == MAX_BODY
    assert service.post_sale(request(data=data)).status_code == 200
    assert len(outbox.unsent(10)) == 1


def test_outbox_failure_is_503_and_no_row(service, store, outbox):
    service.post_sale(request(body=legacy_sale("first")))
    pages = outbox._db.execute("PRAGMA page_count").fetchone()[0]
    outbox._db.execute(f"PRAGMA max_page_count={pages}")  # the disk is full
    lines = [{"SKU": f"SKU-{n:05d}-" + "x" * 10, "QTY": 1, "PRICE": 100, "LINE": 100} for n in range(1000)]
    status, body = answer(service.post_sale(request(body=legacy_sale("second", lines=lines))))
    assert status == 503 and body["STATUS"] == "ERROR"
    assert "NOT recorded" in body["MESSAGE"]
    assert [CloudEvent.from_json(e.body).subject for e in outbox.unsent(10)] == ["first"]
    assert store.forwarder.wakes == 1  # only for the first sale


def test_healthz_reports_store_and_outbox(service, outbox):
    service.post_sale(request(body=legacy_sale()))
    status, body = answer(service.healthz(request("/healthz", method="GET")))
    assert status == 200
    assert body["store"] == "S001" and body["broker_connected"] is False
    assert body["outbox_depth"] == 1


def test_metrics_exposes_accept_latency(service):
    service.post_sale(request(body=legacy_sale()))
    response = service.metrics(request("/metrics", method="GET"))
    assert response.status_code == 200
    assert b'retailbus_agent_accept_seconds_count{route="sales"}' in response.get_data()


def test_body_that_is_not_utf8_is_400(service, outbox):
    status, body = answer(service.post_sale(request(data=b'{"STORE": "S\xff01"}')))
    assert status == 400
    assert outbox.unsent(10) == []


def test_lines_not_a_list_is_400(service, outbox):
    status, body = answer(service.post_sale(request(body={**legacy_sale(), "LINES": 5})))
    assert status == 400 and "LINES" in body["MESSAGE"]
