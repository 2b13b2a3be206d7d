"""`DrainingServer`: a threading HTTP server that stops without cutting a request short.

Every simulated system of the estate (the legacy ERP, the loyalty platform, the CRM)
is one: idle keep-alive connections do not hold up shutdown (daemon threads), while
requests being processed are counted and waited for by `drain()`.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from http.server import ThreadingHTTPServer

DRAIN_SECONDS = 10.0


class DrainingServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, handler):
        super().__init__(address, handler)
        self._busy = 0
        self._idle = threading.Condition()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    @contextmanager
    def busy(self):
        with self._idle:
            self._busy += 1
        try:
            yield
        finally:
            with self._idle:
                self._busy -= 1
                self._idle.notify_all()

    def drain(self, timeout: float = DRAIN_SECONDS) -> bool:
        """Wait for in-flight requests to finish; False if some did not."""
        with self._idle:
            return self._idle.wait_for(lambda: self._busy == 0, timeout)
