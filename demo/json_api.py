"""A small JSON-over-HTTP server for the simulated SaaS platforms (loyalty, CRM).

What the platforms share and real SaaS APIs do alike: JSON in and out, an
`Idempotency-Key` on every write (the same key and body answer what the first
call answered; the same key with another body is a 409), errors as
`{"error": {"code", "message"}}` naming the field, and switches a test turns at
run time (`POST /_faults {"latency_ms", "fail_rate"}`) to make the platform slow
or failing without restarting it; "gone" is the process stopped.

One SQLite file per platform (WAL, `BEGIN IMMEDIATE` per write), so concurrent
writes are serialised as a real platform's would be: two holds racing for one
balance cannot both win.
"""
from __future__ import annotations

import hashlib
import json
import random
import re
import sqlite3
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler
from typing import Callable
from urllib.parse import parse_qs, urlsplit

from demo.draining import DrainingServer

MAX_BODY = 1 << 20

IDEMPOTENCY_SCHEMA = """
CREATE TABLE IF NOT EXISTS idempotency (
    key TEXT PRIMARY KEY, request TEXT NOT NULL, status INTEGER NOT NULL, answer TEXT NOT NULL,
    created TEXT NOT NULL)
"""
# The change feed SaaS platforms offer (webhooks' pull-based twin): every change of a record,
# in order, with who made it (the API client: `X-Api-Client`) and the record as it then was.
CHANGES_SCHEMA = """
CREATE TABLE IF NOT EXISTS changes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, record_id TEXT NOT NULL, actor TEXT NOT NULL, at TEXT NOT NULL,
    record TEXT NOT NULL)
"""
DEFAULT_ACTOR = "user"  # a change without an X-Api-Client header: a person at the platform's own screens
MAX_CHANGES = 1000


class ApiError(Exception):
    """An answer other than 2xx: status, a machine code and a message naming the field."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code = status, code


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    params: dict            # the path's named groups
    query: dict             # first value per query key
    body: dict
    conn: sqlite3.Connection
    actor: str = DEFAULT_ACTOR  # who calls: the X-Api-Client header


Handler = Callable[[Request], tuple[int, dict]]


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def connect(path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA busy_timeout=30000")
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    return conn


def add_columns(conn: sqlite3.Connection, table: str, columns: dict[str, str]) -> None:
    """Columns a database made by an older version of the platform lacks (CREATE TABLE IF NOT
    EXISTS keeps an old table as it was)."""
    have = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
    for name, kind in columns.items():
        if name not in have:
            conn.execute(f"ALTER TABLE {table} ADD COLUMN {name} {kind}")


def record_change(conn: sqlite3.Connection, record_id: str, actor: str, record: dict) -> None:
    """Note a change of `record_id` in the feed, in the caller's transaction."""
    conn.execute("INSERT INTO changes (record_id, actor, at, record) VALUES (?, ?, ?, ?)",
                 (record_id, actor, now(), json.dumps(record)))


def list_changes(req: Request) -> tuple[int, dict]:
    """`GET /changes?after=SEQ&limit=N`: the changes after SEQ, oldest first."""
    try:
        after, limit = int(req.query.get("after", 0)), int(req.query.get("limit", 500))
    except ValueError:
        raise ApiError(400, "invalid_query", "after, limit: integers") from None
    if not 1 <= limit <= MAX_CHANGES:
        raise ApiError(400, "invalid_query", f"limit: 1..{MAX_CHANGES}")
    rows = req.conn.execute("SELECT seq, record_id, actor, at, record FROM changes WHERE seq > ? ORDER BY seq "
                            "LIMIT ?", (after, limit)).fetchall()
    return 200, {"changes": [{"seq": r["seq"], "id": r["record_id"], "by": r["actor"], "at": r["at"],
                              "record": json.loads(r["record"])} for r in rows]}


def require(body: dict, field: str, kind: type, *, positive: bool = False):
    """The body's `field`, of `kind` (bool is never an int here); ApiError 400 naming it otherwise."""
    value = body.get(field)
    if value is None or not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ApiError(400, "invalid_field", f"{field}: required, a {kind.__name__}")
    if kind is str and not value.strip():
        raise ApiError(400, "invalid_field", f"{field}: must not be empty")
    if positive and value <= 0:
        raise ApiError(400, "invalid_field", f"{field}: must be > 0")
    return value


class JsonApiServer(DrainingServer):
    """Routes, the database file and faults the handlers share (and the in-flight count)."""

    def __init__(self, address, name: str, db_path: str, schema: str,
                 routes: list[tuple[str, str, Handler, bool]], migrate: Callable | None = None):
        super().__init__(address, JsonApiHandler)
        self.name, self.db_path = name, db_path
        self.routes = [(method, re.compile(f"^{pattern}$"), handler, write)
                       for method, pattern, handler, write in routes]
        self.latency_ms, self.fail_rate = 0, 0.0
        self._local = threading.local()
        with self.db() as conn:
            conn.executescript(schema + ";" + IDEMPOTENCY_SCHEMA + ";" + CHANGES_SCHEMA)
            if migrate is not None:
                migrate(conn)

    @contextmanager
    def db(self):
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = connect(self.db_path)
        yield conn



class JsonApiHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: JsonApiServer

    def do_GET(self):
        self._handle("GET")

    def do_POST(self):
        self._handle("POST")

    def do_PUT(self):
        self._handle("PUT")

    def _handle(self, method: str) -> None:
        started = time.monotonic()
        with self.server.busy():
            try:
                status, answer = self._dispatch(method)
            except ApiError as exc:
                status, answer = exc.status, {"error": {"code": exc.code, "message": str(exc)}}
            except sqlite3.Error as exc:
                status, answer = 500, {"error": {"code": "database", "message": type(exc).__name__}}
            except Exception as exc:  # an HTTP API answers, it does not drop the socket
                status, answer = 500, {"error": {"code": "internal", "message": repr(exc)}}
            try:
                self._send(status, answer)
            except OSError:
                self.close_connection = True
        if status >= 500:  # a line per request was a line per sale in `retailbus up`'s log (issue 25)
            sys.stderr.write(f"{now()} {self.server.name} {method} {self.path} {status} "
                             f"{(time.monotonic() - started) * 1000:.1f}ms\n")

    def _dispatch(self, method: str) -> tuple[int, dict]:
        url = urlsplit(self.path)
        body = self._read_body() if method in ("POST", "PUT") else {}
        if url.path == "/_faults" and method == "POST":
            return self._faults(body)
        if url.path == "/health":
            return 200, {"status": "ok"}
        for route_method, pattern, handler, write in self.server.routes:
            match = pattern.match(url.path)
            if match is None or route_method != method:
                continue
            if self.server.latency_ms:
                time.sleep(self.server.latency_ms / 1000)
            if self.server.fail_rate and random.random() < self.server.fail_rate:
                raise ApiError(503, "unavailable", "simulated failure, nothing written")
            query = {k: v[0] for k, v in parse_qs(url.query).items()}
            with self.server.db() as conn:
                request = Request(method, url.path, match.groupdict(), query, body, conn,
                                  self.headers.get("X-Api-Client", "").strip() or DEFAULT_ACTOR)
                return self._idempotent(handler, request) if write else handler(request)
        raise ApiError(404, "not_found", f"path: no {method} {url.path}")

    def _idempotent(self, handler: Handler, request: Request) -> tuple[int, dict]:
        """The write and the key's record commit together; a repeat answers the first answer."""
        key = self.headers.get("Idempotency-Key", "").strip()
        if not key:
            raise ApiError(400, "idempotency_key_required", "Idempotency-Key: header required on every write")
        fingerprint = hashlib.sha256(json.dumps(
            [request.method, request.path, request.body], sort_keys=True).encode()).hexdigest()
        conn = request.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            seen = conn.execute("SELECT request, status, answer FROM idempotency WHERE key = ?", (key,)).fetchone()
            if seen is not None:
                conn.execute("ROLLBACK")
                if seen["request"] != fingerprint:
                    raise ApiError(409, "idempotency_conflict",
                                   f"Idempotency-Key: {key} was used for a different request")
                return seen["status"], json.loads(seen["answer"])
            status, answer = handler(request)
            conn.execute("INSERT INTO idempotency (key, request, status, answer, created) VALUES (?, ?, ?, ?, ?)",
                         (key, fingerprint, status, json.dumps(answer), now()))
            conn.execute("COMMIT")
            return status, answer
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def _faults(self, body: dict) -> tuple[int, dict]:
        latency, rate = body.get("latency_ms", 0), body.get("fail_rate", 0.0)
        if not isinstance(latency, int) or isinstance(latency, bool) or latency < 0:
            raise ApiError(400, "invalid_field", "latency_ms: an integer >= 0")
        if not isinstance(rate, (int, float)) or isinstance(rate, bool) or not 0 <= rate <= 1:
            raise ApiError(400, "invalid_field", "fail_rate: a number within 0..1")
        self.server.latency_ms, self.server.fail_rate = latency, float(rate)
        return 200, {"latency_ms": latency, "fail_rate": float(rate)}

    def _read_body(self) -> dict:
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self.close_connection = True
            raise ApiError(411, "length_required", "Content-Length: required") from None
        if not 0 <= length <= MAX_BODY:
            self.close_connection = True
            raise ApiError(413, "too_large", f"Content-Length: must be 0..{MAX_BODY}")
        raw = self.rfile.read(length)
        try:
            body = json.loads(raw) if raw else {}
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ApiError(400, "invalid_json", f"body: invalid JSON ({exc})") from None
        if not isinstance(body, dict):
            raise ApiError(400, "invalid_json", "body: a JSON object expected")
        return body

    def _send(self, status: int, answer: dict) -> None:
        data = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_request(self, code="-", size="-"):
        """Silenced: _handle writes one line per request."""


def command(name: str, make_server, default_port: int, env_prefix: str):
    """`python -m demo.<platform> --db PATH [--host H] [--port N]`: serve until SIGTERM/SIGINT."""
    import click

    from demo.legacy_erp.server import serve_until_signalled

    @click.command(name=name)
    @click.option("--db", "db_path", required=True, envvar=f"{env_prefix}_DB", help="SQLite file (created).")
    @click.option("--host", default="127.0.0.1", show_default=True, envvar=f"{env_prefix}_HOST")
    @click.option("--port", default=default_port, show_default=True, type=click.IntRange(0, 65535),
                  envvar=f"{env_prefix}_PORT", help="0 picks a free port (logged at start).")
    def serve(db_path: str, host: str, port: int):
        serve_until_signalled(make_server(db_path, host, port))

    return serve
