"""The store agent's POS edge, against a real agent process (issue 17, findings 2 and 3):
what a hostile or broken client sends is refused with a 4xx and never reaches the legacy
ERP, and one till's bad request fails only that request, not the other tills' sales
committed with it."""
from __future__ import annotations

import json
import sqlite3
import time

import eventlet
import pytest

from contracts.envelope import CloudEvent
from contracts.pos import idempotency_key
from routing.edge_auth import signed_headers
from routing.legacy_payload import sale_from_legacy
from tests.integration.edge_support import Agent, RecordingErp, body_of, status_of
from tests.integration.support import legacy_sale

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


@pytest.fixture(scope="module")
def erp():
    recorder = RecordingErp()
    yield recorder
    recorder.close()


@pytest.fixture(scope="module")
def agent(tmp_path_factory, amqp_uri, erp):
    """Every route in legacy mode, forwarding to the recording ERP."""
    running = Agent(tmp_path_factory.mktemp("edge"), amqp_uri, mode="legacy", legacy_port=erp.port)
    yield running
    running.stop()


def test_a_bare_cr_in_the_target_is_400_and_never_reaches_the_legacy_erp(agent, erp):
    erp.requests.clear()
    injected = agent.signed("GET", "/erp/stock?STORE=S001&SKU=100001\rX-Injected:%201")
    raw = agent.exchange(injected)
    assert status_of(raw) == 400 and "bare CR in the request line" in body_of(raw)["MESSAGE"]
    for target in ("/erp/stock?STORE=S001&SKU=1\x00", "/erp/stock?STORE=S001&SKU=\xe9"):
        assert status_of(agent.exchange(agent.signed("GET", target))) == 400
    assert erp.requests == []
    raw = agent.exchange(agent.signed("GET", "/erp/stock?STORE=S001&SKU=100001"))  # the control: forwarded
    assert status_of(raw) == 200 and len(erp.requests) == 1
    assert erp.requests[0].startswith(b"GET /erp/stock?STORE=S001&SKU=100001 HTTP/1.1\r\n")


@pytest.mark.parametrize("framing", [
    b"Transfer-Encoding: chunked\r\n\r\n-1\r\n",
    b"Transfer-Encoding: chunked\r\n\r\n0x5\r\nhello\r\n0\r\n\r\n",
    b"Content-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
])
def test_smuggling_framings_are_400_and_never_reach_the_legacy_erp(agent, erp, framing):
    erp.requests.clear()
    raw = agent.exchange(b"POST /erp/sales HTTP/1.1\r\nHost: agent\r\nContent-Type: application/json\r\n"
                         + framing, half_close=False)
    assert status_of(raw) == 400 and b"Connection: close" in raw
    assert erp.requests == []


def test_a_body_over_max_body_is_413_on_its_headers_alone(agent, erp):
    """The agent does not wait for (or buffer) 16 MiB before its own 256 KiB limit."""
    erp.requests.clear()
    raw = agent.exchange(b"POST /erp/sales HTTP/1.1\r\nHost: agent\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 16777216\r\n\r\n{", half_close=False)
    assert status_of(raw) == 413 and body_of(raw)["MESSAGE"] == "body larger than 262144 bytes"
    assert erp.requests == []


@pytest.mark.parametrize("header, value", [
    ("X-Retailbus-Timestamp", b"\xb2"),  # '\u00b2' as the agent reads it (latin-1)
    ("X-Retailbus-Signature", b"\xe9" * 64),
    ("X-Retailbus-Terminal", b"\xe9"),
])
def test_non_ascii_auth_headers_are_401_not_500(agent, erp, header, value):
    erp.requests.clear()
    body = json.dumps(legacy_sale("S001-07-AUTH1")).encode()
    headers = {**signed_headers("07", agent.key, "POST", "/erp/sales", body)}
    headers.pop(header)
    head = (f"POST /erp/sales HTTP/1.1\r\nHost: agent\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n"
            + "".join(f"{name}: {v}\r\n" for name, v in headers.items())).encode()
    raw = agent.exchange(head + header.encode() + b": " + value + b"\r\n\r\n" + body)
    assert status_of(raw) == 401 and header in body_of(raw)["MESSAGE"]
    assert erp.requests == []


def cloudevent_sale(txn_id: str, event_id: str | None = None) -> bytes:
    sale = sale_from_legacy(legacy_sale(txn_id))
    return CloudEvent.new("pos.sale.v1", "store/S001/pos/07", sale, subject=sale.pos_txn_id,
                          idempotencykey=idempotency_key(sale), id=event_id).to_json()


def test_a_reused_cloudevent_id_fails_only_its_own_request(agent):
    """Rounds of sales from the tills sent at once, each with one event reusing the id of an
    accepted one: before, its IntegrityError rolled back the whole group commit and the
    innocent sales committed with it were answered 503."""
    first = cloudevent_sale("S001-07-REUSED0")
    taken = json.loads(first)["id"]
    assert status_of(agent.exchange(agent.signed("POST", "/v1/events", first, "application/cloudevents+json"))) == 202
    pool = eventlet.GreenPool(16)
    answers: dict[str, list[tuple[int, dict]]] = {"innocent": [], "reused": []}

    def send(kind: str, body: bytes):
        raw = agent.exchange(agent.signed("POST", "/v1/events", body, "application/cloudevents+json"))
        answers[kind].append((status_of(raw), body_of(raw)))

    innocent_keys = []
    for round_ in range(10):
        batch = [("reused", cloudevent_sale(f"S001-07-REUSED{round_ + 1}", event_id=taken))]
        for n in range(5):
            txn_id = f"S001-07-INNOCENT{round_}-{n}"
            batch.append(("innocent", cloudevent_sale(txn_id)))
            innocent_keys.append(f"pos.sale.v1:S001:{txn_id}")
        for kind, body in batch:
            pool.spawn(send, kind, body)
        pool.waitall()
    assert [status for status, _ in answers["innocent"]] == [202] * 50, answers["innocent"]
    assert all(status == 409 and f"id: {taken}" in body["MESSAGE"] for status, body in answers["reused"]), \
        answers["reused"]
    with sqlite3.connect(f"file:{agent.outbox}?mode=ro", uri=True) as db:
        keys = {key for (key,) in db.execute("SELECT idem_key FROM outbox")}
        assert db.execute("SELECT count(*) FROM outbox WHERE event_id = ?", (taken,)).fetchone()[0] == 1
    assert set(innocent_keys) <= keys and not any("REUSED1" in key or "REUSED9" in key for key in keys)


def test_the_agent_still_serves_after_all_of_it(agent, erp):
    started = time.monotonic()
    raw = agent.exchange(agent.sale("S001-07-AFTER1"))
    assert status_of(raw) == 200 and body_of(raw)["STATUS"] == "OK"
    assert time.monotonic() - started < 30 and agent.process.poll() is None
