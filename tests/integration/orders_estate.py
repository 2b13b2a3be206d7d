"""The click-and-collect estate as real processes for the orders tests: the demo legacy ERP
database, the demo loyalty platform and CRM, the erp, loyalty, crm, journal, orders (the
process) and orders_api services, and two store agents, on the session's broker. Calls
are signed as ecommerce and the stores' associates sign them (real keys, real HMAC)."""
from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import yaml

from bus import journal, topology
from demo.legacy_erp.schema import create_schema, engine_for, seed_demo_data
from routing.edge_auth import TerminalKeys, signed_headers
from tests.conftest import free_ports
from tests.integration.filedrop_support import write_drops
from tests.integration.support import Platform, ServiceProcesses, nameko_run, queue_state, wait_for, write_config

STORES = ("S001", "S002")
SERVICES = {"erp": "services.erp", "loyalty": "services.loyalty", "crm": "services.crm",
            "journal": "services.journal", "orders": "services.orders.process", "orders_api": "services.orders.api"}
READY = {  # a queue each service consumes once it runs
    "erp": topology.handler_queue("erp", "erp.reserve_stock.v1", "erp", "on_reserve_stock"),
    "loyalty": topology.handler_queue("loyalty", "loyalty.hold_points.v1", "loyalty", "on_hold_points"),
    "crm": topology.handler_queue("crm", "crm.record_order.v1", "crm", "on_record_order"),
    "journal": journal.QUEUE,
    "orders": topology.handler_queue("orders_api", "order.placed.v1", "orders", "on_order_placed"),
    "orders_api": topology.handler_queue("orders_api", "order.close.v1", "orders_api", "on_close"),
}
RULES = {"pickup": {"collect_days": 90 / 86400, "reservation_grace_hours": 1},
         "loyalty": {"wait_seconds": 15}, "sla": {"accepted": 60, "reserved": 120, "ready_for_pickup": 300}}


class OrdersEstate(ServiceProcesses):
    def __init__(self, root: Path, amqp_uri: str, rules: dict | None = None, loyalty_rules: dict | None = None):
        self.root, self.uri = root, amqp_uri
        (root / "var").mkdir(parents=True, exist_ok=True)
        (root / "config").mkdir(parents=True, exist_ok=True)
        write_drops(root)  # `retailbus reconcile` reads where the points file would be
        self.legacy_db = root / "var" / "legacy_erp.db"
        engine = engine_for(f"sqlite:///{self.legacy_db}")
        create_schema(engine)
        with engine.begin() as conn:
            seed_demo_data(conn)
        engine.dispose()
        loyalty_port, crm_port, api_port, *ports = free_ports(3 + len(STORES) + len(SERVICES))
        self.agent_ports = dict(zip(STORES, ports[:len(STORES)]))
        self.metrics_ports = dict(zip(SERVICES, ports[len(STORES):]))
        self.platform = Platform("demo.loyalty_platform", root / "var" / "platform.db", loyalty_port)
        self.crm = Platform("demo.crm", root / "var" / "crm.db", crm_port)
        self.api_url = f"http://127.0.0.1:{api_port}"
        (root / "config" / "orders.yaml").write_text(yaml.safe_dump({**RULES, **(rules or {})}))
        loyalty = {"accrual": {"mode": "api"}, "earning": {"points_per_unit": 1},
                   "redemption": {"point_value_minor": 1}, **(loyalty_rules or {})}
        (root / "config" / "loyalty.yaml").write_text(yaml.safe_dump(loyalty))
        fast = {"attempts": 30, "delays": [0.5, 1, 2]}
        services = {name: {"module": module, "metrics_port": self.metrics_ports[name]}
                    for name, module in SERVICES.items()}
        services["orders_api"]["http"] = f"127.0.0.1:{api_port}"
        self.config = write_config(
            root, amqp_uri, legacy_db=f"sqlite:///{self.legacy_db}", services=services,
            retry={"delays": [0.5, 1, 2], "prefetch": 64},
            handlers={"loyalty.on_hold_points": {"attempts": 60, "delays": [0.5, 1, 2]},
                      "crm.on_record_order": fast},
            loyalty_platform={"http": self.platform.url.removeprefix("http://"), "db": "var/unused.db"},
            crm={"http": self.crm.url.removeprefix("http://"), "db": "var/unused-crm.db"},
            stores=[{"id": s, "http": f"127.0.0.1:{self.agent_ports[s]}"} for s in STORES],
            journal={"flush_seconds": 0.1}, orders_rules="config/orders.yaml", loyalty_rules="config/loyalty.yaml",
            reconcile={"loyalty_pending_seconds": 2},  # what `retailbus reconcile` takes as still on its way
            processes={"click_collect": {"poll_seconds": 0.5}})
        self.web_key = bytes.fromhex(TerminalKeys(root / "var" / "orders_api" / "client_keys.json").add("WEB"))
        self.associate_keys = {s: bytes.fromhex(TerminalKeys(root / "var" / "stores" / s / "terminal_keys.json")
                                                .add("A1")) for s in STORES}
        self.processes: dict[str, subprocess.Popen] = {}
        self.purge([*READY.values(), *(f"fulfilment.{s}" for s in STORES)])

    # ------------------------------------------------------------------ processes
    def start(self, *names: str) -> None:
        names = names or (*SERVICES, *STORES)
        for name in names:
            self._spawn(name)
        for name in names:
            self.wait_running(name)

    def _spawn(self, name: str) -> None:
        if name in STORES:
            self.processes[name] = nameko_run(self.config, "routing.store_agent", self.root / f"agent-{name}.log",
                                              RETAILBUS_STORE=name, WEB_SERVER_ADDRESS=f"127.0.0.1:{self.agent_ports[name]}")
        else:
            env = {"WEB_SERVER_ADDRESS": self.api_url.removeprefix("http://")} if name == "orders_api" else {}
            self.processes[name] = nameko_run(self.config, SERVICES[name], self.root / f"{name}.log", **env)

    def start_offline(self, store: str) -> None:
        """The store's agent cut off from the bus (its broker address answers nothing)."""
        dead = f"amqp://nobody:nothing@127.0.0.1:{free_ports(1)[0]}/retailbus"
        self.processes[store] = nameko_run(self.config, "routing.store_agent", self.root / f"agent-{store}.log",
                                           RETAILBUS_STORE=store, RETAILBUS_AMQP_URI=dead,
                                           WEB_SERVER_ADDRESS=f"127.0.0.1:{self.agent_ports[store]}")
        assert wait_for(lambda: self.answers(store), 60), self.log(store)

    def answers(self, store: str) -> bool:
        try:
            return self.agent(store, "GET", "/healthz")[0] == 200
        except OSError:  # not listening yet
            return False

    def wait_running(self, name: str, timeout: float = 120) -> None:
        queue = f"fulfilment.{name}" if name in STORES else READY[name]
        assert wait_for(lambda: queue_state(self.uri, queue)[1] >= 1, timeout), self.log(name)

    def queue(self, name: str) -> tuple[int, int]:
        return queue_state(self.uri, name)

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "services.cli", *args, "--config", str(self.config)],
                              capture_output=True, text=True, timeout=120, cwd=self.root)

    def log(self, name: str) -> str:
        path = self.root / (f"agent-{name}.log" if name in STORES else f"{name}.log")
        return path.read_text()[-5000:] if path.exists() else ""

    def close(self) -> None:
        self.stop_all()
        self.platform.stop()
        self.crm.stop()

    # ------------------------------------------------------------------ HTTP, signed
    def _call(self, url: str, key_id: str, key: bytes, method: str, path: str, body=None) -> tuple[int, dict]:
        data = json.dumps(body).encode() if body is not None else b""
        headers = {"Content-Type": "application/json", **signed_headers(key_id, key, method, path, data)}
        request = urllib.request.Request(url + path, data=data if method == "POST" else None, method=method,
                                         headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=30) as answer:
                return answer.status, json.loads(answer.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")

    def place(self, order: dict) -> tuple[int, dict]:
        return self._call(self.api_url, "WEB", self.web_key, "POST", "/v1/orders", order)

    def order(self, order_id: str) -> dict:
        status, body = self._call(self.api_url, "WEB", self.web_key, "GET", f"/v1/orders/{order_id}")
        assert status == 200, body
        return body

    def cancel(self, order_id: str, reason: str = "changed my mind") -> tuple[int, dict]:
        return self._call(self.api_url, "WEB", self.web_key, "POST", f"/v1/orders/{order_id}/cancel",
                          {"reason": reason})

    def agent(self, store: str, method: str, path: str, body=None) -> tuple[int, dict]:
        return self._call(f"http://127.0.0.1:{self.agent_ports[store]}", "A1", self.associate_keys[store],
                          method, path, body)

    def tasks(self, store: str, status: str = "open,picked") -> list[dict]:
        code, body = self.agent(store, "GET", f"/v1/fulfilment/tasks?status={status}")
        return body["TASKS"] if code == 200 else []

    def report(self, store: str, what: str, order_id: str) -> tuple[int, dict]:
        return self.agent(store, "POST", f"/v1/fulfilment/{what}", {"ORDER_ID": order_id})

    def sell(self, store: str, txn: str, sku: str, qty: int = 1, price: int = 500) -> tuple[int, dict]:
        """A till's sale through the agent (the sales route runs on the bus), signed by the associate's key."""
        sale = {"STORE": store, "TERMINAL": "A1", "TXN_ID": txn, "TXN_DATE": "20261207", "CURRENCY": "EUR",
                "LINES": [{"SKU": sku, "QTY": qty, "PRICE": price, "DISC": 0, "LINE": qty * price}],
                "TENDERS": [{"TYPE": "CASH", "AMOUNT": qty * price}], "TOTAL": qty * price}
        return self.agent(store, "POST", "/erp/sales", sale)

    def stock(self, store: str, sku: str) -> dict:
        return self.agent(store, "GET", f"/erp/stock?STORE={store}&SKU={sku}")[1]

    # ------------------------------------------------------------------ the systems' records
    def legacy(self, sql: str, *args) -> list[tuple]:
        with sqlite3.connect(self.legacy_db, timeout=30) as db:
            return db.execute(sql, args).fetchall()

    def legacy_write(self, sql: str, *args) -> None:
        with sqlite3.connect(self.legacy_db, timeout=30) as db:
            db.execute(sql, args)

    def set_stock(self, store: str, sku: str, on_hand: int) -> None:
        with sqlite3.connect(self.legacy_db, timeout=30) as db:
            db.execute("UPDATE STK_LVL SET ON_HAND = ?, UPD_TS = strftime('%Y-%m-%dT%H:%M:%f', 'now') "
                       "WHERE STORE_NO = ? AND SKU = ?", (on_hand, store, sku))

    def enrol(self, card: str, points: int) -> None:
        assert self.platform.call("POST", "/members", {"card": card, "customer_id": f"CU{card[-6:]}"},
                                  f"m-{card}")[0] in (200, 201)
        if points:
            assert self.platform.call("POST", "/transactions", {"card": card, "type": "EARN", "points": points,
                                                                "reference": f"seed-{card}"}, f"seed-{card}")[0] in (200, 201)

    def process_states(self) -> dict[str, int]:
        with sqlite3.connect(self.root / "var" / "orders.db", timeout=30) as db:
            return dict(db.execute("SELECT STATE, count(*) FROM RB_PROCESS GROUP BY STATE").fetchall())

    def member(self, card: str) -> dict:
        return self.platform.call("GET", f"/members/{card}")[1]


def order_body(order_id: str, store: str, lines: list[tuple[str, int, int]], card: str | None = None,
               points: int = 0, customer: str = "C00001") -> dict:
    """An order as ecommerce sends it; the payment covers what the points (1 cent each) do not."""
    total = sum(q * p for _, q, p in lines)
    body = {"order_id": order_id, "customer_id": customer, "pickup_store": store, "currency": "EUR",
            "points": points, "paid_minor": total - points, "payment_reference": f"PSP-{order_id}",
            "lines": [{"line_no": n, "sku": s, "quantity": q, "unit_price_minor": p}
                      for n, (s, q, p) in enumerate(lines, start=1)]}
    if card:
        body["loyalty_card"] = card
    return body
