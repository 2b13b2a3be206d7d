"""legacy_wrappers/legacy_http.py: the pooled, breaker-guarded client of a legacy HTTP API.

Each test runs a real TCP server (a green thread, as the agent itself runs) whose
misbehaviour is chosen per request, and asserts on what that server received:
the point is to prove that a sale is never posted twice by a retry.
"""
from __future__ import annotations

import json

import eventlet
import pytest

from legacy_wrappers.legacy_http import LegacyHttpClient, LegacyUnavailable
from routing.modes import maybe_written

pytestmark = pytest.mark.unit


class RawErp:
    """A minimal HTTP/1.1 server. `plan` says, per request in arrival order, what to do:
    "ok" (answer, keep the connection), "ok_close" (answer without a Connection header,
    then close: an idle keep-alive connection the ERP dropped), "drop" (read the whole
    request, close without answering), "503"."""

    def __init__(self, plan: list[str]):
        self.plan = list(plan)
        self.requests: list[tuple[str, bytes]] = []
        self.connections = 0
        self.sock = eventlet.listen(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = eventlet.spawn(self._serve)

    def _serve(self):
        while True:
            conn, _ = self.sock.accept()
            self.connections += 1
            eventlet.spawn(self._connection, conn)

    def _connection(self, conn):
        rfile = conn.makefile("rb")
        try:
            while True:
                line = rfile.readline()
                if not line:
                    return
                headers = {}
                while (header := rfile.readline()) not in (b"\r\n", b""):
                    name, _, value = header.decode().partition(":")
                    headers[name.strip().lower()] = value.strip()
                body = rfile.read(int(headers.get("content-length", "0")))
                self.requests.append((line.decode().split()[0], body))
                action = self.plan.pop(0) if self.plan else "ok"
                if action == "drop":
                    return
                status = "503 Service Unavailable" if action == "503" else "200 OK"
                answer = json.dumps({"STATUS": "OK", "N": len(self.requests)}).encode()
                conn.sendall(f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
                             f"Content-Length: {len(answer)}\r\n\r\n".encode() + answer)
                if action == "ok_close":
                    return
        finally:
            rfile.close()
            conn.close()

    def close(self):
        self.server.kill()
        self.sock.close()


@pytest.fixture
def erp():
    servers = []

    def make(plan=()):
        servers.append(RawErp(list(plan)))
        return servers[-1]
    yield make
    for server in servers:
        server.close()


def test_calls_share_one_kept_alive_connection(erp):
    server = erp()
    client = LegacyHttpClient(server.url, timeout=5)
    answers = [client.request("POST", "/erp/sales", b'{"n": %d}' % n) for n in range(5)]
    assert [json.loads(a.body)["N"] for a in answers] == [1, 2, 3, 4, 5]
    assert server.connections == 1


def test_a_pooled_connection_the_erp_closed_is_not_used(erp):
    server = erp(["ok_close", "ok_close", "ok"])
    client = LegacyHttpClient(server.url, timeout=5)
    for n in range(3):
        assert client.request("POST", "/erp/sales", b'{"n": %d}' % n).status == 200
        eventlet.sleep(0.05)  # the server's close reaches the pooled socket
    assert [body for _, body in server.requests] == [b'{"n": 0}', b'{"n": 1}', b'{"n": 2}']
    assert server.connections == 3


def test_a_post_that_went_out_whole_is_never_sent_again(erp):
    server = erp(["ok", "drop"])
    client = LegacyHttpClient(server.url, timeout=5)
    client.request("POST", "/erp/sales", b'{"n": 0}')
    with pytest.raises(LegacyUnavailable) as caught:
        client.request("POST", "/erp/sales", b'{"n": 1}')  # on the pooled connection; the ERP hangs up
    assert [body for _, body in server.requests] == [b'{"n": 0}', b'{"n": 1}']  # not re-sent
    assert maybe_written(caught.value)  # so the agent answers 504 and never queues it


def test_a_query_whose_connection_closed_before_the_answer_is_asked_again(erp):
    server = erp(["ok", "drop", "ok"])
    client = LegacyHttpClient(server.url, timeout=5)
    client.request("GET", "/erp/stock?STORE=S001&SKU=1")
    answer = client.request("GET", "/erp/stock?STORE=S001&SKU=1")
    assert answer.status == 200 and json.loads(answer.body)["N"] == 3
    assert [method for method, _ in server.requests] == ["GET", "GET", "GET"]


def test_5xx_opens_the_breaker_and_then_the_erp_is_not_called(erp):
    server = erp(["503", "503"])
    client = LegacyHttpClient(server.url, timeout=5, fail_max=2, reset_timeout=60)
    with pytest.raises(LegacyUnavailable, match="503"):
        client.request("POST", "/erp/sales", b"{}")
    with pytest.raises(LegacyUnavailable):  # the second failure trips it
        client.request("POST", "/erp/sales", b"{}")
    with pytest.raises(LegacyUnavailable, match="circuit breaker open"):
        client.request("POST", "/erp/sales", b"{}")
    assert len(server.requests) == 2 and client.state == "open"


def test_erp_down_is_unavailable_and_not_maybe_written(erp):
    server = erp()
    url = server.url
    server.close()
    with pytest.raises(LegacyUnavailable) as caught:
        LegacyHttpClient(url, timeout=5).request("POST", "/erp/sales", b"{}")
    assert not maybe_written(caught.value)  # refused: safe to queue (on_legacy_failure: queue)
