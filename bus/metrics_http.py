"""`GET /metrics` for services that have no web server of their own.

Every service declares `metrics = MetricsHttp()`; the port comes from
`RETAILBUS.services.<service name>.metrics_port` in bus.yaml (what
`retailbus up` and config/prometheus.yml use), or `RETAILBUS_METRICS_PORT`
for one more instance of a service on the same host. No port: nothing is
served. The registry is the process's, so one port shows every metric the
process defines (the store agent serves the same at `/metrics` on its HTTP).

A port already taken is logged as an error and the service keeps running:
posting sales matters more than exporting their counts, and Prometheus'
`up == 0` for the target (alert RetailbusTargetDown) makes the loss visible.
"""
from __future__ import annotations

import logging
import os
from functools import partial

import eventlet
from eventlet import wsgi
from nameko.extensions import DependencyProvider
from prometheus_client import make_wsgi_app

from bus.settings import retailbus_settings

log = logging.getLogger(__name__)

HOST = "127.0.0.1"  # scraped by a Prometheus on the same host (config/prometheus.yml)
ENV_PORT = "RETAILBUS_METRICS_PORT"


def metrics_port(config: dict, service_name: str) -> int | None:
    """The port this service's metrics are served on, or None."""
    override = os.environ.get(ENV_PORT)
    if override:
        try:
            return int(override) or None
        except ValueError:
            raise ValueError(f"{ENV_PORT}: {override!r} is not a port number") from None
    service = retailbus_settings(config).services.get(service_name)
    return service.metrics_port if service is not None else None


class MetricsHttp(DependencyProvider):
    """Serves the process's Prometheus registry over HTTP while the service runs."""

    def __init__(self):
        self.port: int | None = None
        self._sock = None
        self._server = None

    def setup(self):
        self.port = metrics_port(self.container.config, self.container.service_name)

    def start(self):
        if self.port is None:
            return
        try:
            # no SO_REUSEPORT: a second instance on the port must fail, not share the scrapes
            self._sock = eventlet.listen((HOST, self.port), reuse_port=False)
        except OSError as exc:
            log.error("metrics of %s not served: %s:%d: %s", self.container.service_name, HOST,
                      self.port, exc.strerror)
            return
        self._server = self.container.spawn_managed_thread(
            partial(wsgi.server, self._sock, make_wsgi_app(), log_output=False),
            identifier="metrics_http")
        log.info("metrics of %s at http://%s:%d/metrics", self.container.service_name, HOST, self.port)

    def stop(self):
        if self._server is not None:
            self._server.kill()
            self._server = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    kill = stop
