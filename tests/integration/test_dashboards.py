"""Every query of config/dashboards/retailbus.json returns data from a real
Prometheus (Debian's `prometheus`) scraping a bus that `retailbus up` runs, and
config/alerts.yml loads and evaluates in that Prometheus.

The estate: a managed broker, the demo legacy ERP, every service (erp, files,
route_guard, dlq, reconcile, journal, loyalty, cases, orders, orders_api, customers) with a metrics port each,
and a store agent. A little real traffic
makes the counters move: a sale and a stock query through the agent (stock in
shadow mode, for parity), a redemption the agent authorises and a sale that pays
with it (loyalty), a good customer export (mastered by the customer hub, written to the ERP), a bad stock
snapshot (a rejected file)
a stock update in the legacy database (change capture), and two click-and-collect orders
(one collected at the store, one out of stock).
"""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from demo.batch.jobs import customer_rows, stock_line, write_customer_export, write_stock_snapshot
from demo.legacy_erp.schema import create_schema, engine_for, seed_demo_data, utc_stamp
from tests.conftest import free_ports
from routing.edge_auth import TerminalKeys, signed_headers
from tests.integration.filedrop_support import write_drops
from tests.integration.orders_estate import order_body
from tests.integration.support import legacy_sale, read_config, stop, wait_for, write_config
from tests.unit.test_dashboards import ALERTS, dashboard_exprs

pytestmark = pytest.mark.integration  # needs Debian's prometheus package (.ci/bootstrap.sh test installs it)

SERVICES = {"erp": "services.erp", "files": "services.files", "route_guard": "routing.guard",
            "dlq": "services.dlq", "reconcile": "services.reconcile", "journal": "services.journal",
            "loyalty": "services.loyalty", "cases": "services.cases", "orders": "services.orders.process",
            "orders_api": "services.orders.api", "customers": "services.customers"}
GRAFANA_VARIABLES = {"$__rate_interval": "30s", "$__range": "1h"}
QUERY_TIMEOUT = 120  # seconds for every query to return data on a busy 2-core machine


def routes_yaml(legacy_port: int) -> str:
    return f"""version: 1
legacy:
  base_url: http://127.0.0.1:{legacy_port}
  timeout: 5
routes:
  - name: sales
    message: pos.sale.v1
    legacy: POST /erp/sales
    mode: bus
    on_legacy_failure: queue
  - name: stock
    message: pos.stock_query.v1
    legacy: GET /erp/stock
    mode: shadow
"""


def http_json(url: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    return json.loads(urllib.request.urlopen(request, timeout=10).read())


def reachable(url: str) -> bool:
    try:
        return urllib.request.urlopen(url, timeout=1).status == 200
    except OSError:
        return False


def prom_query(base: str, expr: str) -> list:
    answer = http_json(f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
    assert answer["status"] == "success", (expr, answer)
    return answer["data"]["result"]


def promql(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    return expr


@pytest.mark.timeout(60)
def test_promtool_accepts_the_alert_rules():
    done = subprocess.run(["promtool", "check", "rules", str(ALERTS)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


@pytest.fixture
def estate(tmp_path):
    """`retailbus up` with every service on its own metrics port; yields the scrape targets."""
    mq, dist, mgmt, agent_port, legacy_port, api_port, *metric_ports = free_ports(6 + len(SERVICES))
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "routes.yaml").write_text(routes_yaml(legacy_port))
    write_drops(tmp_path)
    (tmp_path / "var").mkdir()
    engine = engine_for(f"sqlite:///{tmp_path / 'var' / 'legacy_erp.db'}")  # demo stock the till can ask for
    create_schema(engine)
    with engine.begin() as conn:
        seed_demo_data(conn)
    engine.dispose()
    config = write_config(
        tmp_path,
        broker={"home": "var/broker", "port": mq, "dist_port": dist, "management_port": mgmt},
        retry={"delays": [0.5, 1]},
        services={name: {"module": module, "metrics_port": port, **({"http": f"127.0.0.1:{api_port}"}
                                                                   if name == "orders_api" else {})}
                  for (name, module), port in zip(SERVICES.items(), metric_ports)},
        stores=[{"id": "S001", "http": f"127.0.0.1:{agent_port}"}],
        # control totals and reconciliation every 2 s, not every minutes: the gap gauge gets its value
        agent={"auth_required": False, "control_totals_interval": 2, "control_totals_days": 3650,
               "retention_days": 3650},  # the sale's day (legacy_sale) is counted, and kept as long
        retention={"inbox_days": 3700, "ledger_days": 3700},  # keys outlive every redelivery (bus/settings.py)
        legacy_erp={"http": f"127.0.0.1:{legacy_port}"},
        reconcile={"interval": 2},
    )
    env = {k: v for k, v in os.environ.items() if k != "RETAILBUS_AMQP_URI"}
    log = tmp_path / "up.log"
    up = subprocess.Popen([str(Path(sys.executable).with_name("retailbus")), "up", "--config", str(config)],
                          env=env, cwd=tmp_path, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                          start_new_session=True)
    targets = {name: f"127.0.0.1:{port}" for name, port in zip(SERVICES, metric_ports)}
    targets["store_agent"] = f"127.0.0.1:{agent_port}"
    try:
        assert wait_for(lambda: all(reachable(f"http://{t}/metrics") for t in targets.values())
                        or up.poll() is not None, timeout=240), log.read_text()[-4000:]
        assert up.poll() is None, log.read_text()[-4000:]
        yield tmp_path, targets, f"http://{targets['store_agent']}", read_config(config)["RETAILBUS"]["loyalty_platform"]["http"], \
            f"http://127.0.0.1:{api_port}"
    finally:
        code = stop(up, timeout=120)
        assert code == 0, log.read_text()[-4000:]


def traffic(root: Path, agent: str, loyalty_platform: str):
    sale = http_json(f"{agent}/erp/sales", legacy_sale("DASH-0001"))
    assert sale["STATUS"] == "OK", sale
    for path, body in (("/members", {"card": "LC-DASH", "customer_id": "C-DASH"}),
                       ("/transactions", {"card": "LC-DASH", "type": "EARN", "points": 900, "reference": "seed"})):
        request = urllib.request.Request(f"http://{loyalty_platform}{path}", data=json.dumps(body).encode(),
                                         headers={"Idempotency-Key": f"dash{path}"})
        urllib.request.urlopen(request, timeout=10).read()
    hold = http_json(f"{agent}/v1/loyalty/authorize", {"CARD": "LC-DASH", "POINTS": 500, "TXN_ID": "DASH-0002"})
    assert hold["STATUS"] == "OK" and not hold["OFFLINE"], hold
    paid = {**legacy_sale("DASH-0002"), "LOYALTY_CARD": "LC-DASH"}
    paid["TENDERS"] = [{"TYPE": "CASH", "AMOUNT": paid["TOTAL"] - 500},
                       {"TYPE": "LOYALTY", "AMOUNT": 500, "HOLD_ID": hold["HOLD_ID"]}]
    sale = http_json(f"{agent}/erp/sales", paid)
    assert sale["STATUS"] == "OK", sale
    stock = http_json(f"{agent}/erp/stock?STORE=S001&SKU=100001")
    assert stock, stock
    drops = root / "drops"
    write_customer_export(drops / "customers" / "customers_20261127.csv", customer_rows(3))
    bad = [stock_line("S001", "100001", 5), stock_line("S001", "100002", 7)[:-3]]
    write_stock_snapshot(drops / "stock" / "stock_bad.dat", bad, total=12)
    assert wait_for(lambda: (drops / "stock" / "error" / "stock_bad.dat").exists(), timeout=60)
    assert wait_for(lambda: list((drops / "customers" / "archive").rglob("customers_20261127.csv")), timeout=60)
    conn = sqlite3.connect(root / "var" / "legacy_erp.db", timeout=30)  # a legacy program moves stock
    try:
        with conn:
            changed = conn.execute("UPDATE STK_LVL SET ON_HAND = ON_HAND + 1, UPD_TS = ? "
                                   "WHERE STORE_NO = 'S001' AND SKU = '100003'", (utc_stamp(),)).rowcount
    finally:
        conn.close()
    assert changed == 1


def orders(root: Path, agent: str, api: str):
    """Click and collect: one order collected at the store, one cancelled (more than the store has)."""
    key = bytes.fromhex(TerminalKeys(root / "var" / "orders_api" / "client_keys.json").add("WEB"))
    for order_id, quantity in (("W-DASH-1", 1), ("W-DASH-2", 5000)):
        body = json.dumps(order_body(order_id, "S001", [("100004", quantity, 100)])).encode()
        request = urllib.request.Request(f"{api}/v1/orders", data=body, headers={
            "Content-Type": "application/json", **signed_headers("WEB", key, "POST", "/v1/orders", body)})
        assert urllib.request.urlopen(request, timeout=10).status == 202
    assert wait_for(lambda: http_json(f"{agent}/v1/fulfilment/tasks")["TASKS"], timeout=120)
    for what in ("picked", "collected"):
        assert http_json(f"{agent}/v1/fulfilment/{what}", {"ORDER_ID": "W-DASH-1", "TERMINAL": "A1"})["STATUS"] == "OK"


def start_prometheus(root: Path, targets: dict[str, str]) -> tuple[subprocess.Popen, str]:
    port, = free_ports(1)
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ALERTS)],
        "scrape_configs": [{"job_name": "retailbus", "static_configs": [
            {"targets": [target], "labels": {"service": name}} for name, target in targets.items()]}],
    }
    path = root / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    process = subprocess.Popen(
        ["prometheus", f"--config.file={path}", f"--storage.tsdb.path={root / 'prometheus'}",
         f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=1h"],
        stdout=(root / "prometheus.log").open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    assert wait_for(lambda: reachable(f"{base}/-/ready") or process.poll() is not None, timeout=60)
    assert process.poll() is None, (root / "prometheus.log").read_text()[-3000:]
    return process, base


@pytest.mark.timeout(600)
def test_every_dashboard_query_returns_data_from_a_running_bus(estate):
    root, targets, agent, loyalty_platform, orders_api = estate
    traffic(root, agent, loyalty_platform)
    orders(root, agent, orders_api)
    prometheus, base = start_prometheus(root, targets)
    try:
        assert wait_for(lambda: all(t["health"] == "up" for t in
                                    http_json(f"{base}/api/v1/targets")["data"]["activeTargets"]),
                        timeout=60), http_json(f"{base}/api/v1/targets")["data"]["activeTargets"]

        exprs = sorted({promql(e) for e in dashboard_exprs()})
        empty = set(exprs)
        deadline = time.monotonic() + QUERY_TIMEOUT
        while empty and time.monotonic() < deadline:
            empty = {e for e in empty if not prom_query(base, e)}
            time.sleep(1)
        assert not empty, (f"{len(empty)} of {len(exprs)} dashboard queries return no data:\n  "
                           + "\n  ".join(sorted(empty)))

        expected = [g["name"] for g in yaml.safe_load(ALERTS.read_text())["groups"]]

        def rule_health() -> dict[str, list[str]]:
            groups = http_json(f"{base}/api/v1/rules")["data"]["groups"]
            return {g["name"]: [r["health"] for r in g["rules"]] for g in groups}
        assert wait_for(lambda: all(h == ["ok"] * len(h) for h in rule_health().values()) and rule_health(),
                        timeout=60), rule_health()
        loaded = rule_health()
        assert sorted(loaded) == sorted(expected)
        assert sum(len(h) for h in loaded.values()) == sum(
            len(g["rules"]) for g in yaml.safe_load(ALERTS.read_text())["groups"])
    finally:
        prometheus.send_signal(signal.SIGTERM)
        try:
            prometheus.wait(timeout=30)
        except subprocess.TimeoutExpired:
            prometheus.kill()
            prometheus.wait()
