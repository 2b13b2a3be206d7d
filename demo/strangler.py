"""`retailbus demo`: watch the strangler move the sales route, live, in two minutes.

Runs `retailbus up` on a throw-away estate (its own broker node, demo legacy
ERP, erp service, route guard, store agents S001 and S002, all in a temporary
folder on free ports), drives two tills of unsigned POS sales (the demo config
sets `RETAILBUS.agent.auth_required: false`), and walks the sales route
legacy -> shadow -> bus for some stores -> bus, printing a status table.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml

from routing.control import RouteRegistry, apply_table
from routing.route_table import store_bucket
from services.broker.node import resolve_amqp_uri
from bus.settings import load_config, retailbus_settings

STORES = ("S001", "S002")
PHASES = (
    ("legacy", "mode: legacy", "every sale goes point-to-point to the legacy ERP"),
    ("shadow", "mode: shadow", "legacy answers; the bus computes the same posting in dry run and compares"),
    ("bus 15%", "mode: bus\n    rollout: {percent: 15}",
     "stores whose hash bucket < 15 (S001) take the bus; the others stay in shadow"),
    ("bus", "mode: bus", "every store: outbox -> broker -> erp service -> legacy DB"),
)


def _ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _table(version: int, erp_port: int, sales: str) -> str:
    return (f"version: {version}\nlegacy: {{base_url: 'http://127.0.0.1:{erp_port}', timeout: 5}}\nroutes:\n"
            f"  - name: sales\n    message: pos.sale.v1\n    legacy: POST /erp/sales\n"
            f"    on_legacy_failure: queue\n    {sales}\n")


class Demo:
    def __init__(self, root: Path, rate: float, phase_seconds: float, keep: bool = False):
        self.root, self.rate, self.phase_seconds, self.keep = root, rate, phase_seconds, keep
        mq, dist, mgmt, erp, *agents = _ports(4 + len(STORES))
        self.erp_port, self.agents = erp, dict(zip(STORES, agents))
        shipped = yaml.safe_load((Path(__file__).resolve().parents[1] / "config" / "bus.yaml").read_text())
        config = {k: v for k, v in shipped.items() if k not in ("RETAILBUS", "LOGGING")}
        config["LOGGING"] = {"version": 1, "root": {"level": "ERROR"}}
        config["LEGACY_DB_URI"] = f"sqlite:///{root / 'var' / 'legacy_erp.db'}"
        config["SHADOW_RPC_TIMEOUT"] = 5
        config["RETAILBUS"] = {
            "root": str(root), "broker": {"home": "var/broker", "port": mq, "dist_port": dist,
                                          "management_port": mgmt},
            "services": {"erp": {"module": "services.erp"}, "route_guard": {"module": "routing.guard"}},
            "stores": [{"id": s, "http": f"127.0.0.1:{p}"} for s, p in self.agents.items()],
            "agent": {"auth_required": False},  # the demo tills are unsigned
            "legacy_erp": {"http": f"127.0.0.1:{erp}"}, "routes_file": "config/routes.yaml"}
        (root / "config").mkdir(parents=True)
        (root / "var").mkdir()
        (root / "config" / "routes.yaml").write_text(_table(1, erp, "mode: legacy"))
        self.config = root / "config" / "bus.yaml"
        self.config.write_text(yaml.safe_dump(config, sort_keys=False))
        self.registry = RouteRegistry(root / "var" / "routes")
        self.sent = {"ok": 0, "failed": 0}
        self.stopping = threading.Event()

    def _post(self, store: str, n: int) -> bool:
        txn = f"{store}-D{n:06d}"
        body = json.dumps({"STORE": store, "TERMINAL": "07", "TXN_ID": txn, "TXN_DATE": "20261127",
                           "TXN_TIME": "101500", "CURRENCY": "EUR",
                           "LINES": [{"SKU": "100001", "QTY": 1, "PRICE": 1999, "DISC": 0, "LINE": 1999}],
                           "TENDERS": [{"TYPE": "CASH", "AMOUNT": 1999}], "TOTAL": 1999}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.agents[store]}/erp/sales", data=body,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def till(self, store: str):
        n, next_at = 0, time.monotonic()
        while not self.stopping.is_set():
            time.sleep(max(0.0, next_at - time.monotonic()))
            next_at += len(STORES) / self.rate
            n += 1
            self.sent["ok" if self._post(store, n) else "failed"] += 1

    def health(self, store: str) -> dict:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.agents[store]}/healthz", timeout=2) as r:
                return json.loads(r.read())
        except (OSError, ValueError):
            return {}

    def ledger(self) -> dict[str, int]:
        try:
            with sqlite3.connect(self.root / "var" / "legacy_erp.db") as db:
                return dict(db.execute("SELECT CHANNEL, COUNT(*) FROM SLS_HDR GROUP BY CHANNEL").fetchall())
        except sqlite3.Error:
            return {}

    def status(self, phase: str):
        print(f"\n[{phase}] POS calls ok={self.sent['ok']} failed={self.sent['failed']}   "
              f"legacy DB by channel: {self.ledger()}")
        print(f"  {'store':<6}{'table':>6}{'legacy':>8}{'queued':>8}{'bus':>7}{'parity':>8}{'mism.':>7}"
              f"{'errors':>8}{'outbox':>8}   last 60s")
        for store in STORES:
            h = self.health(store)
            c = (h.get("routes") or {}).get("sales", {})
            w = (h.get("routes_window") or {}).get("sales", {})
            errors = sum(n for k, n in c.items() if k.endswith("_error"))
            compared = (h.get("shadow_compared") or {}).get("sales", 0)
            parity = f"{(h.get('shadow_parity') or {}).get('sales', 0):.1%}" if compared else "-"
            print(f"  {store:<6}{'v' + str(h.get('route_table_version', '?')):>6}{c.get('legacy_ok', 0):>8}"
                  f"{c.get('legacy_queued', 0):>8}{c.get('bus_ok', 0):>7}{parity:>8}"
                  f"{c.get('shadow_mismatch', 0):>7}{errors:>8}{h.get('outbox_depth', '?'):>8}   "
                  + " ".join(f"{k}={v}" for k, v in sorted(w.items())))

    def run(self) -> int:
        env = {k: v for k, v in os.environ.items() if k != "RETAILBUS_AMQP_URI"}
        log = (self.root / "up.log").open("wb")
        print(f"starting the estate in {self.root} (broker, legacy ERP :{self.erp_port}, erp, route guard, "
              f"agents {', '.join(f'{s} :{p}' for s, p in self.agents.items())}) ...", flush=True)
        up = subprocess.Popen([str(Path(sys.executable).with_name("retailbus")), "up", "--config", str(self.config)],
                              env=env, cwd=self.root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 120
            while not all(self.health(s) for s in STORES):
                if up.poll() is not None or time.monotonic() > deadline:
                    print((self.root / "up.log").read_text()[-3000:])
                    return 1
                time.sleep(0.5)
            config = load_config(self.config)  # the demo's own managed node, as `up` resolved it
            uri = resolve_amqp_uri(config, retailbus_settings(config, self.config))
            print("up. store buckets: " + ", ".join(f"{s}={store_bucket(s):.1f}" for s in STORES), flush=True)
            tills = [threading.Thread(target=self.till, args=(s,), daemon=True) for s in STORES]
            for t in tills:
                t.start()
            start = ((self.root / "config" / "routes.yaml").read_text(), "config/routes.yaml")
            for version, (name, sales, what) in enumerate(PHASES, start=2):
                applied = apply_table(self.registry, uri, _table(version, self.erp_port, sales),
                                      f"demo {name}", f"demo: sales -> {name}", STORES, baseline=start)
                print(f"\n=== v{applied.version}: sales route -> {name.upper()}: {what}", flush=True)
                until = time.monotonic() + self.phase_seconds
                while time.monotonic() < until:
                    time.sleep(min(3.0, max(0.0, until - time.monotonic())))
                    self.status(name)
            self.stopping.set()
            for t in tills:
                t.join(timeout=15)
            time.sleep(2)
            self.status("done")
            print("\nevery POS call answered; bus-mode sales (CHANNEL RBUS) reached the legacy DB through the bus.")
            if self.keep:
                print(f"The estate is stopped; its folder stays: retailbus routes history --config {self.config}")
            else:
                print("The estate and its folder are gone; `retailbus demo --keep` keeps the folder "
                      "(logs, legacy DB, route history) to look at afterwards.")
            return 0 if self.sent["failed"] == 0 else 1
        except KeyboardInterrupt:
            return 130
        finally:
            self.stopping.set()
            up.send_signal(signal.SIGTERM)
            try:
                up.wait(60)
            except subprocess.TimeoutExpired:
                up.kill()


def run(rate: float = 20.0, phase_seconds: float = 15.0, keep: bool = False) -> int:
    os.environ.pop("RETAILBUS_AMQP_URI", None)  # the demo runs on a broker node of its own
    if keep:
        return Demo(Path(tempfile.mkdtemp(prefix="retailbus-demo-")), rate, phase_seconds, keep=True).run()
    with tempfile.TemporaryDirectory(prefix="retailbus-demo-") as tmp:
        return Demo(Path(tmp), rate, phase_seconds).run()
