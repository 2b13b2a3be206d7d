"""routing/pos_http.py and routing/http11.py: the store agent's HTTP entrypoint.

A real nameko container serving a tiny service on a real socket; the client
side is a raw socket (so the bytes on the wire are what is asserted) or
`http.client` (what tills use).
"""
from __future__ import annotations

import http.client
import json
import select
import socket
import time

import pytest
from nameko.containers import ServiceContainer
from werkzeug.wrappers import Response

from routing.pos_http import pos_http
from tests.conftest import free_port

pytestmark = pytest.mark.unit


class Echo:
    name = "echo"
    seen: list = []

    @pos_http("POST", "/echo")
    def echo(self, request):
        self.seen.append((request.content_length, request.headers.get("Transfer-Encoding")))
        return Response(request.get_data(), mimetype=request.mimetype)

    @pos_http("GET", "/hello")
    def hello(self, request):
        return Response(json.dumps({"args": request.args.to_dict()}), mimetype="application/json")

    @pos_http("GET", "/boom")
    def boom(self, request):
        raise ValueError("broken on purpose")

    @pos_http("POST", "/refuse")
    def refuse(self, request):
        """Answers from Content-Length alone, never reading the body (the agent's 413)."""
        return Response(json.dumps({"length": request.content_length}), status=413, mimetype="application/json")


LIMITS = {"max_body": 1024, "header_timeout": 0.5, "body_timeout": 0.5, "idle_timeout": 1.0,
          "max_connections": 4}


@pytest.fixture
def server():
    port = free_port()
    container = ServiceContainer(Echo, {"WEB_SERVER_ADDRESS": f"127.0.0.1:{port}",
                                        "RETAILBUS": {"agent": LIMITS}})
    container.start()
    Echo.seen.clear()
    yield port
    container.stop()


def exchange(port: int, data: bytes, half_close: bool = False) -> bytes:
    """Send raw bytes, read until the server closes the connection (a socket timeout
    fails the test: the server neither answered nor closed). `half_close` tells the
    server nothing more will come."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        return read_all(sock)


def read_all(sock) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def test_requests_share_a_kept_alive_connection(server):
    conn = http.client.HTTPConnection("127.0.0.1", server, timeout=5)
    bodies = []
    for n in range(3):
        conn.request("POST", "/echo", body=b'{"n": %d}' % n, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 200 and response.getheader("Content-Type") == "application/json"
        bodies.append(response.read())
        if n == 0:
            first_socket = conn.sock
    assert bodies == [b'{"n": 0}', b'{"n": 1}', b'{"n": 2}']
    assert conn.sock is first_socket  # never reconnected
    conn.close()


def test_query_string_and_head(server):
    conn = http.client.HTTPConnection("127.0.0.1", server, timeout=5)
    conn.request("GET", "/hello?SKU=1%202&STORE=S001")
    response = conn.getresponse()
    assert json.loads(response.read()) == {"args": {"SKU": "1 2", "STORE": "S001"}}
    conn.request("HEAD", "/hello")
    response = conn.getresponse()
    assert response.status == 200 and int(response.getheader("Content-Length")) > 0
    assert response.read() == b""
    conn.close()


def test_a_chunked_body_after_100_continue_reaches_the_handler_whole(server):
    raw = exchange(server, b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Type: text/plain\r\n"
                           b"Transfer-Encoding: chunked\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n"
                           b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n")
    assert raw.endswith(b"\r\n\r\nhello world") and b"Connection: close" in raw
    assert Echo.seen == [(11, None)]  # de-chunked: a body of known length


def test_unknown_path_and_method_are_answered_in_the_agent_error_shape(server):
    conn = http.client.HTTPConnection("127.0.0.1", server, timeout=5)
    conn.request("GET", "/nope")
    response = conn.getresponse()
    assert response.status == 404
    assert json.loads(response.read()) == {"STATUS": "ERROR", "MESSAGE": "no such path: /nope"}
    conn.request("DELETE", "/hello")
    response = conn.getresponse()
    assert response.status == 405 and response.getheader("Allow") == "GET"
    assert json.loads(response.read())["STATUS"] == "ERROR"
    conn.close()


def test_a_failing_method_gets_500_and_the_connection_keeps_serving(server):
    conn = http.client.HTTPConnection("127.0.0.1", server, timeout=5)
    conn.request("GET", "/boom")
    response = conn.getresponse()
    assert response.status == 500
    assert "ValueError" in json.loads(response.read())["MESSAGE"]
    conn.request("GET", "/hello")
    assert conn.getresponse().status == 200
    conn.close()


@pytest.mark.parametrize("request_bytes, status", [
    (b"NONSENSE\r\n\r\n", 400),
    (b"GET /hello HTTP/1.1\r\nno colon here\r\n\r\n", 400),
    (b"GET /hello HTTP/1.1\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n", 431),
    (b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
    (b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: two\r\n\r\n", 400),
])
def test_unreadable_requests_are_refused_and_the_connection_closed(server, request_bytes, status):
    raw = exchange(server, request_bytes)
    assert raw.startswith(f"HTTP/1.1 {status} ".encode())
    assert b"Connection: close" in raw and json.loads(raw.split(b"\r\n\r\n", 1)[1])["STATUS"] == "ERROR"


def test_http10_closes_unless_asked_to_keep_alive(server):
    raw = exchange(server, b"GET /hello HTTP/1.0\r\n\r\n")  # returns only because the server closes
    assert raw.startswith(b"HTTP/1.1 200 OK\r\n") and b"Connection: close" in raw
    with socket.create_connection(("127.0.0.1", server), timeout=5) as sock:
        sock.sendall(b"GET /hello HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        first = sock.recv(65536)
        assert b"Connection: keep-alive" in first
        sock.sendall(b"GET /hello HTTP/1.0\r\n\r\n")  # the same connection still serves
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 OK\r\n")


def status_of(raw: bytes) -> int:
    assert raw.startswith(b"HTTP/1.1 "), raw[:100]
    return int(raw[9:12])


@pytest.mark.parametrize("size_line", [b"-1", b"0x5", b"+5", b"0_5"])
def test_a_chunk_size_other_than_hex_digits_is_400_at_once(server, size_line):
    """`-1` used to read until the client hung up, past every limit; the others were read as sizes."""
    raw = exchange(server, b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                           + size_line + b"\r\nhello\r\n0\r\n\r\n")
    assert status_of(raw) == 400 and b"chunk size" in raw and b"Connection: close" in raw
    assert Echo.seen == []


def test_content_length_with_an_underscore_does_not_frame_the_body(server):
    raw = exchange(server, b"POST /echo HTTP/1.1\r\nHost: x\r\nContent_Length: 5\r\n\r\nhello", half_close=True)
    assert raw.startswith(b"HTTP/1.1 200 ") and b"Content-Length: 0\r\n" in raw
    assert Echo.seen == [(None, None)]  # "hello" was the next request, refused
    assert raw.count(b"HTTP/1.1 ") == 2 and b"HTTP/1.1 400 " in raw


def test_a_bare_cr_in_the_target_is_400_and_reaches_no_handler(server):
    raw = exchange(server, b"GET /hello?SKU=1\rX-Injected:%201 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status_of(raw) == 400 and b"Connection: close" in raw


def test_a_body_over_max_body_is_413_before_it_is_sent(server):
    """The 413 comes on the headers alone: the server neither waits for nor buffers the body."""
    with socket.create_connection(("127.0.0.1", server), timeout=10) as sock:
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 16777216\r\n\r\n" + b"x" * 1000)
        raw = read_all(sock)
    assert status_of(raw) == 413 and b"body larger than 1024 bytes" in raw and Echo.seen == []


def test_a_chunked_body_over_max_body_is_413_while_it_is_read(server):
    """Chunks keep coming; the server stops at max_body and answers."""
    with socket.create_connection(("127.0.0.1", server), timeout=10) as sock:
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(5):
            sock.sendall(b"100\r\n" + b"x" * 256 + b"\r\n")
        raw = read_all(sock)
    assert status_of(raw) == 413 and Echo.seen == []


@pytest.mark.parametrize("partial, status", [
    (b"GET /hello HTTP/1.1\r\nHost: x\r\n", 408),  # the head never ends
    (b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nhel", 408),  # nor the body
])
def test_a_request_not_finished_in_time_is_408_and_closed(server, partial, status):
    with socket.create_connection(("127.0.0.1", server), timeout=10) as sock:
        sock.sendall(partial)
        raw = read_all(sock)
    assert status_of(raw) == status and b"Connection: close" in raw and Echo.seen == []


def test_a_client_trickling_its_head_byte_by_byte_still_meets_the_header_timeout(server):
    """A per-read socket timeout would be reset by every byte; the head has one deadline."""
    with socket.create_connection(("127.0.0.1", server), timeout=10) as sock:
        deadline = time.monotonic() + 10
        for byte in b"GET /hello HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 1000:
            if select.select([sock], [], [], 0.05)[0] or time.monotonic() > deadline:
                break  # answered (the pause paces the attack, it synchronises nothing)
            sock.sendall(bytes([byte]))
        raw = read_all(sock)
    assert status_of(raw) == 408


def test_a_client_that_does_not_read_its_answers_is_dropped(server):
    """Pipelined requests whose answers are never read fill the socket buffers; the server's
    send then waits body_timeout at most and closes, and the client sees the reset."""
    request = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n" + b"x" * 1000
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # small, so the answers back up soon
    sock.connect(("127.0.0.1", server))
    sock.settimeout(1.0)
    deadline, dropped = time.monotonic() + 30, None
    try:
        while dropped is None and time.monotonic() < deadline:
            try:
                sock.sendall(request)
            except socket.timeout:
                continue  # our own send is stuck too: keep pushing until the server gives up
            except OSError as exc:  # EPIPE or ECONNRESET: the server closed the connection
                dropped = exc
    finally:
        sock.close()
    assert isinstance(dropped, (BrokenPipeError, ConnectionResetError)), dropped


def test_an_idle_connection_is_closed(server):
    with socket.create_connection(("127.0.0.1", server), timeout=10) as sock:
        sock.sendall(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
        assert read_all(sock) == b""  # the server closed the kept-alive connection, unasked


def test_connections_over_the_cap_are_refused_503_and_closed(server):
    held = []
    try:
        for _ in range(LIMITS["max_connections"]):
            sock = socket.create_connection(("127.0.0.1", server), timeout=10)
            sock.sendall(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
            assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")  # accepted and served: it counts
            held.append(sock)
        raw = exchange(server, b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status_of(raw) == 503 and b"Connection: close" in raw and b"Retry-After: 1" in raw
    finally:
        for sock in held:
            sock.close()
    conn = http.client.HTTPConnection("127.0.0.1", server, timeout=10)  # room again once they are closed
    deadline = time.monotonic() + 10
    while True:
        conn.request("GET", "/hello")
        response = conn.getresponse()
        response.read()
        if response.status == 200 or time.monotonic() > deadline:
            break
        conn.close()
    assert response.status == 200
    conn.close()


def test_a_stop_ends_the_server_without_killing_its_threads(caplog):
    port = free_port()
    container = ServiceContainer(Echo, {"WEB_SERVER_ADDRESS": f"127.0.0.1:{port}"})
    container.start()
    assert exchange(port, b"GET /hello HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.1 200")
    container.stop()
    assert "killing managed thread" not in caplog.text  # nameko's warning for threads left running
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2)
