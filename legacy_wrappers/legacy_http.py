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
"""
from __future__ import annotations

import http.client
import logging
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

import pybreaker
from eventlet import patcher
from eventlet.queue import Empty, Full, LightQueue
from nameko.extensions import DependencyProvider
from prometheus_client import Counter, Gauge

log = logging.getLogger(__name__)
_select = patcher.original("select").select  # a zero-timeout poll, without a trip through the hub
TCP_QUICKACK = getattr(socket, "TCP_QUICKACK", None)
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS"})

BREAKER_STATE = Gauge("retailbus_breaker_open", "1 while the breaker to a legacy system is open",
                      ["system"])
LEGACY_CALLS = Counter("retailbus_legacy_calls_total", "Calls to a legacy HTTP API by outcome",
                       ["system", "outcome"])


class LegacyUnavailable(Exception):
    """The legacy system did not answer usefully (down, timed out, 5xx, breaker open)."""


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
        self.timeout = timeout
        self.system = system
        self.breaker = pybreaker.CircuitBreaker(fail_max=fail_max, reset_timeout=reset_timeout,
                                                listeners=[BreakerMetrics(system)], name=system)
        self._idle: LightQueue = LightQueue(pool_size)

    @property
    def state(self) -> str:
        return self.breaker.current_state

    def request(self, method: str, path: str, body: bytes | None = None,
                content_type: str = "application/json") -> LegacyResponse:
        try:
            response = self.breaker.call(self._send, method, path, body, content_type)
        except pybreaker.CircuitBreakerError:
            LEGACY_CALLS.labels(self.system, "breaker_open").inc()
            raise LegacyUnavailable(f"{self.system}: circuit breaker open") from None
        except (OSError, http.client.HTTPException, LegacyUnavailable) as exc:
            LEGACY_CALLS.labels(self.system, "error").inc()
            raise LegacyUnavailable(f"{self.system}: {exc}") from exc
        LEGACY_CALLS.labels(self.system, "ok").inc()
        return response

    def _connection(self) -> tuple[http.client.HTTPConnection, bool]:
        """(a connection, whether it was idle in the pool); closed idle ones are dropped."""
        while True:
            try:
                conn = self._idle.get_nowait()
            except Empty:
                break
            if conn.sock is not None and not _select([conn.sock], [], [], 0)[0]:
                return conn, True
            conn.close()  # readable while idle: the ERP closed it (EOF) or sent junk
        cls = http.client.HTTPSConnection if self.https else http.client.HTTPConnection
        return cls(self.host, self.port, timeout=self.timeout), False

    def _send(self, method, path, body, content_type) -> LegacyResponse:
        headers = {"Content-Type": content_type} if body is not None else {}
        while True:  # bounded: each retry takes another pooled connection, then a fresh one raises
            conn, pooled = self._connection()
            try:
                conn.request(method, self.prefix + path, body=body, headers=headers)
            except (ConnectionResetError, BrokenPipeError):
                conn.close()
                if pooled:
                    continue  # the request did not go out whole: the ERP cannot have processed it
                raise
            except Exception:
                conn.close()
                raise
            if TCP_QUICKACK is not None:
                conn.sock.setsockopt(socket.IPPROTO_TCP, TCP_QUICKACK, 1)
            try:
                raw = conn.getresponse()
                data = raw.read()
                break
            except http.client.RemoteDisconnected:
                conn.close()
                if pooled and method in IDEMPOTENT:
                    continue  # closed before answering; a query is safe to ask again
                raise
            except Exception:
                conn.close()
                raise
        if raw.will_close:
            conn.close()
        else:
            try:
                self._idle.put_nowait(conn)
            except Full:
                conn.close()
        response = LegacyResponse(raw.status, data, raw.getheader("Content-Type") or "application/json")
        if raw.status >= 500:
            raise LegacyUnavailable(f"answered {raw.status}")
        return response


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
