"""`pos_http`: the store agent's HTTP entrypoint, a lighter `nameko.web` `@http`.

In legacy mode a till waits on the agent's extra HTTP hop for every sale, so
the hop's own cost is the routing layer's latency (issue 3: under 2 ms p50
over calling the ERP directly). Same shape as `nameko.web`: one
`SharedExtension` serving `WEB_SERVER_ADDRESS`, and an `Entrypoint` per
(method, path) whose service method takes a werkzeug `Request` and returns a
werkzeug `Response`, run as a nameko worker. What it leaves out, for
latency (bench/README.md, bench_routing):

- `eventlet.wsgi` and its `email`-based header parsing: routing/http11.py
  reads the request and writes the response in one send;
- werkzeug's routing `Map`: the agent serves fixed paths, so a dict lookup;
- signature checks and result coercion per call: every agent method returns
  a `Response`.

Unknown paths and methods, unreadable requests and a service method that
raises are answered in the agent API's error shape
(`{"STATUS": "ERROR", "MESSAGE": ...}`).
"""
from __future__ import annotations

import json
import logging
import socket
import sys
from functools import partial

import eventlet
from eventlet.event import Event
from nameko.exceptions import ContainerBeingKilled
from nameko.extensions import Entrypoint, ProviderCollector, SharedExtension
from nameko.web.server import parse_address
from werkzeug.wrappers import Request, Response

from routing import http11

log = logging.getLogger(__name__)

ADDRESS_KEY = "WEB_SERVER_ADDRESS"  # nameko's key: config, `retailbus up` and tests set it already


def error(status: int, message: str, headers=None) -> Response:
    return Response(json.dumps({"STATUS": "ERROR", "MESSAGE": message}), status=status, headers=headers,
                    mimetype="application/json")


class PosHttpServer(ProviderCollector, SharedExtension):
    """Accepts connections and hands each request to the entrypoint of its (method, path)."""

    def __init__(self):
        super().__init__()
        self._sock = None
        self._acceptor = None
        self._accepting = False
        self._routes: dict[str, dict[str, "PosRoute"]] = {}
        self._base: dict = {}

    def start(self):
        if self._sock is not None:  # shared: the first entrypoint's start binds
            return
        address = parse_address(self.container.config.get(ADDRESS_KEY, "0.0.0.0:8000"))
        for provider in self._providers:
            self._routes.setdefault(provider.path, {})[provider.method] = provider
        self._sock = eventlet.listen(address)
        host, port = self._sock.getsockname()[:2]
        self._base = {"SERVER_NAME": host, "SERVER_PORT": str(port), "wsgi.url_scheme": "http",
                      "wsgi.version": (1, 0), "wsgi.multithread": True, "wsgi.multiprocess": False,
                      "wsgi.run_once": False, "wsgi.errors": sys.stderr}
        self._accepting = True
        self._acceptor = self.container.spawn_managed_thread(self._accept, identifier="pos_http")

    def _accept(self):
        while self._accepting:
            try:
                sock, address = self._sock.accept()
            except OSError:
                if not self._accepting:
                    return  # the listening socket was closed by stop
                raise
            # like nameko.web: one managed thread per connection, killed with the container
            self.container.spawn_managed_thread(partial(self._serve, sock, address), identifier="pos_http_conn")

    def _serve(self, sock, address):
        """Requests of one connection, in turn, until the client closes it or asks to."""
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        rfile = sock.makefile("rb")
        continue_ = partial(sock.sendall, b"HTTP/1.1 100 Continue\r\n\r\n")
        try:
            while True:
                try:
                    environ = http11.read_request(rfile, continue_)
                except http11.BadRequestError as exc:
                    response = error(exc.status, str(exc))
                    sock.sendall(http11.response_bytes(response.status, response.headers.to_wsgi_list(),
                                                       response.get_data(), keep=False))
                    return
                if environ is None:
                    return
                environ.update(self._base)
                environ["REMOTE_ADDR"], environ["REMOTE_PORT"] = str(address[0]), str(address[1])
                try:
                    response = self.dispatch(environ)
                except Exception:  # a bug here must not take the agent down: answer, log, go on
                    log.exception("%s %s failed", environ["REQUEST_METHOD"], environ["PATH_INFO"])
                    response = error(500, "internal error; see the agent's log")
                keep = http11.keep_alive(environ)
                sock.sendall(http11.response_bytes(
                    response.status, response.headers.to_wsgi_list(), response.get_data(),
                    head=environ["REQUEST_METHOD"] == "HEAD", keep=keep,
                    http10=environ["SERVER_PROTOCOL"] == "HTTP/1.0"))
                if not keep:
                    return
        except OSError as exc:  # the client went away mid-request: nothing to answer
            log.debug("connection from %s ended: %s", address, exc)
        except Exception:  # a managed thread that raises kills the container: one connection must not
            log.exception("connection from %s dropped", address)
        finally:
            rfile.close()
            sock.close()

    def dispatch(self, environ: dict) -> Response:
        methods = self._routes.get(environ["PATH_INFO"])
        if not methods:
            return error(404, f"no such path: {environ['PATH_INFO']}")
        method = environ["REQUEST_METHOD"]
        route = methods.get(method) or (methods.get("GET") if method == "HEAD" else None)  # as werkzeug
        if route is None:
            allowed = ", ".join(sorted(methods))
            return error(405, f"method {method} not allowed here (allowed: {allowed})", headers={"Allow": allowed})
        return route.handle_request(Request(environ))

    def stop(self):
        self._accepting = False
        if self._acceptor is not None:  # waiting in accept: closing the socket would not wake it
            self._acceptor.kill()
        if self._sock is not None:
            self._sock.close()
        super().stop()


class PosRoute(Entrypoint):
    """`@pos_http("POST", "/erp/sales")`: the decorated method gets the werkzeug Request."""

    server = PosHttpServer()

    def __init__(self, method: str, path: str, **kwargs):
        self.method, self.path = method, path
        super().__init__(**kwargs)

    def setup(self):
        self.server.register_provider(self)

    def stop(self):
        self.server.unregister_provider(self)
        super().stop()

    def handle_request(self, request: Request) -> Response:
        done = Event()
        try:
            self.container.spawn_worker(self, (request,), {}, handle_result=partial(self._result, done))
        except ContainerBeingKilled:
            return error(503, "the store agent is stopping; retry")
        return done.wait()

    def _result(self, done: Event, worker_ctx, result, exc_info):
        if exc_info is not None:  # nameko has logged it with the traceback
            done.send(error(500, f"internal error ({exc_info[0].__name__}); see the agent's log"))
        elif not isinstance(result, Response):
            done.send(error(500, f"internal error: {self.method_name} returned {type(result).__name__}"))
        else:
            done.send(result)
        return result, exc_info


pos_http = PosRoute.decorator
