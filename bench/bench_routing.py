"""Routing cost: the per-message decision, and a store agent in legacy mode versus
the POS calling the legacy ERP directly (the raw baseline, same run).

    python bench/bench_routing.py [--amqp-uri URI] [--sales 500] [--runs 3]

Goals: decision < 5 us per message; agent p50 overhead in legacy mode < 2 ms.

The three paths are timed interleaved, one sale each in turn, so background load
hits them alike: `direct` is a till calling the ERP (plain http.client), `direct
quick-ACK` calls it with the TCP settings the agent's own client uses (it asks
for immediate ACKs, which avoids the ERP's Nagle/delayed-ACK stall of ~40 ms),
and `agent` goes through the store agent. The goal is judged against `direct
quick-ACK`: that is what the agent adds beyond its own ERP call; against the
plain till the agent is faster (`overhead_vs_till_ms`, negative).
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
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from bench.common import (bench_broker, cpu_seconds, emit_json, environment, median,  # noqa: E402
                          peak_rss_kib, process_hwm_kib, wait_http)
from routing.route_table import parse_route_table  # noqa: E402

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


def timed_sale(conn: http.client.HTTPConnection, n: int, quickack: bool) -> float:
    """Seconds for one sale over a keep-alive connection, one at a time like a till."""
    started = time.perf_counter()
    conn.request("POST", "/erp/sales", body=sale(n), headers={"Content-Type": "application/json"})
    if quickack:  # as legacy_wrappers/legacy_http.py does once the request is out
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
    response = conn.getresponse()
    body = response.read()
    assert response.status == 200, body
    return time.perf_counter() - started


def p50s_ms(paths: dict[str, tuple[int, bool]], first: int, count: int) -> dict[str, float]:
    """p50 per path of `count` sales each, the paths taking turns sale by sale."""
    conns = {name: http.client.HTTPConnection("127.0.0.1", port, timeout=10) for name, (port, _) in paths.items()}
    seconds: dict[str, list[float]] = {name: [] for name in paths}
    n = first
    for _ in range(count):
        for name, (_, quickack) in paths.items():
            seconds[name].append(timed_sale(conns[name], n, quickack))
            n += 1
    for conn in conns.values():
        conn.close()
    return {name: sorted(s)[len(s) // 2] * 1000 for name, s in seconds.items()}


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
    figures: dict = {"bench": "routing", "runs": args.runs, "sales": args.sales, "goals": GOALS, "raw_decision_us": raw_us,
                     "decision_us": ours_us, "decision_ratio": ours_us / raw_us}
    with tempfile.TemporaryDirectory(prefix="retailbus-bench-routing-") as tmp, \
            bench_broker(args.amqp_uri) as (uri, _):
        erp_port, agent_port = free_ports(2)
        procs = start_estate(Path(tmp), uri, erp_port, agent_port)
        try:
            paths = {"direct": (erp_port, False), "direct_quickack": (erp_port, True), "agent": (agent_port, False)}
            p50s_ms(paths, 9_000_000, 50)  # warm every path (connections, SQLite pages)
            cpu_before = cpu_seconds(procs[1].pid)
            runs = [p50s_ms(paths, run * len(paths) * args.sales, args.sales) for run in range(args.runs)]
            # everything the agent process did meanwhile, per sale it forwarded (bookkeeping included)
            agent_cpu_ms = (cpu_seconds(procs[1].pid) - cpu_before) / (args.runs * args.sales) * 1000
            figures["agent_hwm_kib"] = process_hwm_kib(procs[1].pid)
        finally:
            for p in procs:
                p.send_signal(signal.SIGTERM)
            for p in procs:
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()
        p50 = {name: median([r[name] for r in runs]) for name in paths}
        overhead, vs_till = p50["agent"] - p50["direct_quickack"], p50["agent"] - p50["direct"]
        print(f"legacy mode: direct p50 {p50['direct']:.2f} ms (till client), direct quick-ACK "
              f"{p50['direct_quickack']:.2f} ms (agent's TCP settings), via agent {p50['agent']:.2f} ms")
        print(f"agent overhead {overhead:.2f} ms over direct quick-ACK (x{p50['agent'] / p50['direct_quickack']:.2f}), "
              f"{vs_till:+.2f} ms against the till client; goal < {GOALS['legacy_p50_overhead_ms']} ms: "
              f"{'met' if overhead < GOALS['legacy_p50_overhead_ms'] else 'MISSED'}")
        print(f"agent CPU {agent_cpu_ms:.2f} ms per sale; per-run p50s (direct quick-ACK / agent): "
              + ", ".join(f"{r['direct_quickack']:.2f}/{r['agent']:.2f}" for r in runs))
        figures.update(raw_direct_p50_ms=p50["direct"], direct_quickack_p50_ms=p50["direct_quickack"],
                       agent_p50_ms=p50["agent"], legacy_p50_overhead_ms=overhead, overhead_vs_till_ms=vs_till,
                       latency_ratio=p50["agent"] / p50["direct_quickack"], agent_cpu_ms_per_sale=agent_cpu_ms,
                       runs_ms={name: [r[name] for r in runs] for name in paths}, peak_rss_kib=peak_rss_kib(),
                       environment=environment(uri))
    figures["goals_met"] = {name: figures[name] < GOALS[name] for name in GOALS}
    emit_json(figures)


if __name__ == "__main__":
    main()
