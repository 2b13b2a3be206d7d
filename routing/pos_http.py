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

One client must not take the store's till traffic down with it, so the
server bounds what each connection may hold (`RETAILBUS.agent`): a body over
`max_body` is refused before it is read, a request head or body that does
not arrive in time is answered 408, a connection idle too long is closed,
connections beyond `max_connections` are answered 503 and closed, and when
the process runs out of file descriptors `accept()` backs off and tries
again instead of ending the container (and the forwarder in it).
"""
from __future__ import annotations

import errno
import json
import logging
import resource
import socket
import sys
import time
from functools import partial

import eventlet
from eventlet.event import Event
from nameko.exceptions import ContainerBeingKilled
from nameko.extensions import Entrypoint, ProviderCollector, SharedExtension
from nameko.web.server import parse_address
from prometheus_client import Counter, Gauge
from werkzeug.wrappers import Request, Response

from bus.settings import retailbus_settings
from routing import http11

log = logging.getLogger(__name__)

ADDRESS_KEY = "WEB_SERVER_ADDRESS"  # nameko's key: config, `retailbus up` and tests set it already
ACCEPT_BACKOFF = (0.01, 1.0)  # seconds between accept() retries after a failure: first, at most
FD_RESERVE = 64  # descriptors the agent needs besides its POS connections (outbox, broker, threads)
LINGER_SECONDS, LINGER_BYTES = 2.0, 1 << 20  # read and dropped after a refusal, so the answer is not reset

CONNECTIONS = Gauge("retailbus_agent_http_connections", "Open POS connections of this agent")
REFUSED = Counter("retailbus_agent_http_refused_total",
                  "POS connections and requests refused before a handler ran", ["status"])
ACCEPT_ERRORS = Counter("retailbus_agent_http_accept_errors_total",
                        "accept() failures (EMFILE: out of file descriptors, ...)", ["error"])


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
        self._open = 0
        self._logged_at, self._unlogged = float("-inf"), 0
        self.limits = None

    def start(self):
        if self._sock is not None:  # shared: the first entrypoint's start binds
            return
        address = parse_address(self.container.config.get(ADDRESS_KEY, "0.0.0.0:8000"))
        self.limits = retailbus_settings(self.container.config).agent
        descriptors = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if descriptors != resource.RLIM_INFINITY and self.limits.max_connections + FD_RESERVE > descriptors:
            log.warning("max_connections %d leaves under %d of the process's %d file descriptors for the "
                        "rest of the agent: accept() will meet EMFILE first (raise `ulimit -n`)",
                        self.limits.max_connections, FD_RESERVE, descriptors,
                        extra={"id": None, "correlationid": None})
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
        """A managed thread that raises kills the container, forwarder included: every
        failure of accept() (EMFILE above all) is logged, counted and retried after a pause."""
        backoff = ACCEPT_BACKOFF[0]
        while self._accepting:
            try:
                sock, address = self._sock.accept()
            except Exception as exc:
                if not self._accepting:
                    return  # the listening socket was closed by stop
                ACCEPT_ERRORS.labels(errno.errorcode.get(getattr(exc, "errno", None), type(exc).__name__)).inc()
                if backoff == ACCEPT_BACKOFF[0]:  # once per run of failures, not per retry
                    log.error("accept() failed, retrying with backoff: %s", exc,
                              extra={"id": None, "correlationid": None})
                eventlet.sleep(backoff)
                backoff = min(backoff * 2, ACCEPT_BACKOFF[1])
                continue
            backoff = ACCEPT_BACKOFF[0]
            if self._open >= self.limits.max_connections:
                self._refuse(sock)
                continue
            self._open += 1
            CONNECTIONS.set(self._open)
            # like nameko.web: one managed thread per connection, killed with the container
            self.container.spawn_managed_thread(partial(self._serve, sock, address), identifier="pos_http_conn")

    def _refuse(self, sock):
        """503 without a thread: what the client already sent is read first, so closing
        does not reset the connection before it can read the answer."""
        REFUSED.labels("503").inc()
        response = error(503, f"the store agent has {self.limits.max_connections} connections open; retry",
                         headers={"Retry-After": "1"})
        try:
            sock.settimeout(0.0)
            try:
                sock.recv(65536)
            except OSError:
                pass  # nothing sent yet
            sock.send(http11.response_bytes(response.status, response.headers.to_wsgi_list(),
                                            response.get_data(), keep=False))
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        finally:
            sock.close()

    def _serve(self, sock, address):
        """Requests of one connection, in turn, until the client closes it or asks to."""
        limits = self.limits
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        rfile = sock.makefile("rb")
        send = partial(_send, sock, limits.body_timeout)
        continue_ = partial(send, b"HTTP/1.1 100 Continue\r\n\r\n")
        try:
            while _within(limits.idle_timeout, rfile.peek, 1, default=b""):
                try:
                    environ = _within(limits.header_timeout, http11.read_head, rfile, default=TIMED_OUT)
                    if environ is TIMED_OUT:
                        raise http11.BadRequestError(408, f"request head not sent in {limits.header_timeout:g}s")
                    if environ is None:
                        return
                    read = _within(limits.body_timeout, http11.read_body, rfile, environ, continue_,
                                   limits.max_body, default=TIMED_OUT)
                    if read is TIMED_OUT:
                        raise http11.BadRequestError(408, f"request body not sent in {limits.body_timeout:g}s")
                except http11.BadRequestError as exc:
                    REFUSED.labels(str(exc.status)).inc()
                    self._note_refusal(address, exc)
                    response = error(exc.status, str(exc))
                    send(http11.response_bytes(response.status, response.headers.to_wsgi_list(),
                                               response.get_data(), keep=False))
                    _linger(sock)
                    return
                environ.update(self._base)
                environ["REMOTE_ADDR"], environ["REMOTE_PORT"] = str(address[0]), str(address[1])
                try:
                    response = self.dispatch(environ)
                except Exception:  # a bug here must not take the agent down: answer, log, go on
                    log.exception("%s %s failed", environ["REQUEST_METHOD"], environ["PATH_INFO"])
                    response = error(500, "internal error; see the agent's log")
                keep = http11.keep_alive(environ)
                send(http11.response_bytes(
                    response.status, response.headers.to_wsgi_list(), response.get_data(),
                    head=environ["REQUEST_METHOD"] == "HEAD", keep=keep,
                    http10=environ["SERVER_PROTOCOL"] == "HTTP/1.0"))
                if not keep:
                    return
        except OSError as exc:  # the client went away, or does not take its answers: nothing to do
            log.debug("connection from %s ended: %s", address, exc)
        except Exception:  # a managed thread that raises kills the container: one connection must not
            log.exception("connection from %s dropped", address)
        finally:
            self._open -= 1
            CONNECTIONS.set(self._open)
            rfile.close()
            sock.close()

    def _note_refusal(self, address, exc: http11.BadRequestError):
        """Log a refused request, at most one line a second: a client sending garbage
        in a loop must not fill the disk the outbox lives on (the metric counts all)."""
        now = time.monotonic()
        if now - self._logged_at < 1.0:
            self._unlogged += 1
            return
        more = f" ({self._unlogged} more refused since the last line)" if self._unlogged else ""
        self._logged_at, self._unlogged = now, 0
        log.info("refused a request from %s: %s %s%s", address[0], exc.status, exc, more,
                 extra={"id": None, "correlationid": None})

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


TIMED_OUT = object()


def _within(seconds: float, fn, *args, default=None):
    """`fn(*args)`, or `default` when it takes longer than `seconds` (a green timeout:
    a client trickling one byte at a time cannot stretch it, unlike a socket timeout)."""
    timer = eventlet.Timeout(seconds)
    try:
        return fn(*args)
    except eventlet.Timeout as exc:
        if exc is not timer:
            raise
        return default
    finally:
        timer.cancel()


def _send(sock, seconds: float, data: bytes):
    """`sendall` that raises socket.timeout (an OSError) when the client has not taken
    `data` within `seconds`: a socket timeout, set for the send only (reads have their
    own green deadlines), costs less per request than another green timer."""
    sock.settimeout(seconds)
    try:
        sock.sendall(data)
    finally:
        sock.settimeout(None)


def _linger(sock):
    """Half-close, then read and drop what the client still sends, for a while: closing
    with unread data resets the connection, and the client may lose the answer."""
    try:
        sock.shutdown(socket.SHUT_WR)
        _within(LINGER_SECONDS, _drain, sock)
    except OSError:
        pass


def _drain(sock):
    dropped = 0
    while dropped < LINGER_BYTES:
        data = sock.recv(65536)
        if not data:
            return
        dropped += len(data)


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
