"""Signed calls at the store agent (worker_factory, a real outbox file, a real HTTP
server as the legacy ERP): a byte-identical retry gets the first answer, legacy and
shadow calls are held to the signer's store and terminal, shadow mismatches are
read with the ops key only."""
from __future__ import annotations

import json
import time
from types import SimpleNamespace

import eventlet
from eventlet.event import Event
import pytest
from nameko.testing.services import worker_factory

from bus.settings import AgentSettings
from legacy_wrappers.legacy_http import LegacyHttpClient
from routing.answers import AnswerCache
from routing.edge_auth import TerminalKeys, Verifier, signed_headers
from routing.outbox import Outbox, OutboxUnavailable
from routing.route_state import RouteStats
from routing.route_table import parse_route_table
from routing.shadow import MismatchLog
from routing.store_agent import OPS_TERMINAL, StoreAgent
from tests.unit.test_legacy_http import RawErp
from tests.unit.test_store_agent import FakeForwarder, answer, legacy_sale, request

pytestmark = pytest.mark.unit

TABLE = """version: 1
legacy: {{base_url: "{url}"}}
routes:
  - {{name: sales, message: pos.sale.v1, legacy: POST /erp/sales, mode: {mode}}}
  - {{name: returns, message: pos.return.v1, legacy: POST /erp/returns, mode: bus}}
"""


@pytest.fixture
def erp():
    server = RawErp([])
    yield server
    server.close()


@pytest.fixture
def estate(tmp_path, erp):
    """(the agent's worker, its outbox, the terminal keys, the mismatch log); sales in bus mode."""
    keys = TerminalKeys(tmp_path / "terminal_keys.json")
    hex_keys = {t: bytes.fromhex(keys.add(t)) for t in ("07", OPS_TERMINAL)}
    outbox = Outbox(tmp_path / "outbox.db")
    store = SimpleNamespace(store_id="S001", outbox=outbox, forwarder=FakeForwarder(),
                            config=AgentSettings(auth_required=True), verifier=Verifier(keys),
                            answers=AnswerCache(300), later=lambda fn, *args: None)
    routes = SimpleNamespace(table=parse_route_table(TABLE.format(url=erp.url, mode="bus")), stats=RouteStats())
    mismatches = MismatchLog(tmp_path / "mismatches.jsonl")
    shadow = SimpleNamespace(pending=SimpleNamespace(qsize=lambda: 0), mismatches=mismatches,
                             submit_posting=lambda *args: None)
    worker = worker_factory(StoreAgent, store=store, routes=routes, shadow=shadow,
                            legacy=lambda base_url, timeout: LegacyHttpClient(base_url, timeout))
    yield SimpleNamespace(agent=worker, outbox=outbox, keys=hex_keys, routes=routes, erp=erp, store=store,
                          mismatches=mismatches)
    outbox.close()


def signed(keys: dict, body: dict | None, terminal="07", path="/erp/sales", method="POST", **kw):
    data = json.dumps(body).encode() if body is not None else b""
    headers = signed_headers(terminal, keys[terminal], method, path, data, **kw)
    return lambda: request(path, data=data if method == "POST" else None, method=method, headers=headers)


def legacy_mode(estate, mode: str = "legacy"):
    estate.routes.table = parse_route_table(TABLE.format(url=estate.erp.url, mode=mode))


# --- a byte-identical retry -----------------------------------------------------------------

def test_a_byte_identical_retry_gets_the_first_answer_not_401(estate):
    same = signed(estate.keys, legacy_sale())
    first = answer(estate.agent.post_sale(same()))
    retry = answer(estate.agent.post_sale(same()))
    assert first[0] == 200 and retry == first
    assert len(estate.outbox.unsent(10)) == 1
    tampered = same()
    other = request(data=json.dumps(legacy_sale("S001-07-000002")), headers=dict(tampered.headers))
    assert answer(estate.agent.post_sale(other))[0] == 401  # same nonce, other body: a replay


def test_a_retry_of_a_refused_call_gets_the_same_refusal(estate):
    estate.agent.post_sale(signed(estate.keys, legacy_sale())())
    changed = legacy_sale()
    changed["TOTAL"] += 1
    changed["TENDERS"][0]["AMOUNT"] += 1
    changed["LINES"].append({"SKU": "100009", "QTY": 1, "PRICE": 1, "LINE": 1})
    same = signed(estate.keys, changed)
    first = answer(estate.agent.post_sale(same()))
    assert first[0] == 409
    assert answer(estate.agent.post_sale(same())) == first


def test_a_retry_while_the_first_is_in_flight_waits_for_its_answer(estate, monkeypatch):
    real_accept = estate.outbox.accept
    inside, release = Event(), Event()

    def slow_accept(event, also=None):
        inside.send()
        release.wait()
        return real_accept(event, also)
    monkeypatch.setattr(estate.outbox, "accept", slow_accept)
    same = signed(estate.keys, legacy_sale())
    first = eventlet.spawn(lambda: answer(estate.agent.post_sale(same())))
    inside.wait()  # the first is inside the outbox commit
    eventlet.spawn_after(0.2, release.send)  # the commit finishes while the retry waits
    retry = answer(estate.agent.post_sale(same()))
    assert retry == first.wait() and retry[0] == 200
    assert len(estate.outbox.unsent(10)) == 1


def test_a_retry_after_a_5xx_is_handled_again(estate, monkeypatch):
    real_accept = estate.outbox.accept
    failing = [True]

    def accept(event, also=None):
        if failing.pop() if failing else False:
            raise OutboxUnavailable("disk full")
        return real_accept(event, also)
    monkeypatch.setattr(estate.outbox, "accept", accept)
    same = signed(estate.keys, legacy_sale())
    assert answer(estate.agent.post_sale(same()))[0] == 503
    status, body = answer(estate.agent.post_sale(same()))
    assert status == 200 and body["DUPLICATE"] is False
    assert len(estate.outbox.unsent(10)) == 1


def test_a_retry_outside_the_signature_window_is_401(estate):
    same = signed(estate.keys, legacy_sale(), timestamp=time.time() - 299)
    assert answer(estate.agent.post_sale(same()))[0] == 200
    estate.store.answers.window = estate.store.verifier.window = 200  # the window has passed since
    assert answer(estate.agent.post_sale(same()))[0] == 401


def test_a_cloudevent_retried_byte_for_byte_gets_its_202(estate):
    from tests.unit.test_agent_payload_rules import cloudevent_sale
    envelope = cloudevent_sale()
    data = json.dumps(envelope).encode()
    headers = {**signed_headers("07", estate.keys["07"], "POST", "/v1/events", data),
               "Content-Type": "application/cloudevents+json"}

    def post():
        return answer(estate.agent.post_event(request("/v1/events", data=data, headers=headers,
                                                      content_type="application/cloudevents+json")))
    first = post()
    assert first[0] == 202 and post() == first


# --- legacy and shadow calls are held to the signer's store ---------------------------------

@pytest.mark.parametrize("mode", ["legacy", "shadow"])
def test_a_legacy_call_for_another_store_is_refused_and_never_reaches_the_erp(estate, mode):
    legacy_mode(estate, mode)
    status, body = answer(estate.agent.post_sale(signed(estate.keys, legacy_sale(store="S002"))()))
    assert status == 400 and body["MESSAGE"].startswith("STORE:") and "S002" in body["MESSAGE"]
    other_till = {**legacy_sale(), "TERMINAL": "08"}
    status, body = answer(estate.agent.post_sale(signed(estate.keys, other_till)()))
    assert status == 403 and body["MESSAGE"].startswith("TERMINAL:")
    assert estate.erp.requests == []
    status, _ = answer(estate.agent.post_sale(signed(estate.keys, legacy_sale())()))
    assert status == 200 and len(estate.erp.requests) == 1  # its own store's sale goes through


# --- shadow mismatches are for ops -----------------------------------------------------------

def test_shadow_mismatches_are_read_with_the_ops_key_only(estate):
    estate.mismatches.add({"time": "2026-11-27T10:15:00", "route": "sales", "ref": "S001-07-000001",
                           "diffs": [{"field": "header[1].LOYALTY_CARD", "bus": "LC0001", "legacy": "LC0001X"}]})
    path = "/routes/mismatches?route=sales"
    unsigned = answer(estate.agent.mismatches(request(path, method="GET")))
    assert unsigned[0] == 401 and "LC0001" not in json.dumps(unsigned[1])
    till = answer(estate.agent.mismatches(signed(estate.keys, None, path=path, method="GET")()))
    assert till[0] == 403 and "LC0001" not in json.dumps(till[1])
    status, body = answer(estate.agent.mismatches(signed(estate.keys, None, terminal=OPS_TERMINAL,
                                                         path=path, method="GET")()))
    assert status == 200 and body["mismatches"][0]["diffs"][0]["bus"] == "LC0001"
