"""`LegacyHttp`: the client of a legacy system's HTTP API, behind a circuit breaker.

Point-to-point calls to the legacy ERP stay possible (legacy and shadow
routes forward to it unchanged), but a dead or slow ERP must not hang the
till: every call has a timeout, and after repeated failures the breaker
opens so callers fail fast (and can queue) until the ERP recovers.
Connections are kept alive in a small pool: a fresh TCP connection per call
would cost more than the routing decision itself. A pooled connection the
ERP has closed is noticed before use (it reads as EOF while idle); a call is
re-sent on a fresh connection only when the ERP cannot have processed it:
the request was not fully sent, or a GET found the connection closed. A
POST that went out whole is never re-sent (it may have booked the sale).

Many legacy HTTP servers (the demo ERP too: Python's http.server) write the
response headers and the body in two segments without TCP_NODELAY, so Nagle
holds the body until the headers are ACKed, and the client's delayed ACK
waits up to 40 ms for that. The client asks the kernel for an immediate ACK
(TCP_QUICKACK, Linux) once the request is out, which removes that stall.

The wire format is written and read here rather than by `http.client`: the
agent's legacy mode is one such call per sale while a till waits, and
`http.client` parses the response headers with the `email` package and
sends the request headers and body in two writes (bench/README.md,
bench_routing). A call is one write; the answer is read by Content-Length,
chunked, or up to the close.
"""
from __future__ import annotations

import http.client
import logging
import socket
import ssl
from dataclasses import dataclass
from urllib.parse import urlsplit

import pybreaker
from eventlet import patcher
from eventlet.queue import Empty, Full, LightQueue
from nameko.extensions import DependencyProvider
from prometheus_client import Counter, Gauge
from contracts.errors import RetailbusError

log = logging.getLogger(__name__)
_select = patcher.original("select").select  # a zero-timeout poll, without a trip through the hub
TCP_QUICKACK = getattr(socket, "TCP_QUICKACK", None)
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS"})
MAX_LINE = 65536  # status and header lines, as http.client
MAX_HEADERS = 100

BREAKER_STATE = Gauge("retailbus_breaker_open", "1 while the breaker to a legacy system is open",
                      ["system"])
LEGACY_CALLS = Counter("retailbus_legacy_calls_total", "Calls to a legacy HTTP API by outcome",
                       ["system", "outcome"])


# An answer by which the legacy system says it took nothing: 503 Service Unavailable
# (the demo ERP's "simulated failure, nothing posted"). Any other 5xx (500 at commit
# time, 502/504 from a gateway in front of it) may come after the ERP booked the call.
NOT_POSTED_STATUSES = frozenset({503})


class LegacyUnavailable(RetailbusError):
    """The legacy system did not answer usefully (down, timed out, 5xx, breaker open)."""

    # `not_posted` is True only when the call surely changed nothing there: the breaker
    # was open, the connection could not be made, the request could not be sent whole, or
    # the answer says so (NOT_POSTED_STATUSES). Anything else (a timeout or a cut
    # connection after sending, a 500, 502 or 504) may have booked it.
    def __init__(self, message: str, not_posted: bool = False):
        super().__init__(message)
        self.not_posted = not_posted


@dataclass(frozen=True)
class LegacyResponse:
    status: int
    body: bytes
    content_type: str


class BreakerMetrics(pybreaker.CircuitBreakerListener):
    """`retailbus_breaker_open{system}` follows the breaker, 0 from the start."""

    def __init__(self, system: str):
        self.system = system
        BREAKER_STATE.labels(system).set(0)

    def state_change(self, cb, old_state, new_state):
        BREAKER_STATE.labels(self.system).set(1 if new_state.name == "open" else 0)
        log.warning("breaker to %s: %s -> %s", self.system, old_state.name if old_state else None,
                    new_state.name)


class LegacyHttpClient:
    """Forwards calls verbatim; 5xx and transport errors count against the breaker."""

    def __init__(self, base_url: str, timeout: float = 5.0, system: str = "legacy_erp",
                 fail_max: int = 5, reset_timeout: float = 10.0, pool_size: int = 16):
        parts = urlsplit(base_url)
        self.host, self.port = parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)
        self.https = parts.scheme == "https"
        self.prefix = parts.path.rstrip("/")
        default_port = 443 if self.https else 80
        host = f"[{self.host}]" if ":" in self.host else self.host  # an IPv6 address
        self.host_header = host if self.port == default_port else f"{host}:{self.port}"
        self.timeout = timeout
        self.system = system
        # The call that trips the breaker raises its own error, not CircuitBreakerError:
        # that one means "not sent", and the tripping call (a 500, a timeout) may have booked.
        self.breaker = pybreaker.CircuitBreaker(fail_max=fail_max, reset_timeout=reset_timeout,
                                                listeners=[BreakerMetrics(system)], name=system,
                                                throw_new_error_on_trip=False)
        self._idle: LightQueue = LightQueue(pool_size)

    @property
    def state(self) -> str:
        return self.breaker.current_state

    def request(self, method: str, path: str, body: bytes | None = None,
                content_type: str = "application/json", headers: dict[str, str] | None = None) -> LegacyResponse:
        """`headers` adds request headers (e.g. an Idempotency-Key); a name or value that is not
        plain ASCII is refused (ValueError) before anything is sent."""
        extra = ""
        for name, value in (headers or {}).items():
            if not f"{name}{value}".isascii() or any(c in f"{name}{value}" for c in "\r\n\0") or ":" in name:
                raise ValueError(f"header {name!r}: only ASCII without control characters (and no ':' in the name)")
            extra += f"{name}: {value}\r\n"
        try:
            response = self.breaker.call(self._send, method, path, body, content_type, extra)
        except pybreaker.CircuitBreakerError:
            LEGACY_CALLS.labels(self.system, "breaker_open").inc()
            raise LegacyUnavailable(f"{self.system}: circuit breaker open", not_posted=True) from None
        except (OSError, http.client.HTTPException, LegacyUnavailable) as exc:
            LEGACY_CALLS.labels(self.system, "error").inc()
            not_posted = isinstance(exc, (RequestNotSentError, LegacyUnavailable)) and exc.not_posted
            raise LegacyUnavailable(f"{self.system}: {exc}", not_posted=not_posted) from exc
        LEGACY_CALLS.labels(self.system, "ok").inc()
        return response

    def _connection(self) -> tuple[Connection, bool]:
        """(a connection, whether it was idle in the pool); closed idle ones are dropped."""
        while True:
            try:
                conn = self._idle.get_nowait()
            except Empty:
                break
            if not _select([conn.sock], [], [], 0)[0]:
                return conn, True
            conn.close()  # readable while idle: the ERP closed it (EOF) or sent junk
        try:
            return Connection(self.host, self.port, self.timeout, self.https), False
        except OSError as exc:  # refused, unreachable, connect timeout, TLS handshake: nothing was sent
            raise RequestNotSentError(exc) from exc

    def _send(self, method, path, body, content_type, extra_headers="") -> LegacyResponse:
        head = (f"{method} {self.prefix}{path} HTTP/1.1\r\nHost: {self.host_header}\r\n"
                f"Accept-Encoding: identity\r\n{extra_headers}")
        if body is not None:
            head += f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
        request = (head + "\r\n").encode("latin-1") + (body or b"")
        while True:  # bounded: each retry takes another pooled connection, then a fresh one raises
            conn, pooled = self._connection()
            try:
                conn.sock.sendall(request)
            except (ConnectionResetError, BrokenPipeError) as exc:
                conn.close()
                if pooled:
                    continue  # the request did not go out whole: the ERP cannot have processed it
                raise RequestNotSentError(exc) from exc
            except Exception:
                conn.close()
                raise
            if TCP_QUICKACK is not None:
                conn.sock.setsockopt(socket.IPPROTO_TCP, TCP_QUICKACK, 1)
            try:
                status, content_type, data, will_close = conn.read_response(method)
                break
            except http.client.RemoteDisconnected:
                conn.close()
                if pooled and method in IDEMPOTENT:
                    continue  # closed before answering; a query is safe to ask again
                raise
            except Exception:
                conn.close()
                raise
        if will_close or conn.has_leftover():
            conn.close()
        else:
            try:
                self._idle.put_nowait(conn)
            except Full:
                conn.close()
        response = LegacyResponse(status, data, content_type or "application/json")
        if status >= 500:
            raise LegacyUnavailable(f"answered {status}", not_posted=status in NOT_POSTED_STATUSES)
        return response


class RequestNotSentError(RetailbusError, OSError):
    """The request never reached the legacy system whole (the connect failed or the send broke off)."""

    not_posted = True  # whatever the cause, the legacy system cannot have processed it

    def __init__(self, cause: OSError):
        super().__init__(cause.errno, cause.strerror or str(cause))


class Connection:
    """One keep-alive HTTP/1.1 connection to a legacy system: a socket and its reader."""

    def __init__(self, host: str, port: int, timeout: float, https: bool):
        sock = socket.create_connection((host, port), timeout)
        if https:
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=host)
        self.sock, self.rfile = sock, sock.makefile("rb")

    def close(self):
        self.rfile.close()
        self.sock.close()

    def has_leftover(self) -> bool:
        """Bytes after the answer (an ERP sending more than its Content-Length): kept,
        they would be read as the next call's answer, so the connection is not reused."""
        timeout = self.sock.gettimeout()
        self.sock.settimeout(0)  # peek what is buffered or already arrived, never wait
        try:
            return bool(self.rfile.peek(1))
        finally:
            self.sock.settimeout(timeout)

    def _line(self) -> bytes:
        line = self.rfile.readline(MAX_LINE + 1)
        if len(line) > MAX_LINE:
            raise http.client.LineTooLong("header line")
        return line

    def read_response(self, method: str) -> tuple[int, str | None, bytes, bool]:
        """(status, Content-Type, body, whether the connection ends with this answer)."""
        while True:
            line = self._line()
            if not line:
                raise http.client.RemoteDisconnected("Remote end closed connection without response")
            version, _, rest = line.decode("latin-1").partition(" ")
            code = rest[:3]
            if not version.startswith("HTTP/1.") or not code.isdigit():
                raise http.client.BadStatusLine(line[:100].decode("latin-1"))
            headers = {}
            for _ in range(MAX_HEADERS + 1):
                line = self._line()
                if line in (b"\r\n", b"\n", b""):
                    break
                name, _, value = line.decode("latin-1").partition(":")
                headers[name.strip().lower()] = value.strip()
            else:
                raise http.client.HTTPException(f"more than {MAX_HEADERS} headers")
            status = int(code)
            if status >= 200 or status == 101:
                break  # 1xx before the answer (100 Continue, 103) are skipped
        connection = headers.get("connection", "").lower()
        will_close = "close" in connection or (version == "HTTP/1.0" and "keep-alive" not in connection)
        if method == "HEAD" or status in (204, 304) or status < 200:
            data = b""
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            data = self._chunked()
        elif headers.get("content-length", "").isdigit():
            length = int(headers["content-length"])
            data = self.rfile.read(length)
            if len(data) < length:
                raise http.client.IncompleteRead(data, length - len(data))
        else:  # no length: the body ends with the connection
            data, will_close = self.rfile.read(), True
        return status, headers.get("content-type"), data, will_close

    def _chunked(self) -> bytes:
        chunks = []
        while True:
            size_field = self._line().split(b";", 1)[0].strip()
            try:
                size = int(size_field, 16)
            except ValueError:
                raise http.client.HTTPException(f"malformed chunk size {size_field[:20]!r}") from None
            if size == 0:
                while self._line() not in (b"\r\n", b"\n", b""):  # trailers: ignored
                    pass
                return b"".join(chunks)
            chunk = self.rfile.read(size)
            if len(chunk) < size:
                raise http.client.IncompleteRead(chunk, size - len(chunk))
            chunks.append(chunk)
            self._line()


class LegacyHttp(DependencyProvider):
    """Breaker-guarded clients per legacy system, kept for the container's life.

    The base URL comes from the caller (the route table says where the legacy
    system lives, and ops may move it), so clients are made on first use per
    (base URL, timeout) and then reused with their breaker and connections.
    """

    def __init__(self, system: str = "legacy_erp"):
        self.system = system
        self._clients: dict[tuple[str, float], LegacyHttpClient] = {}

    def setup(self):
        BREAKER_STATE.labels(self.system).set(0)  # clients come on first use; the gauge from the start

    def client(self, base_url: str, timeout: float) -> LegacyHttpClient:
        key = (base_url, timeout)
        client = self._clients.get(key)
        if client is None:
            client = self._clients[key] = LegacyHttpClient(base_url, timeout, self.system)
        return client

    def get_dependency(self, worker_ctx):
        return self.client
