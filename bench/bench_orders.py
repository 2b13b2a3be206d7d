"""Click and collect end to end: orders per second, and accepted -> ready for pickup at 50 orders/s.

    python bench/bench_orders.py [--amqp-uri URI] [--runs 3] [--rate 50] [--seconds 10] [--burst 200]

Real processes, as `retailbus up` runs them (`python -m bus.runner`): the demo loyalty
platform and CRM, the erp, loyalty, crm, orders (the process, on the engine) and
orders_api services and two store agents, on a throw-away broker, journal off. At each
store an associate (a thread here) lists the store's tasks every 50 ms over its signed
calls and marks each one picked, then collected. Half of the orders redeem points.

(a) ready for pickup at RATE orders/s, open loop: orders are placed through the signed
    experience API on a fixed schedule for SECONDS; latency = when the API learned the
    store picked the order (READY_AT) - when it accepted it (ACCEPTED_AT); p50 and p99
    per run. The associate's 50 ms poll is part of it, as a real one's would be.
(b) end to end: BURST orders placed by 16 clients at once; orders per second from the
    first accepted to the last closed as collected at the API (hold, reserve, commit,
    task, picked, collected, capture, revenue, accrual, close; the CRM entry follows).
(c) raw: the same effects point to point, synchronously, one order after another in
    one thread, no broker and no process engine: the hold, capture and EARN at the
    platform over plain HTTP, the reservation, commitment, revenue and stock in a legacy
    ERP database with the erp's own SQL (services/erp/reservations.py, orders.py), the
    task in a store's SQLite file (synchronous=FULL), picked, collected. Its (a) figure is
    the time from start to picked at the same schedule, its (b) the orders per second of
    the whole chain. Runs alternate ours and raw.
Each figure is the median of the runs'; ratios are ours over raw. (b) also prints each
process's CPU per order, which says where the time goes on a 2-core machine.
"""
import eventlet

eventlet.monkey_patch()  # the clients and associates are green threads; must precede other imports

import argparse  # noqa: E402
import http.client  # noqa: E402
import json  # noqa: E402
import socket  # noqa: E402
import sqlite3  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from datetime import datetime, timedelta, timezone  # noqa: E402
from pathlib import Path  # noqa: E402

import amqp  # noqa: E402
import sqlalchemy as sa  # noqa: E402
import yaml  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from bench.common import (bench_broker, cpu_seconds, emit_json, environment, median, percentile,  # noqa: E402
                          process_hwm_kib, start_process, stop_process, wait_http)
from bus.publisher import connection_params  # noqa: E402
from contracts.orders import OrderPlacedV1  # noqa: E402
from demo.legacy_erp.schema import create_schema, engine_for, seed_demo_data  # noqa: E402
from routing.edge_auth import TerminalKeys, signed_headers  # noqa: E402
from services.broker.setup import free_ports  # noqa: E402
from services.erp import orders as erp_orders, reservations  # noqa: E402

GOALS: dict = {}  # the issue asks for the figures at 50 orders/s, with no target
REPO = Path(__file__).resolve().parents[1]
STORES = ("S001", "S002")
SKUS = ("100001", "100002", "100003")
CARD = "LC0000000009"
SERVICES = ("erp", "loyalty", "crm", "orders", "orders_api")
MODULES = {"erp": "services.erp", "loyalty": "services.loyalty", "crm": "services.crm",
           "orders": "services.orders.process", "orders_api": "services.orders.api"}
READY = {"erp": "evt-erp-erp.reserve_stock.v1--erp.on_reserve_stock",
         "loyalty": "evt-loyalty-loyalty.hold_points.v1--loyalty.on_hold_points",
         "crm": "evt-crm-crm.record_order.v1--crm.on_record_order",
         "orders": "evt-orders_api-order.placed.v1--orders.on_order_placed",
         "orders_api": "evt-orders_api-order.close.v1--orders_api.on_close",
         "S001": "fulfilment.S001", "S002": "fulfilment.S002"}
TCP_QUICKACK = getattr(socket, "TCP_QUICKACK", 12)


def order_body(order_id: str, n: int) -> dict:
    points = 200 if n % 2 else 0
    lines = [{"line_no": 1, "sku": SKUS[n % len(SKUS)], "quantity": 1 + n % 2, "unit_price_minor": 1999}]
    total = sum(x["quantity"] * x["unit_price_minor"] for x in lines)
    return {"order_id": order_id, "customer_id": "C00001", "pickup_store": STORES[n % 2], "currency": "EUR",
            "points": points, "paid_minor": total - points, "payment_reference": f"PSP-{order_id}", "lines": lines,
            **({"loyalty_card": CARD} if points else {})}


def request(conn: http.client.HTTPConnection, method: str, path: str, who: str, key: bytes, body=None):
    data = json.dumps(body).encode() if body is not None else b""
    conn.request(method, path, data if method == "POST" else None,
                 {"Content-Type": "application/json", **signed_headers(who, key, method, path, data)})
    conn.sock.setsockopt(socket.IPPROTO_TCP, TCP_QUICKACK, 1)
    answer = conn.getresponse()
    return answer.status, json.loads(answer.read())


# ---------------------------------------------------------------------- the estate
def write_config(home: Path, uri: str, ports: dict) -> Path:
    shipped = yaml.safe_load((REPO / "config" / "bus.yaml").read_text())
    config = {k: v for k, v in shipped.items() if k != "RETAILBUS"}
    config.update(AMQP_URI=uri, LEGACY_DB_URI=f"sqlite:///{home / 'var' / 'legacy_erp.db'}")
    config["RETAILBUS"] = {
        "root": str(home), "journal": {"enabled": False},
        "stores": [{"id": s, "http": f"127.0.0.1:{ports[s]}"} for s in STORES],
        "loyalty_platform": {"http": f"127.0.0.1:{ports['platform']}", "db": "var/platform.db"},
        "crm": {"http": f"127.0.0.1:{ports['crm']}", "db": "var/crm.db"},
        "services": {name: {"module": MODULES[name]} for name in SERVICES},
        "handlers": {"loyalty.on_hold_points": {"attempts": 60, "delays": [0.5, 1, 2]}},
    }
    path = home / "config" / "bus.yaml"
    path.write_text(yaml.safe_dump(config))
    for name in ("routes.yaml", "cases.yaml"):
        (home / "config" / name).write_text((REPO / "config" / name).read_text())
    (home / "config" / "loyalty.yaml").write_text(yaml.safe_dump({"accrual": {"mode": "api"}}))
    (home / "config" / "orders.yaml").write_text(yaml.safe_dump({"pickup": {"collect_days": 1}}))
    return path


def consumers(uri: str, queue: str) -> int:
    conn = amqp.Connection(**connection_params(uri, 5))
    conn.connect()
    try:
        return conn.channel().queue_declare(queue, passive=True).consumer_count
    except amqp.exceptions.NotFound:
        return 0
    finally:
        conn.collect()


class Estate:
    def __init__(self, home: Path, uri: str):
        self.home, self.uri = home, uri
        (home / "config").mkdir()
        (home / "var").mkdir()
        engine = engine_for(f"sqlite:///{home / 'var' / 'legacy_erp.db'}")
        create_schema(engine)
        with engine.begin() as conn:
            seed_demo_data(conn)
            conn.execute(sa.text("UPDATE STK_LVL SET ON_HAND = 1000000"))
        engine.dispose()
        names = ("platform", "crm", "api", *STORES)
        self.ports = dict(zip(names, free_ports(len(names))))
        self.config = write_config(home, uri, self.ports)
        self.web = bytes.fromhex(TerminalKeys(home / "var" / "orders_api" / "client_keys.json").add("WEB"))
        self.associates = {s: bytes.fromhex(TerminalKeys(home / "var" / "stores" / s / "terminal_keys.json").add("A1"))
                           for s in STORES}
        self.processes: dict = {}

    def start(self):
        for name, module in (("platform", "demo.loyalty_platform"), ("crm", "demo.crm")):
            self.processes[name] = start_process([sys.executable, "-m", module, "--db", str(self.home / "var" /
                                                  f"{name}.db"), "--port", str(self.ports[name])], self.home, name,
                                                 PYTHONPATH=str(REPO))
            wait_http(f"http://127.0.0.1:{self.ports[name]}/health")
        runner = [sys.executable, "-m", "bus.runner", "--config", str(self.config)]
        for name in SERVICES:
            env = {"WEB_SERVER_ADDRESS": f"127.0.0.1:{self.ports['api']}"} if name == "orders_api" else {}
            self.processes[name] = start_process(runner + [MODULES[name]], self.home, name, PYTHONPATH=str(REPO), **env)
        for store in STORES:
            self.processes[store] = start_process(runner + ["routing.store_agent"], self.home, store,
                                                  RETAILBUS_STORE=store, PYTHONPATH=str(REPO),
                                                  WEB_SERVER_ADDRESS=f"127.0.0.1:{self.ports[store]}")
        deadline = time.monotonic() + 180
        for name, queue in READY.items():
            while consumers(self.uri, queue) < 1:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{name} did not start: {(self.home / f'{name}.log').read_text()[-2000:]}")
                time.sleep(0.5)
        platform = http.client.HTTPConnection("127.0.0.1", self.ports["platform"], timeout=30)
        for path, body, key in (("/members", {"card": CARD, "customer_id": "C00001"}, "m"),
                                ("/transactions", {"card": CARD, "type": "EARN", "points": 10 ** 9,
                                                   "reference": "bench"}, "seed")):
            platform.request("POST", path, json.dumps(body), {"Idempotency-Key": key})
            platform.getresponse().read()

    def stop(self):
        for process in reversed(list(self.processes.values())):
            stop_process(process)

    def orders(self, prefix: str) -> dict[str, tuple]:
        with sqlite3.connect(self.home / "var" / "orders_api.db", timeout=30) as db:
            return {row[0]: row[1:] for row in db.execute(
                "SELECT ORDER_ID, STATUS, ACCEPTED_AT, READY_AT, CLOSED_AT FROM RB_ORDER WHERE ORDER_ID LIKE ?",
                (f"{prefix}%",))}


class Associate:
    """A store's associate: picks and hands over every task, polling every 50 ms."""

    def __init__(self, estate: Estate, store: str):
        self.estate, self.store, self.running = estate, store, True
        self.thread = eventlet.spawn(self.run)

    def run(self):
        conn = http.client.HTTPConnection("127.0.0.1", self.estate.ports[self.store], timeout=30)
        key = self.estate.associates[self.store]
        while self.running:
            _, listed = request(conn, "GET", "/v1/fulfilment/tasks", "A1", key)
            for task in listed.get("TASKS", []):
                what = "picked" if task["STATUS"] == "OPEN" else "collected"
                request(conn, "POST", f"/v1/fulfilment/{what}", "A1", key, {"ORDER_ID": task["ORDER_ID"]})
            eventlet.sleep(0.05)

    def stop(self):
        self.running = False
        self.thread.wait()


def place(estate: Estate, bodies: list[dict], rate: float | None) -> None:
    """Place the orders, at `rate` per second on a fixed schedule (None: 16 clients at once)."""
    pool, conns = eventlet.GreenPool(16), eventlet.Queue()
    for _ in range(16):
        conns.put(http.client.HTTPConnection("127.0.0.1", estate.ports["api"], timeout=60))

    def one(body):
        conn = conns.get()
        try:
            status, answer = request(conn, "POST", "/v1/orders", "WEB", estate.web, body)
            if status != 202:
                raise RuntimeError(f"order {body['order_id']}: {status} {answer}")
        finally:
            conns.put(conn)
    start = time.monotonic()
    for n, body in enumerate(bodies):
        if rate:
            eventlet.sleep(max(0.0, start + n / rate - time.monotonic()))
        pool.spawn(one, body)
    pool.waitall()
    if rate:
        print(f"  placed {len(bodies)} at {rate:g}/s ({time.monotonic() - start - len(bodies) / rate:+.2f} s behind)",
              flush=True)


def settled(estate: Estate, prefix: str, count: int, field: int, timeout: float = 600) -> dict[str, tuple]:
    """The orders once each has `field` (2: ready, 3: closed) set."""
    deadline = time.monotonic() + timeout
    while True:
        found = estate.orders(prefix)
        if len(found) == count and all(row[field] for row in found.values()):
            return found
        if time.monotonic() > deadline:
            done = sum(1 for row in found.values() if row[field])
            raise RuntimeError(f"{prefix}: {done} of {count} orders there in {timeout:.0f} s")
        time.sleep(0.5)


def seconds(a: str, b: str) -> float:
    return (datetime.fromisoformat(b) - datetime.fromisoformat(a)).total_seconds()


def ours_ready(estate: Estate, run: int, rate: float, length: float) -> list[float]:
    prefix = f"R{run}-"
    place(estate, [order_body(f"{prefix}{n:05d}", n) for n in range(int(rate * length))], rate)
    found = settled(estate, prefix, int(rate * length), 2)
    return [seconds(accepted, ready) for _, accepted, ready, _ in found.values()]


def cpu(estate: Estate) -> dict[str, float]:
    return {name: cpu_seconds(process.pid) for name, process in estate.processes.items()}


def ours_burst(estate: Estate, run: int, count: int) -> float:
    prefix = f"B{run}-"
    before = cpu(estate)
    place(estate, [order_body(f"{prefix}{n:05d}", n) for n in range(count)], None)
    found = settled(estate, prefix, count, 3)
    spent = {name: round((used - before[name]) * 1000 / count, 1) for name, used in cpu(estate).items()}
    print(f"  CPU ms per order: {spent}", flush=True)
    if any(status != "collected" for status, *_ in found.values()):
        raise RuntimeError(f"{prefix}: not every order was collected")
    first = min(accepted for _, accepted, _, _ in found.values())
    last = max(closed for _, _, _, closed in found.values())
    return count / seconds(first, last)


# ---------------------------------------------------------------------- raw: point to point
class Raw:
    """The same effects, synchronously, in one thread: the platform over HTTP, the legacy ERP
    database with the erp's own SQL, the store's task table in SQLite."""

    def __init__(self, home: Path, platform_port: int):
        self.engine = engine_for(f"sqlite:///{home / 'var' / 'raw_erp.db'}")
        create_schema(self.engine)
        with self.engine.begin() as conn:
            seed_demo_data(conn)
            conn.execute(sa.text("UPDATE STK_LVL SET ON_HAND = 1000000"))
        md = sa.MetaData()
        md.reflect(self.engine, only=("STK_LVL", "STK_RSV", "ORD_HDR", "ORD_LIN", "GL_PST", "DOC_SEQ"))
        self.t = erp_orders.OrderTables.of(dict(md.tables))
        self.store = sqlite3.connect(home / "var" / "raw_store.db", isolation_level=None)
        self.store.execute("PRAGMA journal_mode=WAL")
        self.store.execute("PRAGMA synchronous=FULL")
        self.store.execute("CREATE TABLE IF NOT EXISTS task (order_id TEXT PRIMARY KEY, status TEXT)")
        self.platform = http.client.HTTPConnection("127.0.0.1", platform_port, timeout=30)

    def _platform(self, path: str, body: dict, key: str) -> dict:
        self.platform.request("POST", path, json.dumps(body), {"Idempotency-Key": key})
        self.platform.sock.setsockopt(socket.IPPROTO_TCP, TCP_QUICKACK, 1)
        answer = self.platform.getresponse()
        return json.loads(answer.read())

    def to_ready(self, body: dict) -> str | None:
        order = OrderPlacedV1.model_validate({**body, "placed_at": datetime.now(timezone.utc),
                                              "total_minor": body["paid_minor"] + body["points"],
                                              "points_minor": body["points"], "lines": [
                                                  {**x, "line_total_minor": x["quantity"] * x["unit_price_minor"]}
                                                  for x in body["lines"]]})
        hold = None
        if order.points:
            hold = self._platform("/holds", {"card": CARD, "points": order.points, "store": order.pickup_store,
                                             "reference": f"{order.pickup_store}/{order.order_id}",
                                             "ttl_seconds": 86400}, f"raw-hold:{order.order_id}")["hold_id"]
        now = datetime.now(timezone.utc)
        with self.engine.begin() as conn:
            reservations.reserve(conn, self.t.stock, self.t.reservations, order.order_id, order.pickup_store,
                                 [(x.sku, x.quantity) for x in order.lines], now + timedelta(days=2), now)
        with self.engine.begin() as conn:
            erp_orders.commit(conn, self.t, order, now)
        self.store.execute("INSERT INTO task VALUES (?, 'open')", (order.order_id,))
        self.store.execute("UPDATE task SET status = 'picked' WHERE order_id = ?", (order.order_id,))
        return hold

    def collect(self, order_id: str, hold: str | None, points: int) -> None:
        self.store.execute("UPDATE task SET status = 'collected' WHERE order_id = ?", (order_id,))
        if hold:
            self._platform(f"/holds/{hold}/capture", {}, f"raw-capture:{hold}")
        now = datetime.now(timezone.utc)
        with self.engine.begin() as conn:
            reservations.collect(conn, self.t.stock, self.t.reservations, order_id, now)
            erp_orders.recognise(conn, self.t, order_id, now.date(), now)
        if points:
            self._platform("/transactions", {"card": CARD, "type": "EARN", "points": 39, "reference": f"raw/{order_id}"},
                           f"raw-earn:{order_id}")

    def ready(self, run: int, rate: float, length: float) -> list[float]:
        out, start = [], time.monotonic()
        for n in range(int(rate * length)):
            eventlet.sleep(max(0.0, start + n / rate - time.monotonic()))
            began = time.monotonic()
            self.to_ready(order_body(f"RR{run}-{n:05d}", n))
            out.append(time.monotonic() - began)
        return out

    def burst(self, run: int, count: int) -> float:
        start = time.monotonic()
        for n in range(count):
            body = order_body(f"RB{run}-{n:05d}", n)
            hold = self.to_ready(body)
            self.collect(body["order_id"], hold, body["points"])
        return count / (time.monotonic() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--amqp-uri", help="an existing broker (default: a throw-away node)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rate", type=float, default=50.0, help="orders per second placed in (a)")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each (a) run")
    parser.add_argument("--burst", type=int, default=200, help="orders placed at once in (b)")
    args = parser.parse_args()
    with bench_broker(args.amqp_uri) as (uri, _), tempfile.TemporaryDirectory(prefix="retailbus-bench-") as tmp:
        estate = Estate(Path(tmp), uri)
        ready = {"ours": [], "raw": []}
        burst = {"ours": [], "raw": []}
        try:
            estate.start()
            raw = Raw(Path(tmp), estate.ports["platform"])
            associates = [Associate(estate, s) for s in STORES]
            try:
                ours_burst(estate, -1, 20)  # warm up: every queue, connection and cache in use once
                for run in range(args.runs):
                    print(f"run {run + 1}: (a) ready for pickup at {args.rate:g} orders/s", flush=True)
                    values = {"ours": ours_ready(estate, run, args.rate, args.seconds),
                              "raw": raw.ready(run, args.rate, args.seconds)}
                    for name, found in values.items():
                        ready[name].append((percentile(found, 50), percentile(found, 99)))
                    print(f"  ours p50 {ready['ours'][-1][0]:.3f} s p99 {ready['ours'][-1][1]:.3f} s | "
                          f"raw p50 {ready['raw'][-1][0]:.3f} s p99 {ready['raw'][-1][1]:.3f} s", flush=True)
                    burst["ours"].append(ours_burst(estate, run, args.burst))
                    burst["raw"].append(raw.burst(run, args.burst))
                    print(f"  (b) {args.burst} orders end to end: ours {burst['ours'][-1]:.1f} orders/s, "
                          f"raw {burst['raw'][-1]:.1f} orders/s", flush=True)
            finally:
                for associate in associates:
                    associate.stop()
            memory = {f"{name}_peak_rss_mib": round((process_hwm_kib(estate.processes[name].pid) or 0) / 1024, 1)
                      for name in ("orders", "orders_api", "erp")}
        finally:
            estate.stop()
        figures = {f"ready_{name}_{p}_s": median([v[i] for v in values])
                   for name, values in ready.items() for i, p in enumerate(("p50", "p99"))}
        figures.update({f"orders_per_s_{name}": median(values) for name, values in burst.items()})
        figures["ready_p99_ratio"] = figures["ready_ours_p99_s"] / figures["ready_raw_p99_s"]
        figures["orders_per_s_ratio"] = figures["orders_per_s_ours"] / figures["orders_per_s_raw"]
        print(f"accepted -> ready for pickup at {args.rate:g}/s: ours p50 {figures['ready_ours_p50_s']:.3f} s, p99 "
              f"{figures['ready_ours_p99_s']:.3f} s; raw p50 {figures['ready_raw_p50_s']:.3f} s, p99 "
              f"{figures['ready_raw_p99_s']:.3f} s. End to end: ours {figures['orders_per_s_ours']:.1f} orders/s, "
              f"raw {figures['orders_per_s_raw']:.1f} orders/s. Memory: {memory}", flush=True)
        emit_json({"bench": "orders", **figures, **memory, "runs": args.runs, "rate": args.rate,
                   "seconds": args.seconds, "burst": args.burst, "goals": GOALS, "goals_met": {},
                   **environment(uri)})


if __name__ == "__main__":
    main()
