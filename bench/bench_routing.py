"""Routing cost: the per-message decision, and a store agent in legacy mode versus
the POS calling the legacy ERP directly (the raw baseline, same run).

    python -m bench.bench_routing [--amqp-uri URI] [--sales 500] [--runs 3]

Goals: decision < 5 us per message; agent p50 overhead in legacy mode < 2 ms.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

from bench.common import bench_broker, emit_json, environment, median, peak_rss_kib, process_hwm_kib
from routing.route_table import parse_route_table

GOALS = {"decision_us": 5.0, "legacy_p50_overhead_ms": 2.0}
REPO = Path(__file__).resolve().parents[1]
TABLE = """version: 1
legacy: {base_url: "http://127.0.0.1:%d", timeout: 5}
routes:
  - {name: sales, message: pos.sale.v1, legacy: POST /erp/sales, mode: bus, rollout: {stores: [S001], percent: 25}}
  - {name: returns, message: pos.return.v1, legacy: POST /erp/returns, mode: shadow}
  - {name: stock, message: pos.stock_query.v1, legacy: GET /erp/stock, mode: legacy}
"""


def decision_run(n: int) -> tuple[float, float]:
    """(raw dict lookup, RouteTable.decide) in microseconds per message."""
    table = parse_route_table(TABLE % 8081)
    stores = [f"S{i:03d}" for i in range(1000)]
    types = ["pos.sale.v1", "pos.return.v1", "pos.stock_query.v1"]
    calls = [(types[i % 3], stores[i % 1000]) for i in range(n)]
    raw_modes = {r.message: r.mode for r in table.routes}
    started = time.perf_counter()
    for message, _store in calls:
        raw_modes.get(message)
    raw = (time.perf_counter() - started) / n * 1e6
    decide = table.decide
    started = time.perf_counter()
    for message, store in calls:
        decide(message, store)
    return raw, (time.perf_counter() - started) / n * 1e6


def sale(n: int) -> bytes:
    return json.dumps({"STORE": "S001", "TERMINAL": "07", "TXN_ID": f"S001-B{n:07d}", "TXN_DATE": "20261127",
                       "TXN_TIME": "101500", "CURRENCY": "EUR",
                       "LINES": [{"SKU": "100001", "QTY": 1, "PRICE": 199, "DISC": 0, "LINE": 199}],
                       "TENDERS": [{"TYPE": "CASH", "AMOUNT": 199}], "TOTAL": 199}).encode()


def p50_ms(port: int, first: int, count: int) -> float:
    """p50 of `count` sales over one keep-alive connection, one at a time like a till."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    seconds = []
    for n in range(first, first + count):
        started = time.perf_counter()
        conn.request("POST", "/erp/sales", body=sale(n), headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        body = response.read()
        seconds.append(time.perf_counter() - started)
        assert response.status == 200, body
    conn.close()
    return sorted(seconds)[len(seconds) // 2] * 1000


def wait_http(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=1).read()
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{url} did not come up")


def start_estate(home: Path, uri: str, erp_port: int, agent_port: int) -> list[subprocess.Popen]:
    shipped = yaml.safe_load((REPO / "config" / "bus.yaml").read_text())
    config = {k: v for k, v in shipped.items() if k not in ("RETAILBUS", "LOGGING")}
    config.update(AMQP_URI=uri, STORE_ID="S001", WEB_SERVER_ADDRESS=f"127.0.0.1:{agent_port}")
    config["LOGGING"] = {"version": 1, "root": {"level": "WARNING"}}
    config["RETAILBUS"] = {"root": str(home), "stores": [{"id": "S001", "http": f"127.0.0.1:{agent_port}"}],
                           "agent": {"auth_required": False}, "routes_file": "routes.yaml"}
    (home / "bus.yaml").write_text(yaml.safe_dump(config))
    (home / "routes.yaml").write_text(TABLE.replace("mode: bus, rollout: {stores: [S001], percent: 25}",
                                                    "mode: legacy") % erp_port)
    env = {**os.environ, "RETAILBUS_STORE": "S001", "PYTHONWARNINGS": "ignore"}
    db = f"sqlite:///{home / 'legacy.db'}"
    out = (home / "estate.log").open("ab")
    procs = [subprocess.Popen([sys.executable, "-m", "demo.legacy_erp", "serve", "--init", "--db", db,
                               "--port", str(erp_port)], cwd=REPO, env=env, stdout=out, stderr=out,
                              start_new_session=True),
             subprocess.Popen([sys.executable, "-m", "nameko", "run", "--config", str(home / "bus.yaml"),
                               "routing.store_agent"], cwd=REPO, env=env, stdout=out, stderr=out,
                              start_new_session=True)]
    wait_http(f"http://127.0.0.1:{erp_port}/erp/health")
    wait_http(f"http://127.0.0.1:{agent_port}/healthz")
    return procs


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--amqp-uri", help="an existing broker (default: a throw-away node)")
    parser.add_argument("--sales", type=int, default=500, help="sales per path per run")
    parser.add_argument("--decisions", type=int, default=200_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    decisions = [decision_run(args.decisions) for _ in range(args.runs)]
    raw_us, ours_us = median([d[0] for d in decisions]), median([d[1] for d in decisions])
    print(f"decision: raw dict lookup {raw_us:.3f} us, RouteTable.decide {ours_us:.3f} us "
          f"(x{ours_us / raw_us:.1f}); goal < {GOALS['decision_us']} us: "
          f"{'met' if ours_us < GOALS['decision_us'] else 'MISSED'}", flush=True)
    figures: dict = {"runs": args.runs, "sales": args.sales, "goals": GOALS, "raw_decision_us": raw_us,
                     "decision_us": ours_us, "decision_ratio": ours_us / raw_us}
    with tempfile.TemporaryDirectory(prefix="retailbus-bench-routing-") as tmp, \
            bench_broker(args.amqp_uri) as (uri, _):
        erp_port, agent_port = free_ports(2)
        procs = start_estate(Path(tmp), uri, erp_port, agent_port)
        try:
            p50_ms(erp_port, 9_000_000, 50)  # warm both paths (connections, SQLite pages)
            p50_ms(agent_port, 9_100_000, 50)
            direct, agent = [], []
            for run in range(args.runs):
                direct.append(p50_ms(erp_port, run * 2 * args.sales, args.sales))
                agent.append(p50_ms(agent_port, run * 2 * args.sales + args.sales, args.sales))
            figures["agent_hwm_kib"] = process_hwm_kib(procs[1].pid)
        finally:
            for p in procs:
                p.send_signal(signal.SIGTERM)
            for p in procs:
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()
        overhead = median(agent) - median(direct)
        print(f"legacy mode: direct p50 {median(direct):.2f} ms, via agent {median(agent):.2f} ms, "
              f"overhead {overhead:.2f} ms (x{median(agent) / median(direct):.2f}); goal < "
              f"{GOALS['legacy_p50_overhead_ms']} ms: {'met' if overhead < GOALS['legacy_p50_overhead_ms'] else 'MISSED'}")
        figures.update(raw_direct_p50_ms=median(direct), agent_p50_ms=median(agent),
                       legacy_p50_overhead_ms=overhead, latency_ratio=median(agent) / median(direct),
                       runs_ms={"direct": direct, "agent": agent}, peak_rss_kib=peak_rss_kib(),
                       environment=environment(uri))
    emit_json(figures)


if __name__ == "__main__":
    main()
