"""routing/store_agent.py: the store agent's HTTP handlers answer like the legacy ERP and commit
every accepted sale to the outbox first (worker_factory, a real outbox file, no broker)."""
from __future__ import annotations

import json
import sqlite3
import time
from types import SimpleNamespace

import eventlet
import pytest
from nameko.testing.services import worker_factory
from prometheus_client import CONTENT_TYPE_LATEST
from werkzeug.test import EnvironBuilder

from contracts.envelope import CloudEvent
from routing import store_agent as agent_module
from routing.store_agent import MAX_BODY, StoreAgent
from routing.answers import AnswerCache
from routing.edge_auth import TerminalKeys, Verifier, signed_headers
from routing.legacy_payload import sale_from_legacy
from routing.outbox import Outbox
from routing.stock_cache import StockCache
from bus.settings import AgentSettings

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
        self.publisher = SimpleNamespace(connected=False)
        self.breaker_state = "closed"
        self.last_confirm = None

    def wake(self):
        self.wakes += 1


@pytest.fixture
def outbox(tmp_path):
    box = Outbox(tmp_path / "outbox.db")
    yield box
    box.close()


@pytest.fixture
def keys(tmp_path):
    keys = TerminalKeys(tmp_path / "terminal_keys.json")
    return {"07": bytes.fromhex(keys.add("07")), "08": bytes.fromhex(keys.add("08")), "file": keys}


@pytest.fixture
def auth_required():
    return False  # most tests are about the payload; the auth tests turn it on


@pytest.fixture
def store(outbox, keys, auth_required):
    return SimpleNamespace(store_id="S001", outbox=outbox, forwarder=FakeForwarder(),
                           config=AgentSettings(auth_required=auth_required),
                           verifier=Verifier(keys["file"]), answers=AnswerCache(300))


class FakeStock:
    def __init__(self, tmp_path):
        self.cache = StockCache(tmp_path / "stock.db")
        self.feed = SimpleNamespace(connected=False)
        self.erp = None  # what the ERP answers; an exception means it cannot

    def ask_erp(self, sku):
        if isinstance(self.erp, Exception):
            raise self.erp
        return self.erp


@pytest.fixture
def stock(tmp_path):
    fake = FakeStock(tmp_path)
    yield fake
    fake.cache.close()


BUS_TABLE = """version: 1
legacy: {base_url: "http://127.0.0.1:9"}
routes:
  - {name: sales, message: pos.sale.v1, legacy: POST /erp/sales, mode: bus}
  - {name: returns, message: pos.return.v1, legacy: POST /erp/returns, mode: bus}
  - {name: stock, message: pos.stock_query.v1, legacy: GET /erp/stock, mode: bus}
"""


@pytest.fixture
def service(store, stock):
    """Every route in bus mode: these tests are about the agent's own path (routing/modes
    and the legacy/shadow paths are tested with real processes in tests/integration/test_routing.py)."""
    from routing.route_state import RouteStats
    from routing.route_table import parse_route_table
    routes = SimpleNamespace(table=parse_route_table(BUS_TABLE), stats=RouteStats())
    shadow = SimpleNamespace(pending=SimpleNamespace(qsize=lambda: 0))
    return worker_factory(StoreAgent, store=store, stock=stock, routes=routes, shadow=shadow)


def request(path="/erp/sales", body=None, data=None, content_type="application/json", method="POST",
            headers=None):
    if data is None and body is not None:
        data = json.dumps(body)
    return EnvironBuilder(method=method, path=path, data=data, content_type=content_type,
                          headers=headers).get_request()


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
    assert response.headers["Content-Type"] == CONTENT_TYPE_LATEST  # charset named once
    assert b'retailbus_agent_accept_seconds_count{route="sales"}' in response.get_data()


def test_body_that_is_not_utf8_is_400(service, outbox):
    status, body = answer(service.post_sale(request(data=b'{"STORE": "S\xff01"}')))
    assert status == 400
    assert outbox.unsent(10) == []


def test_lines_not_a_list_is_400(service, outbox):
    status, body = answer(service.post_sale(request(body={**legacy_sale(), "LINES": 5})))
    assert status == 400 and "LINES" in body["MESSAGE"]


def test_same_txn_id_with_other_content_is_409_and_no_row(service, outbox):
    _, first = answer(service.post_sale(request(body=legacy_sale())))
    other = legacy_sale(lines=[{"SKU": "100002", "QTY": 1, "PRICE": 500, "LINE": 500}])
    status, body = answer(service.post_sale(request(body=other)))
    assert status == 409 and "TXN_ID" in body["MESSAGE"] and first["REF"] in body["MESSAGE"]
    assert len(outbox.unsent(10)) == 1


def signed(keys, body, terminal="07", path="/erp/sales", method="POST", **kw):
    data = json.dumps(body).encode() if body is not None else b""
    return request(path, data=data if method == "POST" else None, method=method,
                   headers=signed_headers(terminal, keys[terminal], method, path, data, **kw))


@pytest.mark.parametrize("auth_required", [True])
class TestTerminalAuth:
    def test_signed_sale_is_accepted(self, service, outbox, keys):
        status, _ = answer(service.post_sale(signed(keys, legacy_sale())))
        assert status == 200 and len(outbox.unsent(10)) == 1

    def test_unsigned_is_401(self, service, outbox):
        status, body = answer(service.post_sale(request(body=legacy_sale())))
        assert status == 401 and "missing X-Retailbus-Terminal" in body["MESSAGE"]
        assert outbox.unsent(10) == []

    def test_forged_signature_is_401(self, service, outbox, keys):
        req = signed(keys, legacy_sale())
        body = legacy_sale()
        body["TOTAL"] += 1  # tampered after signing
        forged = request(data=json.dumps(body), headers=dict(req.headers))
        status, answer_ = answer(service.post_sale(forged))
        assert status == 401 and "Signature" in answer_["MESSAGE"]
        wrong_key = {"07": b"k" * 32}
        status, _ = answer(service.post_sale(signed(wrong_key, legacy_sale())))
        assert status == 401
        assert outbox.unsent(10) == []

    def test_stale_and_future_timestamps_are_401(self, service, outbox, keys):
        for skew in (-301, 301):
            req = signed(keys, legacy_sale(), timestamp=time.time() + skew)
            status, body = answer(service.post_sale(req))
            assert status == 401 and "window" in body["MESSAGE"]
        assert outbox.unsent(10) == []

    def test_replayed_nonce_is_401(self, service, outbox, keys):
        req = signed(keys, legacy_sale())
        assert service.post_sale(req).status_code == 200
        replay = request(data=json.dumps(legacy_sale("S001-07-000002")), headers=dict(req.headers))
        assert answer(service.post_sale(replay))[0] == 401
        assert len(outbox.unsent(10)) == 1

    def test_unknown_terminal_is_401_and_other_terminals_payload_403(self, service, outbox, keys):
        status, body = answer(service.post_sale(signed({"99": b"x" * 32}, legacy_sale(), terminal="99")))
        assert status == 401 and "unknown terminal" in body["MESSAGE"]
        status, body = answer(service.post_sale(signed(keys, legacy_sale(), terminal="08")))
        assert status == 403 and "TERMINAL" in body["MESSAGE"]
        assert outbox.unsent(10) == []

    def test_signature_for_a_stock_query_cannot_post_a_sale(self, service, outbox, keys):
        q = signed(keys, None, path="/erp/stock?STORE=S001&SKU=100001", method="GET")
        status, _ = answer(service.post_sale(request(data=json.dumps(legacy_sale()), headers=dict(q.headers))))
        assert status == 401 and outbox.unsent(10) == []

    def test_oversized_is_413_before_auth(self, service, outbox):
        data = json.dumps({**legacy_sale(), "PAD": "x" * MAX_BODY})
        assert answer(service.post_sale(request(data=data)))[0] == 413
        assert outbox.unsent(10) == []

    def test_signed_stock_query_and_unsigned_one(self, service, stock, keys):
        stock.erp = {"store_id": "S001", "sku": "100001", "on_hand": 7, "as_of": "2026-11-27T10:00:00+00:00"}
        status, body = answer(service.get_stock(
            signed(keys, None, path="/erp/stock?STORE=S001&SKU=100001", method="GET")))
        assert status == 200 and body["ON_HAND"] == 7
        unsigned = request("/erp/stock?STORE=S001&SKU=100001", method="GET")
        assert answer(service.get_stock(unsigned))[0] == 401


def stock_change(sku, on_hand, at):
    from contracts.erp import ErpStockChangedV1
    return ErpStockChangedV1(store_id="S001", sku=sku, on_hand=on_hand, changed_at=at)


def test_stock_from_the_erp_when_it_answers(service, stock):
    stock.erp = {"store_id": "S001", "sku": "100001", "on_hand": 12, "as_of": "2026-11-27T10:00:00+00:00"}
    status, body = answer(service.get_stock(request("/erp/stock?STORE=S001&SKU=100001", method="GET")))
    assert status == 200
    assert body["STORE"] == "S001" and body["SKU"] == "100001" and body["ON_HAND"] == 12
    assert body["STALE"] is False


def test_stock_from_the_cache_with_its_age_when_the_erp_cannot_answer(service, stock):
    from datetime import datetime, timedelta, timezone
    at = datetime.now(timezone.utc) - timedelta(seconds=90)
    stock.cache.put(stock_change("100001", 40, at))
    stock.cache.put(stock_change("100001", 99, at - timedelta(seconds=10)))  # older: ignored
    stock.erp = TimeoutError("no answer")
    status, body = answer(service.get_stock(request("/erp/stock?STORE=S001&SKU=100001", method="GET")))
    assert status == 200 and body["ON_HAND"] == 40 and body["STALE"] is True
    assert 89 <= body["AGE_SECONDS"] < 120 and body["AS_OF"].startswith(at.isoformat()[:19])
    status, body = answer(service.get_stock(request("/erp/stock?STORE=S001&SKU=999", method="GET")))
    assert status == 503 and "S001/999" in body["MESSAGE"]


def test_stock_query_errors_name_the_field(service, stock):
    stock.erp = None
    assert answer(service.get_stock(request("/erp/stock?STORE=S001&SKU=1", method="GET")))[0] == 404
    status, body = answer(service.get_stock(request("/erp/stock?STORE=S001", method="GET")))
    assert status == 400 and body["MESSAGE"].startswith("SKU")
    status, body = answer(service.get_stock(request("/erp/stock?STORE=S002&SKU=1", method="GET")))
    assert status == 400 and body["MESSAGE"].startswith("STORE")


def test_healthz_reports_breaker_and_confirm_time(service, store):
    store.forwarder.last_confirm = 1_800_000_000.0
    _, body = answer(service.healthz(request("/healthz", method="GET")))
    assert body["breaker_state"] == "closed" and body["route_table_version"] == 1
    assert body["last_confirm_time"].startswith("2027-01-15T08:00:00")
    assert body["oldest_unsent_seconds"] == 0.0


def test_metrics_exposes_outbox_gauges(service):
    service.post_sale(request(body=legacy_sale()))
    text = service.metrics(request("/metrics", method="GET")).get_data()
    assert b'retailbus_outbox_depth{store="S001"} 1.0' in text
    assert b'retailbus_outbox_oldest_unsent_seconds{store="S001"}' in text


# -- legacy-mode bookkeeping runs after the answer, batched ------------------------------

def _accepted_txn(path) -> list[str]:
    with sqlite3.connect(path) as db:
        return [row[0] for row in db.execute("SELECT pos_txn_id FROM accepted_txn ORDER BY pos_txn_id")]


def test_notes_made_later_share_one_outbox_commit(tmp_path):
    store = agent_module.StoreOutbox()
    store.outbox, store._later, store.later_delay = Outbox(tmp_path / "outbox.db"), [], 0.05
    try:
        for n in range(3):
            txn = sale_from_legacy(legacy_sale(f"S001-07-00000{n}")).model_dump(mode="json")
            store.later(store.outbox.record_accepted, "pos.sale.v1", txn)
        assert _accepted_txn(tmp_path / "outbox.db") == []  # nothing before the delay
        with eventlet.Timeout(30):  # until the three notes' commits are counted
            while sum(store.outbox.group_sizes) < 3:
                eventlet.sleep(0.01)
        assert _accepted_txn(tmp_path / "outbox.db") == ["S001-07-000000", "S001-07-000001", "S001-07-000002"]
        assert list(store.outbox.group_sizes) == [3]  # one transaction, one fsync, for the batch
    finally:
        store.outbox.close()


def test_stop_runs_the_notes_still_waiting(tmp_path):
    store = agent_module.StoreOutbox()
    store.outbox, store._later, store.later_delay = Outbox(tmp_path / "outbox.db"), [], 60
    txn = sale_from_legacy(legacy_sale("S001-07-000009")).model_dump(mode="json")
    store.later(store.outbox.record_accepted, "pos.sale.v1", txn)
    store.stop()
    assert _accepted_txn(tmp_path / "outbox.db") == ["S001-07-000009"]


def test_a_stock_rpc_that_times_out_raises_an_exception_the_cache_answer_catches(monkeypatch):
    """An erp that is down while its durable `rpc-erp` queue stays bound takes the request
    and never answers: the timeout must be an Exception (the handler then answers from the
    cache), not eventlet's Timeout, a BaseException that killed the worker mid-request."""
    from nameko.exceptions import RpcTimeout

    from routing import stock_cache

    class SilentErp:
        def __init__(self, config, timeout=None):
            pass

        def __enter__(self):
            return SimpleNamespace(erp=SimpleNamespace(stock_level=lambda store, sku: eventlet.sleep(30)))

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(stock_cache, "ClusterRpcProxy", SilentErp)
    started = time.monotonic()
    with pytest.raises(RpcTimeout) as raised:
        stock_cache.ask_erp("amqp://unused", "S001", "100001", 0.2)
    assert isinstance(raised.value, Exception) and "0.2" in str(raised.value)
    assert time.monotonic() - started < 15  # its 0.2 s timeout, not the erp's 30 s silence
