"""`retailbus up`: the whole bus on one machine, as child processes.

Each service runs under `nameko run` exactly as ops would run it alone, so
what works here works scaled out. A child that dies is restarted with
backoff; SIGTERM or Ctrl-C stops the children with SIGTERM (nameko finishes
the workers in flight, so nothing accepted is dropped) and waits for them.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from services.broker import credentials, users as broker_users
from services.broker.node import ManagedBroker
from services.broker.setup import write_private
from services.broker.cluster import BrokerCluster
from bus import partitions
from bus.metrics_http import ENV_PORT
from bus.settings import RetailbusSettings, load_config, retailbus_settings

log = logging.getLogger("retailbus.up")

STOP_GRACE_SECONDS = 30
TARGETS_FILE = Path("var/prometheus_targets.json")  # config/prometheus.yml's file_sd_configs read it


def scrape_targets(settings: RetailbusSettings) -> list[dict]:
    """What Prometheus scrapes (its file_sd format): every service process `up` runs that
    serves metrics (each of a service's K processes on its own port: `_instances`) and every
    store agent, labelled `service` as dashboards and alerts (config/alerts.yml) group them."""
    targets = []
    for name, service in settings.services.items():
        if service.metrics_port is None:
            continue
        for i in range(service.processes):
            port = service.metrics_port + 100 * i if service.processes > 1 else service.metrics_port
            labels = {"service": name, **({"process": f"{name}-{i}"} if service.processes > 1 else {})}
            targets.append({"targets": [f"127.0.0.1:{port}"], "labels": labels})
    if settings.stores:
        targets.append({"targets": [store.http for store in settings.stores], "labels": {"service": "store_agent"}})
    return targets


@dataclass
class Child:
    name: str
    argv: list[str]
    env: dict[str, str]
    health_url: str | None = None
    component: str | None = None  # whose broker user it runs as (default: its name)
    process: subprocess.Popen | None = None
    restarts: list[float] = field(default_factory=list)

    def start(self, cwd: Path):
        self.process = subprocess.Popen(self.argv, env=self.env, cwd=cwd, start_new_session=True)
        log.info("started %s (pid %d)", self.name, self.process.pid)


class Supervisor:
    def __init__(self, config_path: Path, config: dict, settings: RetailbusSettings, keep_broker: bool):
        self.config_path = config_path.resolve()
        self.config = config
        self.settings = settings
        self.keep_broker = keep_broker
        self.children: list[Child] = []
        self._stopping = False

    @classmethod
    def from_config(cls, config_path: str, keep_broker: bool = False) -> "Supervisor":
        path = Path(config_path)
        config = load_config(path)
        return cls(path, config, retailbus_settings(config, path), keep_broker)

    def run(self) -> int:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s retailbus up: %(message)s")
        broker, uri = self._broker()
        self.children = self._children(uri)
        write_private(self.settings.path(TARGETS_FILE), json.dumps(scrape_targets(self.settings), indent=1), 0o644)
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        try:
            for child in self.children:
                child.start(self.settings.root)
            self._announce()
            while not self._stopping:
                self._restart_dead()
                time.sleep(0.5)
        finally:
            self._stop_children()
            if broker is not None and not self.keep_broker:
                broker.stop()
        log.info("stopped cleanly")
        return 0

    def _on_signal(self, signum, _frame):
        log.info("received %s, stopping", signal.Signals(signum).name)
        self._stopping = True

    def _broker(self) -> tuple[ManagedBroker | BrokerCluster | None, str]:
        external = os.environ.get("RETAILBUS_AMQP_URI") or self.config.get("AMQP_URI")
        if external:
            log.info("using the broker at RETAILBUS_AMQP_URI / AMQP_URI")
            return None, external
        kind = BrokerCluster if self.settings.broker.nodes > 1 else ManagedBroker  # RETAILBUS.broker.nodes
        broker = kind.from_settings(self.settings)
        already = broker.is_running()
        broker.start()
        log.info("broker %s at %s", "already running" if already else "started", broker.uri(show_password=False))
        return (None if already else broker), broker.uri()

    def _children(self, uri: str) -> list[Child]:
        s = self.settings
        (s.root / "var").mkdir(exist_ok=True)
        dsn = s.absolute_dsn(self.config.get("LEGACY_DB_URI") or "sqlite:///var/legacy_erp.db")
        env = {**os.environ, "RETAILBUS_AMQP_URI": uri, "RETAILBUS_LEGACY_DB": dsn,
               # nameko 2.14 runs on eventlet; its deprecation notice is noise in our logs
               "PYTHONWARNINGS": "ignore::Warning:nameko.cli.commands"}
        host, port = s.legacy_erp.http.rsplit(":", 1)
        children = [Child(
            "legacy-erp",
            [sys.executable, "-m", "demo.legacy_erp", "serve", "--init", "--db", dsn,
             "--host", host, "--port", port],
            env, health_url=f"http://{s.legacy_erp.http}/erp/health")]
        platform_env = {k: v for k, v in env.items() if k != "RETAILBUS_AMQP_URI"}  # they never touch the bus
        for name, module, platform in (("loyalty-platform", "demo.loyalty_platform", s.loyalty_platform),
                                       ("crm", "demo.crm", s.crm)):
            p_host, p_port = platform.http.rsplit(":", 1)
            children.append(Child(name, [sys.executable, "-m", module, "--db", str(s.path(platform.db).absolute()),
                                         "--host", p_host, "--port", p_port],
                                  platform_env, health_url=f"http://{platform.http}/health"))
        # `nameko run`, psycopg2 made green only in a process that imports it (bus/runner.py)
        nameko = [sys.executable, "-m", "bus.runner", "--config", str(self.config_path)]
        # The bus services resolve only the broker's and databases' hosts, once per
        # connect, so they run eventlet without its green DNS (dnspython, ~7-11 MiB per
        # process); a lookup then blocks the hub for its duration. The store agents,
        # which open HTTP connections per request, keep it.
        service_env = {"EVENTLET_NO_GREENDNS": "yes", **env}
        for name, service in s.services.items():
            own_env = {**service_env, "WEB_SERVER_ADDRESS": service.http} if service.http else service_env
            children += self._instances(name, nameko + [service.module], own_env, service.processes,
                                        service.metrics_port)
        for store in s.stores:
            children.append(Child(
                f"store-agent-{store.id}", nameko + ["routing.store_agent"],
                {**env, "RETAILBUS_STORE": store.id, "WEB_SERVER_ADDRESS": store.http},
                health_url=f"http://{store.http}/healthz"))
        own_users = False
        for child in children:  # its own broker user once `retailbus broker users` made one
            own = credentials.own_uri(s, uri, child.component or child.name)
            if own:
                child.env = {**child.env, "RETAILBUS_AMQP_URI": own}
                own_users = True
        if own_users:  # they may not declare: the bus's own user does, before they start
            broker_users.declare_topology(uri, broker_users.components(s, self.config), s.queue_type)
        return children

    @staticmethod
    def _instances(name: str, argv: list[str], env: dict, processes: int, metrics_port: int | None) -> list[Child]:
        """`processes` copies of a service; each knows which one it is (its partitions,
        bus/partitions.py) and serves its metrics on a port of its own."""
        if processes == 1:
            return [Child(name, argv, env)]
        return [Child(f"{name}-{i}", argv, {**env, partitions.ENV_INSTANCE: f"{i}/{processes}",
                                            **({ENV_PORT: str(metrics_port + 100 * i)} if metrics_port else {})},
                      component=name) for i in range(processes)]

    def _announce(self, timeout: float = 60.0):
        deadline = time.monotonic() + timeout
        for child in self.children:
            while child.health_url and not self._stopping and time.monotonic() < deadline:
                try:
                    urllib.request.urlopen(child.health_url, timeout=1).read()
                    break
                except OSError:
                    time.sleep(0.2)
        stores = ", ".join(f"{s.id} http://{s.http}" for s in self.settings.stores)
        log.info("retailbus is up: store agents %s; legacy ERP http://%s", stores, self.settings.legacy_erp.http)

    def _restart_dead(self):
        now = time.monotonic()
        for child in self.children:
            code = child.process.poll()
            if code is None:
                continue
            child.restarts = [t for t in child.restarts if now - t < 60]
            delay = min(30, 2 ** len(child.restarts))
            log.warning("%s exited with %s; restarting in %ds", child.name, code, delay)
            child.restarts.append(now)
            time.sleep(delay)
            if not self._stopping:
                child.start(self.settings.root)

    def _stop_children(self):
        running = [c for c in self.children if c.process and c.process.poll() is None]
        for child in running:
            child.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        for child in running:
            try:
                child.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in %ds; killing it", child.name, STOP_GRACE_SECONDS)
                child.process.kill()
                child.process.wait()
