"""The HTTP/1.1 of the store agent's POS API: read one request, write one response.

Tills send small JSON requests over keep-alive connections, one at a time.
This is the whole protocol the agent needs: a request line, header lines,
a body by Content-Length or chunked, `Expect: 100-continue`, keep-alive
(HTTP/1.1 by default, HTTP/1.0 on request). It parses with `bytes.split`
instead of the `email` package that `http.server` and so `eventlet.wsgi`
use: that parser was the largest single cost of the agent's extra hop
(bench/README.md, bench_routing). Requests become WSGI environs, so service
methods keep werkzeug's `Request`.
"""
from __future__ import annotations

import io
import time
from email.utils import formatdate
from urllib.parse import unquote_to_bytes
from contracts.errors import RetailbusError

MAX_LINE = 8192  # request line and each header line, as eventlet.wsgi
MAX_HEADERS = 100
MAX_BODY = 16 * 1024 * 1024  # read before the handler runs; larger bodies stream (Content-Length) or get 413
SKIPPED = frozenset({"content-length", "connection", "transfer-encoding", "keep-alive"})


class BadRequestError(RetailbusError):
    """The request cannot be read; answered with `status` and the connection closed."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _line(rfile) -> bytes:
    line = rfile.readline(MAX_LINE + 1)
    if len(line) > MAX_LINE:
        raise BadRequestError(431, "header line too long")
    return line


def read_request(rfile, continue_) -> dict | None:
    """The next request on the connection as a WSGI environ (without the server keys),
    or None when the client closed it between requests. `continue_()` is called when
    the client waits for `100 Continue` before sending the body."""
    line = rfile.readline(MAX_LINE + 1)
    while line in (b"\r\n", b"\n"):  # RFC 9112 2.2: ignore empty lines before a request
        line = rfile.readline(MAX_LINE + 1)
    if not line:
        return None
    if len(line) > MAX_LINE:
        raise BadRequestError(414, "request line too long")
    parts = line.rstrip(b"\r\n").split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1.") or not parts[0].isalpha():
        raise BadRequestError(400, f"malformed request line {line[:100]!r}")
    method, target, version = (p.decode("latin-1") for p in parts)
    path, _, query = target.partition("?")
    environ = {"REQUEST_METHOD": method, "SCRIPT_NAME": "", "QUERY_STRING": query,
               "PATH_INFO": unquote_to_bytes(path).decode("latin-1"), "SERVER_PROTOCOL": version,
               "REQUEST_URI": target, "RAW_URI": target}
    for _ in range(MAX_HEADERS + 1):
        line = _line(rfile)
        if line in (b"\r\n", b"\n", b""):
            break
        name, sep, value = line.decode("latin-1").partition(":")
        if not sep or not name or name != name.strip():
            raise BadRequestError(400, f"malformed header line {line[:100]!r}")
        key = name.upper().replace("-", "_")
        if key not in ("CONTENT_TYPE", "CONTENT_LENGTH"):
            key = "HTTP_" + key
        value = value.strip()
        environ[key] = f"{environ[key]},{value}" if key in environ else value
    else:
        raise BadRequestError(431, f"more than {MAX_HEADERS} header lines")
    _body(rfile, environ, continue_)
    return environ


def _body(rfile, environ: dict, continue_) -> None:
    chunked = environ.get("HTTP_TRANSFER_ENCODING", "").lower()
    length = environ.get("CONTENT_LENGTH")
    if chunked and length is not None:
        raise BadRequestError(400, "Content-Length and Transfer-Encoding together")
    if chunked and chunked != "chunked":
        raise BadRequestError(501, f"Transfer-Encoding {chunked!r} not supported")
    if length is not None and not length.isdigit():
        raise BadRequestError(400, f"Content-Length: not a number: {length!r}")
    if (chunked or (length and length != "0")) and \
            environ.get("HTTP_EXPECT", "").lower() == "100-continue" and environ["SERVER_PROTOCOL"] == "HTTP/1.1":
        continue_()
    if chunked:
        body = _dechunk(rfile)
        del environ["HTTP_TRANSFER_ENCODING"]  # handed on de-chunked, as a body of known length
        environ["CONTENT_LENGTH"] = str(len(body))
        environ["wsgi.input"] = io.BytesIO(body)
    elif length and int(length) > MAX_BODY:
        environ["wsgi.input"] = rfile  # werkzeug reads at most Content-Length; the connection closes after
        environ["retailbus.unread_body"] = True
    else:
        body = rfile.read(int(length or 0))
        if len(body) < int(length or 0):
            raise ConnectionResetError("client closed the connection inside the body")
        environ["wsgi.input"] = io.BytesIO(body)


def _dechunk(rfile) -> bytes:
    chunks, total = [], 0
    while True:
        size_line = _line(rfile).split(b";", 1)[0].strip()
        try:
            size = int(size_line, 16)
        except ValueError:
            raise BadRequestError(400, f"malformed chunk size {size_line[:20]!r}") from None
        if size == 0:
            while _line(rfile) not in (b"\r\n", b"\n", b""):  # trailers: ignored
                pass
            return b"".join(chunks)
        total += size
        if total > MAX_BODY:
            raise BadRequestError(413, f"body larger than {MAX_BODY} bytes")
        chunk = rfile.read(size)
        if len(chunk) < size:
            raise ConnectionResetError("client closed the connection inside a chunk")
        chunks.append(chunk)
        _line(rfile)  # the CRLF after the chunk


def keep_alive(environ: dict) -> bool:
    """HTTP/1.1 keeps the connection unless told to close; HTTP/1.0 only when asked."""
    if environ.get("retailbus.unread_body"):
        return False
    connection = environ.get("HTTP_CONNECTION", "").lower()
    if environ["SERVER_PROTOCOL"] == "HTTP/1.0":
        return "keep-alive" in connection
    return "close" not in connection


_date = [0, ""]


def _http_date() -> str:
    now = int(time.time())
    if _date[0] != now:
        _date[:] = [now, formatdate(now, usegmt=True)]
    return _date[1]


def response_bytes(status: str, headers: list[tuple[str, str]], body: bytes, *, head: bool = False,
                   keep: bool = True, http10: bool = False) -> bytes:
    """One HTTP/1.1 response (status like "200 OK"), sent with a single write: a
    response in two segments would meet the till's delayed ACK (Nagle)."""
    lines = [f"HTTP/1.1 {status}", f"Date: {_http_date()}", f"Content-Length: {len(body)}"]
    lines += [f"{name}: {value}" for name, value in headers if name.lower() not in SKIPPED]
    if not keep:
        lines.append("Connection: close")
    elif http10:
        lines.append("Connection: keep-alive")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (b"" if head else body)
