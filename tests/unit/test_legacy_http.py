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
    request, close without answering), "500", "502", "503", "504" (that status),
    "ok_overlong" (answer, then bytes beyond its Content-Length)."""

    def __init__(self, plan: list[str]):
        self.plan = list(plan)
        self.requests: list[tuple[str, bytes]] = []
        self.connections = 0
        self.closed = 0  # connections this server has closed
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
                status = {"500": "500 Internal Server Error", "502": "502 Bad Gateway", "503": "503 Service Unavailable",
                          "504": "504 Gateway Timeout"}.get(action, "200 OK")
                answer = json.dumps({"STATUS": "OK", "N": len(self.requests)}).encode()
                extra = b'{"STATUS": "OK", "N": 999}' if action == "ok_overlong" else b""
                conn.sendall(f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
                             f"Content-Length: {len(answer)}\r\n\r\n".encode() + answer + extra)
                if action == "ok_close":
                    return
        finally:
            rfile.close()
            conn.close()
            self.closed += 1

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
        if n < 2:  # "ok_close": once the server has closed it, the pooled socket is at its end
            with eventlet.Timeout(30):
                while server.closed <= n:
                    eventlet.sleep(0.01)
    assert [body for _, body in server.requests] == [b'{"n": 0}', b'{"n": 1}', b'{"n": 2}']
    assert server.connections == 3


def test_bytes_beyond_an_answers_length_are_never_read_as_the_next_answer(erp):
    server = erp(["ok_overlong", "ok"])
    client = LegacyHttpClient(server.url, timeout=5)
    first = client.request("POST", "/erp/sales", b'{"n": 1}')
    second = client.request("POST", "/erp/sales", b'{"n": 2}')
    assert [json.loads(r.body)["N"] for r in (first, second)] == [1, 2]
    assert server.connections == 2  # the connection with junk after its answer was not reused


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


@pytest.mark.parametrize("status", ["500", "502", "504"])
def test_a_5xx_that_may_come_after_the_erp_booked_the_sale_is_maybe_written(erp, status):
    """A 500 at commit time, or a gateway's 502/504 in front of the ERP, can follow a
    booked sale: queueing it (on_legacy_failure: queue) would post it twice."""
    server = erp([status])
    client = LegacyHttpClient(server.url, timeout=5, fail_max=1)  # this very answer trips the breaker
    with pytest.raises(LegacyUnavailable, match=status) as caught:
        client.request("POST", "/erp/sales", b"{}")
    assert maybe_written(caught.value) and len(server.requests) == 1 and client.state == "open"


def test_only_a_503_answer_or_an_open_breaker_say_nothing_was_posted(erp):
    server = erp(["503"])
    client = LegacyHttpClient(server.url, timeout=5, fail_max=1, reset_timeout=60)
    with pytest.raises(LegacyUnavailable, match="503") as answered:
        client.request("POST", "/erp/sales", b"{}")
    with pytest.raises(LegacyUnavailable, match="circuit breaker open") as open_breaker:
        client.request("POST", "/erp/sales", b"{}")
    assert not maybe_written(answered.value) and not maybe_written(open_breaker.value)
    assert len(server.requests) == 1


def one_shot_erp(answer: bytes) -> tuple[str, list]:
    """A server that reads one request (head and Content-Length body), records it raw,
    writes `answer` and closes."""
    sock = eventlet.listen(("127.0.0.1", 0))
    seen: list[bytes] = []

    def serve():
        conn, _ = sock.accept()
        rfile = conn.makefile("rb")
        head = b""
        while (line := rfile.readline()) not in (b"\r\n", b""):
            head += line
        length = next((int(h.split(b":")[1]) for h in head.split(b"\r\n")
                       if h.lower().startswith(b"content-length")), 0)
        seen.append(head + b"\r\n" + rfile.read(length))
        conn.sendall(answer)
        rfile.close()
        conn.close()
        sock.close()
    eventlet.spawn(serve)
    return f"http://127.0.0.1:{sock.getsockname()[1]}/base", seen


@pytest.mark.parametrize("answer, body", [
    (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"4\r\n{\"a\"\r\n3;x=y\r\n: 1\r\n1\r\n}\r\n0\r\nX-Trailer: t\r\n\r\n", b'{"a": 1}'),
    (b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n{\"a\": 1}", b'{"a": 1}'),  # ends at the close
    (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Type: application/json\r\n"
     b"Content-Length: 8\r\nConnection: close\r\n\r\n{\"a\": 1}", b'{"a": 1}'),
])
def test_answers_are_read_by_chunks_by_close_and_after_1xx(answer, body):
    url, seen = one_shot_erp(answer)
    response = LegacyHttpClient(url, timeout=5).request("POST", "/erp/sales", b'{"n": 1}')
    assert response.body == body and response.content_type == "application/json"
    host = url.split("//")[1].split("/")[0]
    assert seen == [f"POST /base/erp/sales HTTP/1.1\r\nHost: {host}\r\nAccept-Encoding: identity\r\n"
                    f"Content-Type: application/json\r\nContent-Length: 8\r\n\r\n".encode() + b'{"n": 1}']


def test_an_answer_cut_short_is_unavailable_and_maybe_written():
    url, _ = one_shot_erp(b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n{\"a\"")
    with pytest.raises(LegacyUnavailable) as caught:
        LegacyHttpClient(url, timeout=5).request("POST", "/erp/sales", b"{}")
    assert "IncompleteRead" in repr(caught.value.__cause__)
    assert maybe_written(caught.value)  # the ERP had the whole sale: answered 504, never queued
