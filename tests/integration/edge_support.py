"""A real store agent process for the edge tests (tests/integration/test_agent_edge.py,
tests/chaos/test_edge_fuzz.py): its config, its terminal key, raw HTTP to it, and a
legacy ERP stand-in that records every byte the agent forwards to it."""
from __future__ import annotations

import json
import socket
import urllib.request
from pathlib import Path

import eventlet

from routing.edge_auth import TerminalKeys, signed_headers
from tests.conftest import free_port
from tests.integration.support import legacy_sale, nameko_run, stop, wait_for, write_config

ROUTES = """version: 1
legacy:
  base_url: http://127.0.0.1:{legacy_port}
  timeout: 5
routes:
  - name: sales
    message: pos.sale.v1
    legacy: POST /erp/sales
    mode: {mode}
  - name: returns
    message: pos.return.v1
    legacy: POST /erp/returns
    mode: {mode}
  - name: stock
    message: pos.stock_query.v1
    legacy: GET /erp/stock
    mode: {mode}
"""


class Agent:
    """`routing.store_agent` for store S001, run as `nameko run` (stopped by its pid)."""

    def __init__(self, root: Path, amqp_uri: str, mode: str = "bus", legacy_port: int = 9, **agent_settings):
        self.root, self.port = root, free_port()
        routes = root / "config" / "routes.yaml"
        routes.parent.mkdir(parents=True, exist_ok=True)
        routes.write_text(ROUTES.format(legacy_port=legacy_port, mode=mode))
        config = write_config(root, amqp_uri, stores=[{"id": "S001", "http": f"127.0.0.1:{self.port}"}],
                              agent=agent_settings)
        self.outbox = root / "var" / "stores" / "S001" / "outbox.db"
        self.key = bytes.fromhex(TerminalKeys(self.outbox.parent / "terminal_keys.json").add("07"))
        self.log = root / "agent.log"
        self.process = nameko_run(config, "routing.store_agent", self.log, RETAILBUS_STORE="S001",
                                  WEB_SERVER_ADDRESS=f"127.0.0.1:{self.port}")
        assert wait_for(lambda: self.healthz() is not None, timeout=60), self.log.read_text()[-3000:]

    def healthz(self) -> dict | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=5) as response:
                return json.loads(response.read())
        except OSError:
            return None

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")

    def open_fds(self) -> int:
        return len(list(Path(f"/proc/{self.process.pid}/fd").iterdir()))

    def stop(self):
        stop(self.process)

    def sale(self, txn_id: str) -> bytes:
        """A signed POST /erp/sales, as raw bytes."""
        return self.signed("POST", "/erp/sales", json.dumps(legacy_sale(txn_id)).encode())

    def signed(self, method: str, target: str, body: bytes = b"",
               content_type: str = "application/json") -> bytes:
        headers = signed_headers("07", self.key, method, target, body)
        head = f"{method} {target} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
        if method == "POST":
            head += f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
        head += "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        return (head + "\r\n").encode("latin-1") + body

    def exchange(self, data: bytes, half_close: bool = True, timeout: float = 30) -> bytes:
        """Send raw bytes; everything the agent answers until it closes the connection."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as sock:
            sock.sendall(data)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
            return read_all(sock)


def read_all(sock) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def status_of(raw: bytes) -> int:
    assert raw.startswith(b"HTTP/1.1 ") and raw[12:13] == b" ", raw[:200]
    return int(raw[9:12])


def body_of(raw: bytes) -> dict:
    return json.loads(raw.split(b"\r\n\r\n", 1)[1])


class RecordingErp:
    """A legacy ERP stand-in on a free port: answers every request 200 with a document
    number and keeps each request's raw head and body, as the agent sent them."""

    def __init__(self):
        self.requests: list[bytes] = []
        self._sock = eventlet.listen(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self._server = eventlet.spawn(self._accept)

    def _accept(self):
        while True:
            conn, _ = self._sock.accept()
            eventlet.spawn(self._serve, conn)

    def _serve(self, conn):
        rfile = conn.makefile("rb")
        try:
            while True:
                head = b""
                while not head.endswith(b"\r\n\r\n"):
                    line = rfile.readline(65536)
                    if not line:
                        return
                    head += line
                length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                self.requests.append(head + rfile.read(length))
                answer = json.dumps({"STATUS": "OK", "DOC_NO": f"D{len(self.requests)}"}).encode()
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                             % (len(answer), answer))
        except OSError:
            pass
        finally:
            rfile.close()
            conn.close()

    def close(self):
        self._server.kill()
        self._sock.close()
