"""routing/http11.py read strictly (RFC 9112): every request another parser could read
differently is refused with a 4xx, and no more than `max_body` bytes are ever read.

Plain functions over an in-memory stream: what the parser consumed is `rfile.tell()`."""
from __future__ import annotations

import io

import pytest

from routing import http11
from routing.http11 import BadRequestError

pytestmark = pytest.mark.unit

MAX_BODY = 1024


def parse(raw: bytes, max_body: int = MAX_BODY) -> tuple[dict | None, io.BytesIO, list]:
    """(environ, the stream, the 100-continue calls) after reading one request of `raw`."""
    rfile, continued = io.BytesIO(raw), []
    environ = http11.read_head(rfile)
    if environ is not None:
        http11.read_body(rfile, environ, lambda: continued.append(True), max_body)
    return environ, rfile, continued


def refused(raw: bytes, max_body: int = MAX_BODY) -> tuple[int, str]:
    with pytest.raises(BadRequestError) as caught:
        parse(raw, max_body)
    return caught.value.status, str(caught.value)


def post(headers: bytes, body: bytes = b"") -> bytes:
    return b"POST /erp/sales HTTP/1.1\r\nHost: agent\r\n" + headers + b"\r\n" + body


def test_a_well_formed_request_with_keep_alive_and_expect():
    environ, rfile, continued = parse(post(b"Content-Type: application/json\r\nContent-Length: 2\r\n"
                                           b"Expect: 100-continue\r\nX-Retailbus-Terminal: 07\r\n", b"{}"))
    assert environ["CONTENT_LENGTH"] == "2" and environ["wsgi.input"].read() == b"{}"
    assert environ["HTTP_X_RETAILBUS_TERMINAL"] == "07" and environ["CONTENT_TYPE"] == "application/json"
    assert continued == [True] and http11.keep_alive(environ)


@pytest.mark.parametrize("size_line", [b"5", b"05", b"5;name=value", b"5 ;name", b"0005"])
def test_chunk_sizes_of_hex_digits_are_read(size_line):
    environ, _, _ = parse(post(b"Transfer-Encoding: chunked\r\n", size_line + b"\r\nhello\r\n0\r\n\r\n"))
    assert environ["wsgi.input"].read() == b"hello" and environ["CONTENT_LENGTH"] == "5"
    assert "HTTP_TRANSFER_ENCODING" not in environ


@pytest.mark.parametrize("size_line", [b"0x5", b"+5", b"0_5", b"-1", b" 5", b"5 5", b"", b"\xb2",
                                       b"1" * 17, b"5;ext\x00"])
def test_chunk_sizes_other_than_hex_digits_are_400(size_line):
    status, message = refused(post(b"Transfer-Encoding: chunked\r\n", size_line + b"\r\nhello\r\n0\r\n\r\n"))
    assert status == 400 and "chunk" in message


def test_a_chunk_longer_than_its_size_is_400():
    status, message = refused(post(b"Transfer-Encoding: chunked\r\n", b"3\r\nhello\r\n0\r\n\r\n"))
    assert status == 400 and "longer than its size" in message


def test_trailers_are_read_and_dropped_and_a_malformed_one_is_400():
    environ, rfile, _ = parse(post(b"Transfer-Encoding: chunked\r\n", b"2\r\n{}\r\n0\r\nX-Sum: 1\r\n\r\nNEXT"))
    assert environ["wsgi.input"].read() == b"{}" and "HTTP_X_SUM" not in environ and rfile.read() == b"NEXT"
    assert refused(post(b"Transfer-Encoding: chunked\r\n", b"2\r\n{}\r\n0\r\nno colon\r\n\r\n"))[0] == 400


@pytest.mark.parametrize("name", [b"Content_Length", b"content_length", b"CONTENT_LENGTH"])
def test_content_length_spelt_with_underscore_is_not_framing(name):
    environ, rfile, _ = parse(post(name + b": 5\r\n", b"hello"))
    assert "CONTENT_LENGTH" not in environ and environ["wsgi.input"].read() == b""
    assert rfile.read() == b"hello"  # left on the connection: the next request, which will be refused


def test_transfer_encoding_spelt_with_underscore_is_not_framing():
    environ, rfile, _ = parse(post(b"Transfer_Encoding: chunked\r\nContent-Length: 4\r\n", b"5\r\nhello"))
    assert environ["wsgi.input"].read() == b"5\r\nh" and "HTTP_TRANSFER_ENCODING" not in environ


@pytest.mark.parametrize("headers", [
    b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
    b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n",
    b"Transfer-Encoding: chunked\r\nContent-Length: 0\r\n",
])
def test_content_length_and_transfer_encoding_together_are_400(headers):
    status, message = refused(post(headers, b"5\r\nhello\r\n0\r\n\r\n"))
    assert status == 400 and "together" in message


@pytest.mark.parametrize("value", [b"+5", b"-1", b"0x5", b"5 5", b"5,5", b"\xb2", b"1e3", b"", b"1" * 19])
def test_content_length_other_than_digits_is_400(value):
    status, message = refused(post(b"Content-Length: " + value + b"\r\n", b"hello"))
    assert status == 400 and "Content-Length" in message


def test_content_length_twice_is_400():
    assert refused(post(b"Content-Length: 5\r\nContent-Length: 5\r\n", b"hello"))[0] == 400


@pytest.mark.parametrize("value", [b"gzip", b"gzip, chunked", b"chunked, chunked"])
def test_transfer_codings_other_than_chunked_are_400(value):
    status, message = refused(post(b"Transfer-Encoding: " + value + b"\r\n", b"0\r\n\r\n"))
    assert status == 400 and "only chunked" in message


def test_transfer_encoding_in_http10_is_400():
    raw = b"POST /erp/sales HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    assert refused(raw)[0] == 400


@pytest.mark.parametrize("target", [b"/erp/stock?SKU=1\rX", b"/erp/stock?SKU=1\x00", b"/erp/\x7fstock",
                                    b"/erp/stock?SKU=\xe9", b"/erp/stock?SKU=1\tX", b"/erp/stock?SKU=1\x0bX"])
def test_control_and_non_ascii_bytes_in_the_target_are_400(target):
    status, message = refused(b"GET " + target + b" HTTP/1.1\r\nHost: agent\r\n\r\n")
    assert status == 400 and ("request target" in message or "CR" in message)


def test_a_bare_cr_splitting_the_request_line_is_400():
    assert refused(b"GET /erp/stock?SKU=1\r HTTP/1.1\r\nHost: agent\r\n\r\n")[0] == 400
    assert refused(b"GET /erp/stock HTTP/1.1\rX-Injected: 1\r\nHost: agent\r\n\r\n")[0] == 400


@pytest.mark.parametrize("line", [b"X Name: 1", b"X(Name: 1", b": 1", b"X-Name : 1", b"X-N\xe9: 1",
                                  b"X-Name: a\rb", b"X-Name: a\x00b", b"X-Name: a\x1bb", b" folded"])
def test_malformed_header_lines_are_400(line):
    assert refused(post(line + b"\r\n"))[0] == 400


def test_header_values_may_carry_tabs_and_latin1_text():
    environ, _, _ = parse(post(b"X-Note: a\tb \xe9\r\n"))
    assert environ["HTTP_X_NOTE"] == "a\tb \xe9"


@pytest.mark.parametrize("raw, status", [
    (b"GET /healthz HTTP/1.1\r\n\r\n", 400),  # no Host
    (b"GET /healthz HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    (b"GET /healthz HTTP/2.0\r\nHost: a\r\n\r\n", 400),  # not 505: a client error is a 4xx
    (b"GET /healthz HTTP/1.1x\r\nHost: a\r\n\r\n", 400),
    (b"GET /healthz http/1.1\r\nHost: a\r\n\r\n", 400),
    (b"G@T /healthz HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    (b"GET  /healthz HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    (b"GET healthz HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    (b"GET /healthz", 400),  # closed inside the request line
    (b"GET /healthz HTTP/1.1\r\nHost: a\r\n", 400),  # closed inside the head
    (b"GET /" + b"a" * http11.MAX_LINE + b" HTTP/1.1\r\n\r\n", 414),
    (b"\r\n" * (http11.MAX_BLANK + 1) + b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n", 400),
])
def test_malformed_request_lines_and_heads_are_refused(raw, status):
    assert refused(raw)[0] == status


def test_http10_needs_no_host_and_absolute_form_is_read_as_its_path():
    environ, _, _ = parse(b"GET /healthz HTTP/1.0\r\n\r\n")
    assert environ["PATH_INFO"] == "/healthz" and not http11.keep_alive(environ)
    environ, _, _ = parse(b"GET http://agent:8101/erp/stock?SKU=1 HTTP/1.1\r\nHost: agent\r\n\r\n")
    assert environ["PATH_INFO"] == "/erp/stock" and environ["QUERY_STRING"] == "SKU=1"


def test_headers_past_the_head_limit_are_431():
    headers = b"".join(b"X-%d: %s\r\n" % (n, b"v" * 1000) for n in range(40))
    assert refused(post(headers))[0] == 431


def test_a_content_length_over_max_body_is_413_before_any_body_byte_is_read():
    raw = post(b"Content-Length: 1025\r\nExpect: 100-continue\r\n", b"x" * 1025)
    rfile, continued = io.BytesIO(raw), []
    environ = http11.read_head(rfile)
    head = rfile.tell()
    with pytest.raises(BadRequestError) as caught:
        http11.read_body(rfile, environ, lambda: continued.append(True), MAX_BODY)
    assert caught.value.status == 413 and rfile.tell() == head and continued == []
    assert parse(post(b"Content-Length: 1024\r\n", b"x" * 1024))[0]["wsgi.input"].read() == b"x" * 1024


def test_a_chunked_body_stops_being_read_at_max_body():
    chunk = b"200\r\n" + b"x" * 0x200 + b"\r\n"
    raw = post(b"Transfer-Encoding: chunked\r\n", chunk * 1000 + b"0\r\n\r\n")
    rfile = io.BytesIO(raw)
    environ = http11.read_head(rfile)
    head = rfile.tell()
    with pytest.raises(BadRequestError) as caught:
        http11.read_body(rfile, environ, lambda: None, MAX_BODY)
    assert caught.value.status == 413 and rfile.tell() - head <= 3 * len(chunk)


@pytest.mark.parametrize("body", [b"hel", b"5\r\nhel"])
def test_a_body_cut_short_is_400(body):
    headers = b"Content-Length: 5\r\n" if body == b"hel" else b"Transfer-Encoding: chunked\r\n"
    status, message = refused(post(headers, body))
    assert status == 400 and "connection closed" in message
