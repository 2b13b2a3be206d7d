"""The legacy ERP's point-to-point HTTP API, the one POS systems call today.

Plain stdlib ``ThreadingHTTPServer`` and JSON, because that is what the store
agent must stand in for: same paths, same UPPER-CASE payloads, same answers.
Faults (latency, a fraction of POSTs refused with 503) are built in so tests
and benchmarks can show retailbus keeping stores selling when the ERP is slow
or failing.
"""

import json
import random
import signal
import sys
import threading
import time
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler
from urllib.parse import parse_qs, urlsplit

from sqlalchemy import Engine, text
from sqlalchemy.exc import SQLAlchemyError

from demo.draining import DrainingServer

from . import postings
from .schema import create_schema, engine_for

MAX_BODY = 1 << 20


class LegacyErpServer(DrainingServer):
    """The HTTP server plus what handlers share: engine, faults (and the in-flight count)."""

    def __init__(self, address, engine: Engine, latency_ms: int = 0, fail_rate: float = 0.0):
        super().__init__(address, ErpHandler)
        self.engine = engine
        self.latency_ms = latency_ms
        self.fail_rate = fail_rate

    def server_close(self) -> None:
        super().server_close()
        self.engine.dispose()


class HttpError(Exception):
    """An answer other than 200: status and the legacy error MESSAGE."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class ErpHandler(BaseHTTPRequestHandler):
    """Routes the four legacy paths; every answer is JSON with Content-Length."""

    protocol_version = "HTTP/1.1"
    server_version = "LegacyERP/4.2"
    server: LegacyErpServer

    def do_GET(self):
        self._handle("GET")

    def do_POST(self):
        self._handle("POST")

    def _handle(self, method: str) -> None:
        started = time.monotonic()
        url = urlsplit(self.path)
        note = ""
        with self.server.busy():
            try:
                body = self._read_body() if method == "POST" else b""
                status, answer = self._dispatch(method, url.path, url.query, body)
                note = answer.get("DOC_NO", "")
            except HttpError as exc:
                status, answer = exc.status, {"STATUS": "ERROR", "MESSAGE": str(exc)}
                note = str(exc)
            except SQLAlchemyError as exc:
                status = 500
                answer = {"STATUS": "ERROR", "MESSAGE": f"database error ({type(exc).__name__})"}
                note = str(exc).splitlines()[0]
            except Exception as exc:  # an HTTP API must answer, not drop the socket
                status = 500
                answer = {"STATUS": "ERROR", "MESSAGE": f"internal error ({type(exc).__name__})"}
                note = repr(exc)
            try:
                self._send(status, answer)
            except OSError as exc:  # the POS hung up; what was posted stays posted
                self.close_connection = True
                note = f"{note} (answer not delivered: {type(exc).__name__})".strip()
        elapsed = (time.monotonic() - started) * 1000
        stamp = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        sys.stderr.write(f"{stamp} {self.client_address[0]} {method} {self.path} "
                         f"{status} {elapsed:.1f}ms {note}".rstrip() + "\n")

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            raise HttpError(400, "body: chunked transfer encoding not supported")
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self.close_connection = True
            raise HttpError(400, "body: Content-Length required") from None
        if length < 0 or length > MAX_BODY:
            self.close_connection = True
            raise HttpError(400, f"body: Content-Length must be 0..{MAX_BODY}")
        return self.rfile.read(length)

    def _dispatch(self, method: str, path: str, query: str, body: bytes) -> tuple[int, dict]:
        routes = {
            "/erp/health": ("GET", self._health),
            "/erp/stock": ("GET", self._stock),
            "/erp/sales": ("POST", self._sale),
            "/erp/returns": ("POST", self._return),
        }
        if path not in routes:
            raise HttpError(404, f"path: unknown {path}")
        allowed, action = routes[path]
        if method != allowed:
            raise HttpError(405, f"method: {path} accepts {allowed} only")
        if path != "/erp/health" and self.server.latency_ms:
            time.sleep(self.server.latency_ms / 1000)
        return 200, action(query, body)

    def _health(self, _query: str, _body: bytes) -> dict:
        with self.server.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        return {"STATUS": "OK"}

    def _stock(self, query: str, _body: bytes) -> dict:
        params = parse_qs(query)
        store, sku = (params.get(key, [""])[0] for key in ("STORE", "SKU"))
        for key, value in (("STORE", store), ("SKU", sku)):
            if not value:
                raise HttpError(400, f"{key}: required")
        with self.server.engine.connect() as conn:
            answer = postings.stock_answer(conn, store, sku, datetime.now(timezone.utc))
        if answer is None:
            raise HttpError(404, f"STORE/SKU: no stock record for {store}/{sku}")
        return answer

    def _sale(self, _query: str, body: bytes) -> dict:
        return self._post(postings.post_sale, body)

    def _return(self, _query: str, body: bytes) -> dict:
        return self._post(postings.post_return, body)

    def _post(self, post, body: bytes) -> dict:
        if self.server.fail_rate and random.random() < self.server.fail_rate:
            raise HttpError(503, "ERP: simulated failure, nothing posted")
        try:
            payload = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise HttpError(400, f"body: invalid JSON ({exc})") from None
        try:
            with self.server.engine.begin() as conn:
                posted = post(conn, payload)
        except postings.ValidationError as exc:
            raise HttpError(400, str(exc)) from None
        return {"STATUS": "OK", "DOC_NO": posted.doc_no}

    def _send(self, status: int, answer: dict) -> None:
        data = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def log_request(self, code="-", size="-"):
        """Silenced: _handle writes the one line per request itself."""


def make_server(dsn: str, host: str = "127.0.0.1", port: int = 8081, *,
                latency_ms: int = 0, fail_rate: float = 0.0,
                init: bool = False) -> LegacyErpServer:
    """Bind the ERP API on host:port (0 picks a free port); ``init`` creates the schema."""
    if latency_ms < 0:
        raise ValueError("latency_ms must be >= 0")
    if not 0.0 <= fail_rate <= 1.0:
        raise ValueError("fail_rate must be within 0..1")
    engine = engine_for(dsn)
    if init:
        create_schema(engine)
    try:
        return LegacyErpServer((host, port), engine, latency_ms, fail_rate)
    except OSError:
        engine.dispose()
        raise


def serve_until_signalled(server) -> None:
    """Serve until SIGTERM/SIGINT, let in-flight requests finish, then close (any of
    the demo's HTTP servers: they all have `drain` and `url`).

    ``shutdown()`` blocks until ``serve_forever`` returns, and the signal
    handler runs on the very thread inside ``serve_forever``: so the handler
    only starts a thread that calls it.
    """
    def stop(signum, _frame):
        sys.stderr.write(f"signal {signal.Signals(signum).name}: shutting down\n")
        threading.Thread(target=server.shutdown, daemon=True).start()

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    sys.stderr.write(f"{getattr(server, 'name', 'legacy ERP')} listening on {server.url}\n")
    sys.stderr.flush()
    try:
        server.serve_forever()
    finally:
        if not server.drain():
            sys.stderr.write("shutdown: requests still running after drain timeout\n")
        server.server_close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
