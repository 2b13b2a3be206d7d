"""The HTTP/1.1 of the store agent's POS API: read one request, write one response.

Tills send small JSON requests over keep-alive connections, one at a time.
This is the whole protocol the agent needs: a request line, header lines,
a body by Content-Length or chunked, `Expect: 100-continue`, keep-alive
(HTTP/1.1 by default, HTTP/1.0 on request). It parses with `bytes.split`
instead of the `email` package that `http.server` and so `eventlet.wsgi`
use: that parser was the largest single cost of the agent's extra hop
(bench/README.md, bench_routing). Requests become WSGI environs, so service
methods keep werkzeug's `Request`.

The agent faces every till of a store and whatever else reaches its port, so
it reads RFC 9112 strictly and refuses what another parser might read
differently (the request smuggling family): a method or header name that is
not a token, a target with a space, control or non-ASCII byte (it could reach
the legacy ERP's request line), bare CR, obsolete line folding, a chunk size
that is not plain hex digits, Content-Length and Transfer-Encoding together.
A header whose name has `_` is dropped, as nginx and Apache do: WSGI spells
`Content-Length` as `CONTENT_LENGTH`, so `Content_Length` would alias it.
Nothing larger than the caller's `max_body` is ever read into memory.
Every refusal is a 4xx, also for an HTTP version or transfer coding the agent
does not speak (RFC 9110 suggests 505 / 501): the agent's 5xx mean "this
store is in trouble" to its tills and to its alerts, and no client should be
able to raise them.
"""
from __future__ import annotations

import io
import re
import time
from email.utils import formatdate
from urllib.parse import unquote_to_bytes
from contracts.errors import RetailbusError

MAX_LINE = 8192  # request line, each header line, each chunk size line
MAX_HEAD = 32 * 1024  # all header lines of one request together
MAX_HEADERS = 100
MAX_BLANK = 8  # empty lines tolerated before a request line (RFC 9112 2.2)
SKIPPED = frozenset({"content-length", "connection", "transfer-encoding", "keep-alive"})

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_TARGET = re.compile(rb"[\x21-\x7e]+")  # visible ASCII: no space, control or non-ASCII byte
_VERSION = re.compile(rb"HTTP/[0-9]\.[0-9]")
_ABSOLUTE = re.compile(rb"https?://[^/?#]*", re.IGNORECASE)
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")  # in a field value: every CTL but HTAB
_HEX = re.compile(rb"[0-9A-Fa-f]{1,16}")
_DIGITS = re.compile(r"[0-9]{1,18}")


class BadRequestError(RetailbusError):
    """The request cannot be read; answered with `status` and the connection closed."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _strip(raw: bytes, what: str, too_long: int) -> bytes:
    """`raw` (a readline) without its CRLF or bare LF; refused if it has no line end
    (too long, or the client closed inside it) or a bare CR."""
    if not raw.endswith(b"\n"):
        if len(raw) > MAX_LINE:
            raise BadRequestError(too_long, f"{what} longer than {MAX_LINE} bytes")
        raise BadRequestError(400, f"connection closed inside the {what}")
    line = raw[:-2] if raw.endswith(b"\r\n") else raw[:-1]
    if b"\r" in line:
        raise BadRequestError(400, f"bare CR in the {what}")
    return line


def _field(line: bytes, what: str) -> tuple[bytes, bytes]:
    """(name, value) of a header or trailer line."""
    if line[:1] in (b" ", b"\t"):
        raise BadRequestError(400, f"{what}: obsolete line folding is not accepted")
    name, sep, value = line.partition(b":")
    if not sep or not _TOKEN.fullmatch(name):
        raise BadRequestError(400, f"malformed {what} {line[:100]!r}")
    value = value.strip(b" \t")
    if _CONTROL.search(value):
        raise BadRequestError(400, f"{name.decode('ascii')}: control character in the value")
    return name, value


def _target(target: bytes) -> bytes:
    """The origin-form (path?query) of a request target; absolute-form is accepted (RFC 9112 3.2.2)."""
    if not _TARGET.fullmatch(target):
        raise BadRequestError(400, "request target: empty, or a space, control or non-ASCII byte in it")
    if target.startswith(b"/"):
        return target
    absolute = _ABSOLUTE.match(target)
    if absolute:
        rest = target[absolute.end():]
        return rest if rest.startswith(b"/") else b"/" + rest
    raise BadRequestError(400, f"request target: expected /path, got {target[:100]!r}")


def read_head(rfile) -> dict | None:
    """The next request's line and headers as a WSGI environ (without the server keys
    or the body), or None when the client closed the connection between requests."""
    for _ in range(MAX_BLANK + 1):
        raw = rfile.readline(MAX_LINE + 1)
        if raw not in (b"\r\n", b"\n"):
            break
    else:
        raise BadRequestError(400, "empty lines instead of a request line")
    if not raw:
        return None
    parts = _strip(raw, "request line", 414).split(b" ")
    if len(parts) != 3 or not _TOKEN.fullmatch(parts[0]) or not _VERSION.fullmatch(parts[2]):
        raise BadRequestError(400, f"malformed request line {raw[:100]!r}")
    if parts[2] not in (b"HTTP/1.0", b"HTTP/1.1"):  # 400, not 505: see the module docstring
        raise BadRequestError(400, f"{parts[2].decode('ascii')} not supported (HTTP/1.1 or HTTP/1.0)")
    method, version = parts[0].decode("ascii"), parts[2].decode("ascii")
    target = _target(parts[1]).decode("ascii")
    path, _, query = target.partition("?")
    environ = {"REQUEST_METHOD": method, "SCRIPT_NAME": "", "QUERY_STRING": query,
               "PATH_INFO": unquote_to_bytes(path).decode("latin-1"), "SERVER_PROTOCOL": version,
               "REQUEST_URI": target, "RAW_URI": target}
    size = 0
    for _ in range(MAX_HEADERS + 1):
        raw = rfile.readline(MAX_LINE + 1)
        size += len(raw)
        if size > MAX_HEAD:
            raise BadRequestError(431, f"request headers larger than {MAX_HEAD} bytes")
        line = _strip(raw, "header line", 431)
        if not line:
            break
        name, value = _field(line, "header line")
        if b"_" in name:
            continue  # see the module docstring
        key = name.decode("ascii").upper().replace("-", "_")
        if key not in ("CONTENT_TYPE", "CONTENT_LENGTH"):
            key = "HTTP_" + key
        if key in environ and key in ("CONTENT_LENGTH", "HTTP_HOST"):
            raise BadRequestError(400, f"{name.decode('ascii')}: given more than once")
        text = value.decode("latin-1")
        environ[key] = f"{environ[key]},{text}" if key in environ else text
    else:
        raise BadRequestError(431, f"more than {MAX_HEADERS} header lines")
    if version == "HTTP/1.1" and "HTTP_HOST" not in environ:
        raise BadRequestError(400, "Host: required in an HTTP/1.1 request")
    return environ


def read_body(rfile, environ: dict, continue_, max_body: int) -> None:
    """Read the body of the request `environ` describes into `wsgi.input`, never more
    than `max_body` bytes (413 before any of it is read when Content-Length says so).
    `continue_()` is called when the client waits for `100 Continue` before sending it."""
    chunked = environ.pop("HTTP_TRANSFER_ENCODING", None)
    length = environ.get("CONTENT_LENGTH")
    if chunked is not None:
        if length is not None:
            raise BadRequestError(400, "Content-Length and Transfer-Encoding together")
        if environ["SERVER_PROTOCOL"] == "HTTP/1.0":
            raise BadRequestError(400, "Transfer-Encoding in an HTTP/1.0 request")
        if chunked.strip(" \t").lower() != "chunked":  # 400, not 501: see the module docstring
            raise BadRequestError(400, f"Transfer-Encoding {chunked[:50]!r} not supported (only chunked)")
    elif length is not None:
        if not _DIGITS.fullmatch(length):
            raise BadRequestError(400, f"Content-Length: not a number: {length[:50]!r}")
        if int(length) > max_body:
            raise BadRequestError(413, f"body larger than {max_body} bytes")
    if (chunked or (length and int(length))) and \
            environ.get("HTTP_EXPECT", "").lower() == "100-continue" and environ["SERVER_PROTOCOL"] == "HTTP/1.1":
        continue_()
    if chunked:
        body = _dechunk(rfile, max_body)
        environ["CONTENT_LENGTH"] = str(len(body))  # handed on de-chunked, as a body of known length
    else:
        body = rfile.read(int(length)) if length else b""
        if len(body) < int(length or 0):
            raise BadRequestError(400, "connection closed inside the body")
    environ["wsgi.input"] = io.BytesIO(body)


def _dechunk(rfile, max_body: int) -> bytes:
    chunks, total = [], 0
    while True:
        line = _strip(rfile.readline(MAX_LINE + 1), "chunk size line", 400)
        size, _, extension = line.partition(b";")
        size = size.rstrip(b" \t")  # BWS before a chunk extension
        if not _HEX.fullmatch(size):
            raise BadRequestError(400, f"chunk size: expected hex digits, got {size[:20]!r}")
        if _CONTROL.search(extension):
            raise BadRequestError(400, "chunk extension: control character in it")
        size = int(size, 16)
        if size == 0:
            break
        total += size
        if total > max_body:
            raise BadRequestError(413, f"body larger than {max_body} bytes")
        chunk = rfile.read(size)
        if len(chunk) < size:
            raise BadRequestError(400, "connection closed inside a chunk")
        if _strip(rfile.readline(MAX_LINE + 1), "chunk", 400):
            raise BadRequestError(400, "chunk longer than its size")
        chunks.append(chunk)
    for _ in range(MAX_HEADERS + 1):  # trailers: checked, then ignored
        line = _strip(rfile.readline(MAX_LINE + 1), "trailer line", 400)
        if not line:
            return b"".join(chunks)
        _field(line, "trailer line")
    raise BadRequestError(431, f"more than {MAX_HEADERS} trailer lines")


def keep_alive(environ: dict) -> bool:
    """HTTP/1.1 keeps the connection unless told to close; HTTP/1.0 only when asked."""
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
