"""A whole routing estate as real processes for the routing tests: a broker node
of its own, the demo legacy ERP (HTTP + SQLite), the erp service, two store
agents and, on demand, the route guard. POS calls are unsigned
(`RETAILBUS.agent.auth_required: false`): signing is tested elsewhere."""
from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import eventlet
import yaml

from demo.legacy_erp.schema import create_schema, engine_for, seed_demo_data
from routing.control import RouteRegistry, apply_table
from bus import journal, topology
from tests.conftest import free_ports, start_broker
from tests.integration.support import (legacy_sale, nameko_run, nothing_in_flight, queue_state, read_config, stop,
                                       wait_for, write_config)

STORES = ("S001", "S002")
SALES_QUEUE = topology.handler_queue("store_agent", "pos.sale.v1", "erp", "on_pos_sale")


def table_text(version: int, erp_port: int, sales: str = "mode: legacy", timeout: float = 5) -> str:
    return f"""version: {version}
legacy:
  base_url: http://127.0.0.1:{erp_port}
  timeout: {timeout}
routes:
  - name: sales
    message: pos.sale.v1
    legacy: POST /erp/sales
    on_legacy_failure: queue
    {sales}
  - name: stock
    message: pos.stock_query.v1
    legacy: GET /erp/stock
    mode: legacy
"""


class Estate:
    def __init__(self, root: Path):
        self.root = root
        self.broker = start_broker(root / "broker")
        self.legacy_db = root / "legacy_erp.db"
        engine = engine_for(f"sqlite:///{self.legacy_db}")
        create_schema(engine)
        with engine.begin() as conn:
            seed_demo_data(conn)
        engine.dispose()
        *agent_ports, self.erp_port, guard_metrics = free_ports(4)
        self.ports = dict(zip(STORES, agent_ports))
        self.version = 1
        (root / "config").mkdir(parents=True, exist_ok=True)
        (root / "config" / "routes.yaml").write_text(table_text(1, self.erp_port))
        self.config = write_config(
            root, self.broker.uri(), legacy_db=f"sqlite:///{self.legacy_db}",
            retry={"delays": [1, 2, 5], "prefetch": 64},
            stores=[{"id": s, "http": f"127.0.0.1:{self.ports[s]}"} for s in STORES],
            agent={"auth_required": False}, journal={"flush_seconds": 0.1},
            legacy_erp={"http": f"127.0.0.1:{self.erp_port}"},
            services={"erp": {"module": "services.erp"},
                      "route_guard": {"module": "routing.guard", "metrics_port": guard_metrics}},
            routes_file="config/routes.yaml", routes_state="var/routes")
        config = read_config(self.config)
        config.update(SHADOW_RPC_TIMEOUT=2, ROUTE_GUARD_MIN_SAMPLES=10)
        self.config.write_text(yaml.safe_dump(config, sort_keys=False))
        self.guard_metrics = guard_metrics
        self.registry = RouteRegistry(root / "var" / "routes")
        self.processes: dict[str, subprocess.Popen] = {}

    def env(self, **extra) -> dict:
        return {"RETAILBUS_AMQP_URI": self.broker.uri(), **extra}

    # processes -------------------------------------------------------------
    def start_legacy_erp(self):
        self.processes["legacy"] = subprocess.Popen(
            [sys.executable, "-m", "demo.legacy_erp", "serve", "--db", f"sqlite:///{self.legacy_db}",
             "--port", str(self.erp_port)], stdout=(self.root / "legacy.log").open("ab"),
            stderr=subprocess.STDOUT, start_new_session=True)
        assert wait_for(lambda: self.get(f"http://127.0.0.1:{self.erp_port}/erp/health")[0] == 200,
                        timeout=30), self.log("legacy")

    def start_erp(self, module: str = "services.erp"):
        repo = str(Path(__file__).parents[2])  # a test module as the service: importable from the repo
        self.processes["erp"] = nameko_run(self.config, module, self.root / "erp.log", **self.env(PYTHONPATH=repo))
        assert wait_for(lambda: self.queue(SALES_QUEUE)[1] == 1, timeout=60), self.log("erp")

    def start_agent(self, store: str, broker_up: bool = True):
        self.processes[store] = nameko_run(
            self.config, "routing.store_agent", self.root / f"agent-{store}.log",
            **self.env(RETAILBUS_STORE=store, WEB_SERVER_ADDRESS=f"127.0.0.1:{self.ports[store]}"))
        assert wait_for(lambda: self.health(store) is not None, timeout=60), self.log(f"agent-{store}")
        if broker_up:  # its route-table queue is bound: an apply reaches it
            assert wait_for(lambda: self.queue(f"routes.{store}")[1] == 1, timeout=30), self.log(f"agent-{store}")

    def start_journal(self):
        (self.root / "var").mkdir(exist_ok=True)  # its SQLite journal: var/journal.db
        self.processes["journal"] = nameko_run(self.config, "services.journal", self.root / "journal.log",
                                               **self.env())
        assert wait_for(lambda: self.queue(journal.QUEUE)[1] == 1, timeout=60), self.log("journal")

    def start_guard(self):
        self.processes["guard"] = nameko_run(self.config, "routing.guard", self.root / "guard.log", **self.env())

    def stop(self, name: str):
        stop(self.processes.pop(name))

    def stop_all(self):
        for name in list(self.processes):
            try:
                self.stop(name)
            except Exception:
                pass
        try:
            self.broker.stop()
        finally:
            if self.broker.is_running():
                self.broker.kill()

    def log(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text()[-3000:] if path.exists() else ""

    # the bus ---------------------------------------------------------------
    def queue(self, name: str) -> tuple[int, int]:
        return queue_state(self.broker.uri(), name)

    def apply(self, sales: str, reason: str, **table) -> int:
        self.version = max(self.version, (self.registry.active() or type("t", (), {"version": 0})).version) + 1
        apply_table(self.registry, self.broker.uri(), table_text(self.version, self.erp_port, sales, **table),
                    f"test v{self.version}", reason, STORES, allow_backward=True)
        return self.version

    # HTTP -------------------------------------------------------------------
    @staticmethod
    def get(url: str) -> tuple[int, dict | None]:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")
        except OSError:
            return 0, None

    def health(self, store: str) -> dict | None:
        status, body = self.get(f"http://127.0.0.1:{self.ports[store]}/healthz")
        return body if status == 200 else None

    def settled(self) -> bool:
        """No sale in flight: see `nothing_in_flight`."""
        return nothing_in_flight(self.broker, SALES_QUEUE, [(self.health(s) or {}).get("outbox_depth") for s in STORES])

    def versions(self) -> dict[str, int | None]:
        return {s: (self.health(s) or {}).get("route_table_version") for s in STORES}

    def post(self, store: str, txn_id: str, **sale) -> tuple[int, dict]:
        data = json.dumps(legacy_sale(txn_id, store=store, **sale)).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.ports[store]}/erp/sales", data=data,
                                     headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=15) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")

    def till(self, store: str, prefix: str, count: int, rate: float) -> list[tuple[str, int, dict]]:
        """One till selling `count` sales at about `rate`/s; (txn, status, answer) each."""
        results, next_at = [], time.monotonic()
        for n in range(count):
            eventlet.sleep(max(0.0, next_at - time.monotonic()))
            next_at += 1 / rate
            txn = f"{store}-{prefix}{n:05d}"
            status, body = self.post(store, txn)
            results.append((txn, status, body))
        return results

    # the legacy database -----------------------------------------------------
    def sales(self, prefix: str = "") -> list[tuple[str, str]]:
        """(POS_TXN_ID, CHANNEL) of every sale document whose TXN_ID has `prefix` after the store."""
        with sqlite3.connect(self.legacy_db) as db:
            return db.execute("SELECT POS_TXN_ID, CHANNEL FROM SLS_HDR WHERE DOC_TYPE = 'S' "
                              "AND POS_TXN_ID LIKE ?", (f"%-{prefix}%",)).fetchall()
