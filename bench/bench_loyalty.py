"""The loyalty service: redemption authorisation latency and accrual lag, against raw baselines.

    python bench/bench_loyalty.py [--amqp-uri URI] [--runs 3] [--calls 300] [--rate 200] [--seconds 20]

Real processes, as `retailbus up` runs them (`python -m bus.runner`): the demo loyalty
platform, the loyalty service (accrual mode api) and one store agent, on a throw-away
broker, journal off.

(a) authorisation through the loyalty RPC: a kept `ClusterRpcProxy` calls
    `loyalty.authorize_redemption` one after another, each a new transaction (a new
    hold at the platform), p50 and p99 per run. Goal: p99 < 50 ms.
(b) the same through the store agent: signed `POST /v1/loyalty/authorize` on one
    keep-alive connection: what a till waits.
(c) raw: the same hold asked of the platform directly (`POST /holds`, keep-alive).
    Runs alternate (a), (b), (c), so a slow spell hits all three.
(d) accrual lag at RATE sales/s, open loop: `erp.sale_posted.v1` events published on
    a fixed schedule (a sale's `posted_at` is its scheduled moment, so a publisher that
    falls behind does not hide the wait), each for a card the platform knows; lag =
    when the platform booked its EARN (the ledger's `created`) - `posted_at`. Goal:
    p99 < 2 s.
(e) raw: the same schedule published with plain py-amqp to a queue, consumed by plain
    py-amqp (prefetch 100, one thread) that asks the platform for the member's tier and
    books the EARN over plain HTTP, then acks: the accrual path's work without nameko,
    the inbox or the service's own database. Lag measured the same way.
Each figure is the median of the runs'; ratios are ours over raw.
"""
import eventlet

eventlet.monkey_patch()  # the publisher and the RPC proxy run on eventlet; must precede other imports

import argparse  # noqa: E402
import http.client  # noqa: E402
import json  # noqa: E402
import socket  # noqa: E402
import sqlite3  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from datetime import date, datetime, timedelta, timezone  # noqa: E402
from pathlib import Path  # noqa: E402

import amqp  # noqa: E402
import yaml  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from bench.common import (bench_broker, emit_json, environment, median, percentile, start_process,  # noqa: E402
                          stop_process, wait_http)
from bus.extensions import event_message  # noqa: E402
from bus.publisher import ConfirmingPublisher, connection_params  # noqa: E402
from contracts.envelope import CloudEvent  # noqa: E402
from contracts.erp import ErpSalePostedV1  # noqa: E402
from routing.edge_auth import TerminalKeys, signed_headers  # noqa: E402
from services.broker.setup import free_ports  # noqa: E402

# The issue asks authorisation p99 < 50 ms through the agent (what a till waits); the RPC alone is held to it too.
GOALS = {"authorise_agent_p99_ms": 50.0, "authorise_rpc_p99_ms": 50.0, "accrual_lag_p99_s": 2.0}
REPO = Path(__file__).resolve().parents[1]
STORE, TERMINAL, CARD = "S001", "07", "LC0000000001"
CARDS = [f"LB{n:04d}" for n in range(200)]
RAW_QUEUE = "bench-loyalty-raw-accrual"
TCP_QUICKACK = getattr(socket, "TCP_QUICKACK", 12)


def call(conn: http.client.HTTPConnection, path: str, body: bytes, headers: dict) -> tuple[int, dict]:
    conn.request("POST", path, body, {"Content-Type": "application/json", **headers})
    # The demo platform writes its answer's head and body in two segments (Nagle): without a quick
    # ACK the body waits ~40 ms for our delayed one. The loyalty service's client does the same
    # (legacy_wrappers/legacy_http.py), so both sides measure the platform, not that stall.
    conn.sock.setsockopt(socket.IPPROTO_TCP, TCP_QUICKACK, 1)
    answer = conn.getresponse()
    return answer.status, json.loads(answer.read())


def timed(conn, requests) -> list[float]:
    """Milliseconds per call; every call must be granted online (else the figure means nothing)."""
    out = []
    for path, body, headers in requests:
        started = time.perf_counter()
        status, answer = call(conn, path, body, headers)
        out.append((time.perf_counter() - started) * 1000)
        if status not in (200, 201) or answer.get("OFFLINE"):
            raise RuntimeError(f"{path}: {status} {answer}")
    return out


def write_config(home: Path, uri: str, agent_port: int, platform_port: int) -> Path:
    shipped = yaml.safe_load((REPO / "config" / "bus.yaml").read_text())
    config = {k: v for k, v in shipped.items() if k != "RETAILBUS"}
    config.update(AMQP_URI=uri, WEB_SERVER_ADDRESS=f"127.0.0.1:{agent_port}")
    config["RETAILBUS"] = {"root": str(home), "stores": [{"id": STORE, "http": f"127.0.0.1:{agent_port}"}],
                           "loyalty_platform": {"http": f"127.0.0.1:{platform_port}", "db": "var/platform.db"},
                           "journal": {"enabled": False}}
    path = home / "config" / "bus.yaml"
    path.write_text(yaml.safe_dump(config))
    (home / "config" / "routes.yaml").write_text((REPO / "config" / "routes.yaml").read_text())
    (home / "config" / "loyalty.yaml").write_text(yaml.safe_dump({
        "accrual": {"mode": "api"}, "redemption": {"hold_ttl_seconds": 3600}}))
    return path


def enrol(platform: http.client.HTTPConnection) -> None:
    for card in [CARD, *CARDS]:
        call(platform, "/members", json.dumps({"card": card, "customer_id": f"C-{card}"}).encode(),
             {"Idempotency-Key": f"m-{card}"})
    call(platform, "/transactions", json.dumps({"card": CARD, "type": "EARN", "points": 10 ** 9,
                                                "reference": "bench"}).encode(), {"Idempotency-Key": "seed"})


def sale_posted(prefix: str, n: int, posted_at: datetime) -> CloudEvent:
    txn = f"{STORE}-{prefix}-{n:06d}"
    doc = ErpSalePostedV1(store_id=STORE, pos_txn_id=txn, doc_no=f"D{prefix}{n}", business_day=date.today(),
                          posted_at=posted_at, currency="EUR", total_minor=1999, loyalty_card=CARDS[n % len(CARDS)],
                          lines=[{"sku": "100001", "quantity": 1, "line_total_minor": 1999}])
    return CloudEvent.new(ErpSalePostedV1.TYPE, "erp", doc, subject=txn, idempotencykey=f"{doc.TYPE}:{doc.doc_no}")


def open_loop(publish, prefix: str, rate: float, seconds: float) -> dict[str, datetime]:
    """Publish a sale every 1/rate s for `seconds`; each stamped with its scheduled moment."""
    scheduled, start_at = {}, time.monotonic()
    wall = datetime.now(timezone.utc)
    for n in range(int(rate * seconds)):
        due = start_at + n / rate
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        posted_at = wall + timedelta(seconds=n / rate)
        event = sale_posted(prefix, n, posted_at)
        publish(event)
        scheduled[f"{STORE}/{event.subject}"] = posted_at
    late = time.monotonic() - start_at - seconds
    print(f"  published {len(scheduled)} at {rate:g}/s ({late:+.2f} s behind schedule at the end)", flush=True)
    return scheduled


def lags(db: Path, scheduled: dict[str, datetime], timeout: float = 300) -> list[float]:
    """Seconds from posting to the platform's EARN of each sale, once all are booked."""
    deadline = time.monotonic() + timeout
    while True:
        with sqlite3.connect(db, timeout=30) as conn:
            rows = dict(conn.execute("SELECT reference, created FROM ledger WHERE type = 'EARN' AND reference IN "
                                     "(SELECT value FROM json_each(?))", (json.dumps(list(scheduled)),)))
        if len(rows) == len(scheduled) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    if len(rows) < len(scheduled):
        raise RuntimeError(f"only {len(rows)} of {len(scheduled)} sales booked in {timeout:.0f}s")
    return [(datetime.fromisoformat(rows[ref]) - at).total_seconds() for ref, at in scheduled.items()]


class RawAccrual(threading.Thread):
    """The accrual path by hand: py-amqp consume, the platform's member and EARN over plain HTTP, ack."""

    def __init__(self, uri: str, platform_port: int):
        super().__init__(daemon=True)
        self.uri, self.port, self.stopping, self.error = uri, platform_port, threading.Event(), None

    def run(self):
        try:
            conn = amqp.Connection(**connection_params(self.uri, 10))
            conn.connect()
            ch = conn.channel()
            ch.basic_qos(0, 100, False)
            http_conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)

            def on_message(message):
                data = json.loads(message.body)["data"]
                http_conn.request("GET", "/members/" + data["loyalty_card"])
                http_conn.sock.setsockopt(socket.IPPROTO_TCP, TCP_QUICKACK, 1)
                http_conn.getresponse().read()
                body = json.dumps({"card": data["loyalty_card"], "type": "EARN", "points": data["total_minor"] // 100,
                                   "reference": f"{data['store_id']}/{data['pos_txn_id']}",
                                   "store": data["store_id"]}).encode()
                call(http_conn, "/transactions", body, {"Idempotency-Key": f"raw-earn:{data['pos_txn_id']}"})
                ch.basic_ack(message.delivery_tag)
            ch.basic_consume(RAW_QUEUE, callback=on_message)
            while not self.stopping.is_set():
                try:
                    conn.drain_events(timeout=0.2)
                except socket.timeout:
                    pass
            conn.close()
        except Exception as exc:  # reported by the main thread
            self.error = exc


def raw_accrual(uri: str, platform_port: int, db: Path, rate: float, seconds: float, run: int) -> list[float]:
    conn = amqp.Connection(**connection_params(uri, 10))
    conn.connect()
    ch = conn.channel()
    ch.queue_declare(RAW_QUEUE, durable=True, auto_delete=False)
    ch.confirm_select()
    consumer = RawAccrual(uri, platform_port)
    consumer.start()
    try:
        def publish(event: CloudEvent):
            ch.basic_publish(amqp.Message(event.to_json(), delivery_mode=2), exchange="", routing_key=RAW_QUEUE)
        scheduled = open_loop(publish, f"R{run}", rate, seconds)
        return lags(db, scheduled)
    finally:
        consumer.stopping.set()
        consumer.join(30)
        conn.close()
        if consumer.error:
            raise consumer.error


def our_accrual(uri: str, db: Path, rate: float, seconds: float, run: int) -> list[float]:
    publisher = ConfirmingPublisher(uri, window=500)
    try:
        scheduled = open_loop(lambda e: publisher.publish(event_message(e, "erp.events")), f"O{run}", rate, seconds)
        return lags(db, scheduled)
    finally:
        publisher.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--amqp-uri", help="an existing broker (default: a throw-away node)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--calls", type=int, default=300, help="authorisations per run and side")
    parser.add_argument("--rate", type=float, default=200.0, help="posted sales per second (accrual)")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each accrual run")
    args = parser.parse_args()
    from nameko.standalone.rpc import ClusterRpcProxy

    with bench_broker(args.amqp_uri) as (uri, _), tempfile.TemporaryDirectory(prefix="retailbus-bench-") as tmp:
        home = Path(tmp)
        (home / "config").mkdir()
        (home / "var").mkdir()
        agent_port, platform_port = free_ports(2)
        config = write_config(home, uri, agent_port, platform_port)
        key = bytes.fromhex(TerminalKeys(home / "var" / "stores" / STORE / "terminal_keys.json").add(TERMINAL))
        runner = [sys.executable, "-m", "bus.runner", "--config", str(config)]
        platform_db = home / "var" / "platform.db"
        processes = [start_process([sys.executable, "-m", "demo.loyalty_platform", "--db", str(platform_db),
                            "--port", str(platform_port)], home, "platform", PYTHONPATH=str(REPO))]
        auth = {"rpc": [], "agent": [], "raw": []}
        accrual = {"ours": [], "raw": []}
        try:
            wait_http(f"http://127.0.0.1:{platform_port}/health")
            processes.append(start_process(runner + ["services.loyalty"], home, "loyalty", PYTHONPATH=str(REPO)))
            processes.append(start_process(runner + ["routing.store_agent"], home, "agent", RETAILBUS_STORE=STORE,
                                   PYTHONPATH=str(REPO)))
            wait_http(f"http://127.0.0.1:{agent_port}/healthz", timeout=120)
            platform = http.client.HTTPConnection("127.0.0.1", platform_port, timeout=30)
            enrol(platform)
            agent = http.client.HTTPConnection("127.0.0.1", agent_port, timeout=30)
            with ClusterRpcProxy({"AMQP_URI": uri}, timeout=30) as rpc:
                warm = time.monotonic() + 120
                while True:  # until the loyalty service answers
                    try:
                        rpc.loyalty.authorize_redemption(CARD, 1, STORE, f"W{time.time_ns()}")
                        break
                    except Exception:
                        if time.monotonic() > warm:
                            raise
                        time.sleep(1)
                for run in range(args.runs):
                    ms = []
                    for n in range(args.calls):
                        started = time.perf_counter()
                        rpc.loyalty.authorize_redemption(CARD, 1, STORE, f"{STORE}-RPC-{run}-{n}")
                        ms.append((time.perf_counter() - started) * 1000)
                    agent_calls, raw_calls = [], []
                    for n in range(args.calls):
                        txn = f"{STORE}-{TERMINAL}-{run}-{n}"
                        body = json.dumps({"CARD": CARD, "POINTS": 1, "TXN_ID": txn}).encode()
                        agent_calls.append(("/v1/loyalty/authorize", body,
                                            signed_headers(TERMINAL, key, "POST", "/v1/loyalty/authorize", body)))
                        body = json.dumps({"card": CARD, "points": 1, "reference": f"raw-{run}-{n}", "store": STORE,
                                           "ttl_seconds": 3600}).encode()
                        raw_calls.append(("/holds", body, {"Idempotency-Key": f"raw-{run}-{n}"}))
                    for name, values in (("rpc", ms), ("agent", timed(agent, agent_calls)),
                                         ("raw", timed(platform, raw_calls))):
                        auth[name].append((percentile(values, 50), percentile(values, 99)))
                    print(f"authorisation run {run + 1}: " + " | ".join(
                        f"{name} p50 {v[-1][0]:.2f} ms p99 {v[-1][1]:.2f} ms" for name, v in auth.items()), flush=True)
            for run in range(args.runs):
                print(f"accrual run {run + 1}: ours", flush=True)
                ours = our_accrual(uri, platform_db, args.rate, args.seconds, run)
                print("  raw", flush=True)
                raw = raw_accrual(uri, platform_port, platform_db, args.rate, args.seconds, run)
                for name, values in (("ours", ours), ("raw", raw)):
                    accrual[name].append((percentile(values, 50), percentile(values, 99)))
                print(f"  lag ours p50 {accrual['ours'][-1][0]:.3f} s p99 {accrual['ours'][-1][1]:.3f} s | "
                      f"raw p50 {accrual['raw'][-1][0]:.3f} s p99 {accrual['raw'][-1][1]:.3f} s", flush=True)
        finally:
            for process in reversed(processes):
                stop_process(process)
        figures = {f"authorise_{name}_{p}_ms": median([v[i] for v in values])
                   for name, values in auth.items() for i, p in enumerate(("p50", "p99"))}
        figures.update({f"accrual_lag_{name}_{p}_s": median([v[i] for v in values])
                        for name, values in accrual.items() for i, p in enumerate(("p50", "p99"))})
        figures["authorise_rpc_p99_ratio"] = figures["authorise_rpc_p99_ms"] / figures["authorise_raw_p99_ms"]
        figures["accrual_lag_p99_ratio"] = figures["accrual_lag_ours_p99_s"] / figures["accrual_lag_raw_p99_s"]
        print(f"authorisation p99: RPC {figures['authorise_rpc_p99_ms']:.2f} ms, agent "
              f"{figures['authorise_agent_p99_ms']:.2f} ms, platform directly {figures['authorise_raw_p99_ms']:.2f} ms "
              f"(goal < {GOALS['authorise_agent_p99_ms']:g} ms); accrual lag p99 at {args.rate:g}/s: ours "
              f"{figures['accrual_lag_ours_p99_s']:.3f} s, raw {figures['accrual_lag_raw_p99_s']:.3f} s "
              f"(goal < {GOALS['accrual_lag_p99_s']:g} s)", flush=True)
        emit_json({"bench": "loyalty", **figures, "calls": args.calls, "runs": args.runs, "rate": args.rate,
                   "seconds": args.seconds, "goals": GOALS,
                   "goals_met": {name: figures[name] < goal for name, goal in GOALS.items()
                                 if name != "accrual_lag_p99_s"}
                   | {"accrual_lag_p99_s": figures["accrual_lag_ours_p99_s"] < GOALS["accrual_lag_p99_s"]},
                   **environment(uri)})


if __name__ == "__main__":
    main()
