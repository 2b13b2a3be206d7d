"""Helpers for tests that run retailbus components as real processes."""
from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import amqp
import yaml

from bus.publisher import connection_params
from services.broker.setup import free_ports


class _Unresolved(yaml.SafeLoader):
    """Keeps `${NAME:default}` as written: once nameko's YAML parser is set up in this
    process (any load_config), plain safe_load would bake this process's environment
    (e.g. WEB_SERVER_ADDRESS's default) into the copy."""


for _tag in ("!env_var", "!raw_env_var"):
    _Unresolved.add_constructor(_tag, lambda loader, node: loader.construct_scalar(node))


def read_config(path: Path) -> dict:
    """A bus.yaml as written, `${NAME:default}` kept (to edit and write back)."""
    return yaml.load(path.read_text(), Loader=_Unresolved)


def write_config(root: Path, amqp_uri: str = "", legacy_db: str | None = None, per_message_logs: bool = False,
                 **retailbus) -> Path:
    """A bus.yaml in `root/config/` like the shipped one, with test ports and paths;
    `per_message_logs`: the agent's and the handlers' per-message lines (DEBUG) are logged."""
    shipped = read_config(Path(__file__).parents[2] / "config" / "bus.yaml")
    config = {key: value for key, value in shipped.items() if key != "RETAILBUS"}
    if per_message_logs:
        config["LOGGING"] = {**config["LOGGING"], "loggers": {
            name: {"level": "DEBUG"} for name in ("routing.store_agent", "bus.consumer")}}
    config["AMQP_URI"] = amqp_uri or "${RETAILBUS_AMQP_URI:}"
    config["LEGACY_DB_URI"] = legacy_db or f"sqlite:///{root / 'var' / 'legacy_erp.db'}"
    # the simulated platforms `retailbus up` starts: on free ports, so concurrent tests never clash
    platforms = {name: {"http": f"127.0.0.1:{port}", "db": f"var/{name}.db"}
                 for name, port in zip(("loyalty_platform", "crm"), free_ports(2))}
    config["RETAILBUS"] = {"root": str(root), **platforms, **retailbus}
    path = root / "config" / "bus.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    # agents start from routes.yaml until a table is applied; the services refuse to start without theirs
    for name in ("routes.yaml", "loyalty.yaml", "cases.yaml", "returns.yaml", "customers.yaml"):
        copy = path.with_name(name)
        if not copy.exists():
            copy.write_text((Path(__file__).parents[2] / "config" / name).read_text())
    return path


def nameko_run(config: Path, module: str, log: Path, **env) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "nameko", "run", "--config", str(config), module],
        env={**os.environ, **env}, stdout=log.open("ab"), stderr=subprocess.STDOUT,
        cwd=config.parent.parent, start_new_session=True)


def stop(process: subprocess.Popen, timeout: float = 30) -> int:
    """SIGTERM the process we started (by its pid), then SIGKILL if it hangs."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            return process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
    return process.wait()


def queue_state(uri: str, queue: str) -> tuple[int, int]:
    """(messages, consumers) of a queue on the broker; (0, 0) when it does not exist."""
    conn = amqp.Connection(**connection_params(uri, 5))
    conn.connect()
    try:
        ok = conn.channel().queue_declare(queue, passive=True)
        return ok.message_count, ok.consumer_count
    except amqp.exceptions.NotFound:
        return 0, 0
    finally:
        conn.collect()


def wait_for(predicate, timeout: float = 30.0, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return predicate()


def legacy_sale(txn_id: str, store: str = "S001", sku: str = "100001", qty: int = 2, price: int = 1999) -> dict:
    total = qty * price
    return {"STORE": store, "TERMINAL": "07", "TXN_ID": txn_id, "TXN_DATE": "20261127",
            "TXN_TIME": "101500", "CURRENCY": "EUR",
            "LINES": [{"SKU": sku, "QTY": qty, "PRICE": price, "DISC": 0, "LINE": total}],
            "TENDERS": [{"TYPE": "CASH", "AMOUNT": total}], "TOTAL": total}


def nothing_in_flight(broker, queue: str, outbox_depths) -> bool:
    """True once no message for `queue` can still land: every store agent's outbox is
    confirmed (each depth 0; None: an agent that does not answer) and `queue` and its
    retry queues hold no message, ready or unacknowledged (a handler acks after its commit)."""
    if any(depth != 0 for depth in outbox_depths):
        return False
    return all(q["messages"] == 0 for q in broker.queues()
               if q["name"] == queue or q["name"].startswith(f"{queue}.retry."))


class Platform:
    """A simulated SaaS platform (demo.loyalty_platform, demo.crm) as its own process."""

    def __init__(self, module: str, db, port: int):
        self.db, self.url = db, f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen([sys.executable, "-m", module, "--db", str(db), "--port", str(port)],
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:
            try:
                if self.call("GET", "/health")[0] == 200:
                    return
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise
                time.sleep(0.05)

    def call(self, method: str, path: str, body: dict | None = None, key: str | None = None):
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method)
        request.add_header("Content-Type", "application/json")
        if key:
            request.add_header("Idempotency-Key", key)
        try:
            with urllib.request.urlopen(request, timeout=30) as answer:
                return answer.status, json.loads(answer.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def rows(self, sql: str, *args):
        with sqlite3.connect(self.db) as conn:
            return conn.execute(sql, args).fetchall()

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=15)


def purge_queues(uri: str, queues) -> None:
    """Messages another test of the session left on the shared broker are not ours."""
    conn = amqp.Connection(**connection_params(uri, 5))
    conn.connect()
    try:
        for queue in queues:
            try:
                conn.channel().queue_purge(queue)
            except amqp.exceptions.NotFound:
                pass
    finally:
        conn.collect()


class ServiceProcesses:
    """What an estate of real service processes does with them: each started by name as
    `nameko run` of its module and awaited until it consumes its queue, stopped (SIGTERM) or
    killed (SIGKILL), always by the pid it started. An estate sets `root`, `uri`, `config`,
    `processes` and the two maps below; its own `start` covers what is not a plain service."""

    modules: dict[str, str]   # name -> the service's module
    ready: dict[str, str]     # name -> the queue it consumes once it runs

    def purge(self, queues) -> None:
        purge_queues(self.uri, queues)

    def start(self, *names: str) -> None:
        """The named services (all, when none is named), each consuming its queue."""
        names = names or tuple(self.modules)
        for name in names:
            self.processes[name] = nameko_run(self.config, self.modules[name], self.root / f"{name}.log")
        for name in names:
            assert wait_for(lambda: queue_state(self.uri, self.ready[name])[1] >= 1, 120), self.log(name)

    def stop(self, name: str) -> None:
        stop(self.processes.pop(name))

    def kill(self, name: str) -> None:
        """SIGKILL, by the pid we started."""
        process = self.processes.pop(name)
        process.kill()
        process.wait()

    def log(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text()[-5000:] if path.exists() else ""

    def stop_all(self) -> None:
        for name in list(self.processes):
            try:
                self.stop(name)
            except Exception:  # a process that will not stop must not keep the others running
                pass


def metric(port: int, name: str, **labels) -> float | None:
    """A sample of a service's /metrics; None when not (yet) exported."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
            text = answer.read().decode()
    except OSError:
        return None
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    pattern = rf"^{re.escape(name)}(?:\{{{re.escape(want)}\}})? (\S+)$" if want else rf"^{re.escape(name)} (\S+)$"
    found = re.search(pattern, text, re.M)
    return float(found.group(1)) if found else None
