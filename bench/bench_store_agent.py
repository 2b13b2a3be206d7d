"""Store agent capacity: signed POS sales accepted per second and their latency, the
latency while a backlog drains, and the drain itself against raw py-amqp, same run.

    python bench/bench_store_agent.py [--amqp-uri URI] [--runs 3] [--sales 3000]
                                      [--clients 1,8,32] [--backlog 100000] [--rate 100]

One real agent process (`python -m bus.runner ... routing.store_agent`, as `retailbus
up` runs it, with the shipped logging), outbox in WAL with `synchronous=FULL`, sales
route in bus mode, every call signed by its terminal:

(a) accepted sales/s and p50/p99 accept latency with 1, 8 and 32 concurrent tills,
    each a keep-alive connection sending `POST /erp/sales` one after another, while
    the forwarder drains to the broker. Goal: >= 1,000 sales/s at 32 tills. Reported
    beside it: plain sqlite3 committing (fsync) each sale alone, same settings.
(b) p99 POS latency at `--rate` sales/s, open loop (each sale sent at its time whatever
    the earlier answers; latency counted from that time), while a `--backlog`-row
    outbox drains. Goal: p99 < 10 ms.
(c) drain of `--backlog` outbox rows to the broker, no POS load, against raw py-amqp
    publishing the same bodies, headers and properties with a window of 1,000
    confirms to the same exchange and queue. Goal: ours >= 0.6x raw.
"""
import warnings

warnings.filterwarnings("ignore", message=r"\s*Eventlet is deprecated")  # its import-time banner
import eventlet  # noqa: E402

eventlet.monkey_patch()  # the tills are greenthreads; must precede other imports

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import sqlite3  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections import Counter, deque  # noqa: E402
from pathlib import Path  # noqa: E402

import amqp  # noqa: E402
import yaml  # noqa: E402
from eventlet import tpool  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from bench.common import (bench_broker, connect, cpu_seconds, emit_json, environment, median,  # noqa: E402
                          peak_rss_kib, percentile, process_hwm_kib, wait_http)
from bus import topology  # noqa: E402
from bus.constants import H_STORE, H_STORE_SEQ  # noqa: E402
from contracts.envelope import CloudEvent  # noqa: E402
from contracts.pos import idempotency_key  # noqa: E402
from routing.edge_auth import TerminalKeys, signed_headers  # noqa: E402
from routing.legacy_payload import sale_from_legacy  # noqa: E402
from routing.outbox import Outbox  # noqa: E402
from services.broker.setup import free_ports  # noqa: E402

GOALS = {"sales_per_s_at_32": 1000, "p99_ms_while_draining": 10.0, "drain_ratio": 0.6}
REPO = Path(__file__).resolve().parents[1]
STORE = "S001"
EXCHANGE = topology.events_exchange("store_agent")
SINK = "bench.store_agent.sink"  # bound like the erp's sales queue: every forwarded sale is routed
WINDOW = 1000  # unconfirmed publishes in flight: raw's, and the agent's (RETAILBUS.publisher.window)


def legacy_sale(terminal: str, txn: str, store: str = STORE) -> bytes:
    return json.dumps({"STORE": store, "TERMINAL": terminal, "TXN_ID": txn, "TXN_DATE": "20261127",
                       "TXN_TIME": "101500", "CURRENCY": "EUR",
                       "LINES": [{"SKU": "100001", "QTY": 2, "PRICE": 1999, "DISC": 0, "LINE": 3998},
                                 {"SKU": "100002", "QTY": 1, "PRICE": 499, "DISC": 0, "LINE": 499}],
                       "TENDERS": [{"TYPE": "CARD", "AMOUNT": 4497}], "TOTAL": 4497}).encode()


class Till:
    """One POS connection, kept alive; `call` sends a prepared request and reads the answer."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def _more(self):
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("the agent closed the connection")
        self.buf += chunk

    def call(self, request: bytes) -> int:
        self.sock.sendall(request)
        while b"\r\n\r\n" not in self.buf:
            self._more()
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        length = next((int(v) for n, _, v in (line.partition(b":") for line in lines[1:])
                       if n.strip().lower() == b"content-length"), 0)
        while len(self.buf) < length:
            self._more()
        self.buf = self.buf[length:]
        return int(lines[0].split(b" ", 2)[1])

    def close(self):
        self.sock.close()


class Agent:
    """A store agent process in `home`, its config, terminal keys and outbox."""

    def __init__(self, home: Path, uri: str, terminals: list[str]):
        self.home, self.uri = home, uri
        home.mkdir(parents=True, exist_ok=True)
        self.port = free_ports(1)[0]
        shipped = yaml.safe_load((REPO / "config" / "bus.yaml").read_text())
        config = {k: v for k, v in shipped.items() if k != "RETAILBUS"}
        config.update(AMQP_URI=uri, STORE_ID=STORE, WEB_SERVER_ADDRESS=f"127.0.0.1:{self.port}")
        config["RETAILBUS"] = {"root": str(home), "stores": [{"id": STORE, "http": f"127.0.0.1:{self.port}"}],
                               "routes_file": "routes.yaml"}
        self.config = home / "bus.yaml"
        self.config.write_text(yaml.safe_dump(config))
        shutil.copyfile(REPO / "config" / "routes.yaml", home / "routes.yaml")  # sales in bus mode
        self.outbox = home / "var" / "stores" / STORE / "outbox.db"
        self.outbox.parent.mkdir(parents=True, exist_ok=True)
        keys = TerminalKeys(self.outbox.parent / "terminal_keys.json")
        self.keys = {t: bytes.fromhex(keys.add(t)) for t in terminals}
        self.process: subprocess.Popen | None = None
        self.hwm_kib = 0

    def request(self, terminal: str, txn: str) -> bytes:
        """A signed `POST /erp/sales` as a till sends it."""
        body = legacy_sale(terminal, txn)
        signed = "".join(f"{k}: {v}\r\n" for k, v in
                         signed_headers(terminal, self.keys[terminal], "POST", "/erp/sales", body).items())
        return (f"POST /erp/sales HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n{signed}\r\n").encode() + body

    def start(self, outbox_from: Path | None = None):
        """Start the agent, on a copy of `outbox_from` (a backlog) if given, else on its outbox as is."""
        if outbox_from is not None:
            for suffix in ("", "-wal", "-shm"):
                Path(f"{self.outbox}{suffix}").unlink(missing_ok=True)
            shutil.copyfile(outbox_from, self.outbox)
        log = (self.home / "agent.log").open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bus.runner", "--config", str(self.config), "routing.store_agent"],
            cwd=REPO, stdout=log, stderr=log, start_new_session=True,
            env={**os.environ, "RETAILBUS_STORE": STORE, "PYTHONWARNINGS": "ignore"})
        wait_http(f"http://127.0.0.1:{self.port}/healthz", timeout=120)

    def stop(self):
        if self.process is None:
            return
        self.hwm_kib = max(self.hwm_kib, process_hwm_kib(self.process.pid) or 0)
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None


def declare_sink(uri: str):
    conn = connect(uri)
    try:
        ch = conn.channel()
        topology.declare_exchange(ch, EXCHANGE)
        topology.declare_queue(ch, SINK)
        ch.queue_bind(SINK, EXCHANGE, "pos.#")
        ch.queue_purge(SINK)
    finally:
        conn.close()


def purge_sink(uri: str):
    conn = connect(uri)
    try:
        conn.channel().queue_purge(SINK)
    finally:
        conn.close()


def prefill(path: Path, rows: int, terminals: list[str]):
    """An outbox holding `rows` unsent sales, written as the agent writes them."""
    outbox = Outbox(path)
    pool = eventlet.GreenPool(512)

    def accept(n: int):
        terminal = terminals[n % len(terminals)]
        txn = sale_from_legacy(json.loads(legacy_sale(terminal, f"BACKLOG-{n:07d}")))
        outbox.accept(CloudEvent.new("pos.sale.v1", f"store/{STORE}/pos/{terminal}", txn,
                                     subject=txn.pos_txn_id, idempotencykey=idempotency_key(txn)))
    for n in range(rows):
        pool.spawn_n(accept, n)
    pool.waitall()
    outbox.close()  # the last connection to close folds the WAL into the file


def sqlite_fsync_per_sale(path: Path, bodies: list[bytes]) -> float:
    """The baseline a naive outbox gets: one INSERT and one COMMIT (fsync) per sale,
    WAL, synchronous=FULL, one connection; sales/s."""
    db = sqlite3.connect(str(path), isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("CREATE TABLE IF NOT EXISTS outbox (seq INTEGER PRIMARY KEY, body BLOB, accepted_at REAL)")
    started = time.perf_counter()
    for body in bodies:
        db.execute("BEGIN")
        db.execute("INSERT INTO outbox (body, accepted_at) VALUES (?, ?)", (body, time.time()))
        db.execute("COMMIT")
    elapsed = time.perf_counter() - started
    db.close()
    return len(bodies) / elapsed


def closed_loop(agent: Agent, clients: int, sales: int, tag: str) -> dict:
    """`clients` tills, each selling its share one sale after another."""
    terminals = list(agent.keys)
    per = max(1, sales // clients)
    work = [[agent.request(terminals[c], f"{tag}-{c:02d}-{n:06d}") for n in range(per)] for c in range(clients)]
    tills = [Till(agent.port) for _ in range(clients)]
    latencies: list[float] = []
    statuses: Counter = Counter()

    def sell(till: Till, requests: list[bytes]):
        for request in requests:
            started = time.perf_counter()
            statuses[till.call(request)] += 1
            latencies.append(time.perf_counter() - started)
    started = time.perf_counter()
    for thread in [eventlet.spawn(sell, till, requests) for till, requests in zip(tills, work)]:
        thread.wait()
    elapsed = time.perf_counter() - started
    for till in tills:
        till.close()
    return {"clients": clients, "sales": per * clients, "accepted_per_s": statuses[200] / elapsed,
            "p50_ms": percentile(latencies, 50) * 1000, "p99_ms": percentile(latencies, 99) * 1000,
            "errors": per * clients - statuses[200]}


def sent_times(outbox: Path, last_seq: int) -> list[float]:
    """When each of the backlog's rows was marked sent (None while unsent)."""
    db = sqlite3.connect(str(outbox))
    try:
        return [r[0] for r in db.execute("SELECT sent_at FROM outbox WHERE seq <= ?", (last_seq,))]
    finally:
        db.close()


def drain_rate(times: list[float]) -> float:
    """Rows/s from the first confirmed round to the last: the first round (the connection
    opening, one round of rows) is the clock's start, as raw's clock starts connected."""
    first, last = min(times), max(times)
    return (len(times) - times.count(first)) / (last - first)


def wait_drained(outbox: Path, last_seq: int, timeout: float = 1800) -> float:
    """Until every backlog row is sent; the monotonic time it was seen so. Reads run in
    an OS thread so this process's tills are not held up by them."""
    db = sqlite3.connect(str(outbox), check_same_thread=False)
    query = "SELECT 1 FROM outbox WHERE sent_at IS NULL AND seq <= ? LIMIT 1"
    deadline = time.monotonic() + timeout
    try:
        while tpool.execute(lambda: db.execute(query, (last_seq,)).fetchone()) is not None:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the backlog did not drain in {timeout:.0f}s")
            eventlet.sleep(0.1)
        return time.monotonic()
    finally:
        db.close()


def ours_drain(agent: Agent, template: Path, rows: int) -> float:
    agent.start(outbox_from=template)
    wait_drained(agent.outbox, rows)
    agent.stop()
    return drain_rate(sent_times(agent.outbox, rows))


def raw_drain(uri: str, messages: list[tuple[bytes, str, int]], window: int = WINDOW) -> float:
    """The backlog's bodies (read before the clock) published as the forwarder publishes
    them (persistent, mandatory, same properties and headers), at most `window` unconfirmed."""
    conn = connect(uri)
    try:
        ch = conn.channel()
        ch.confirm_select()
        conn.client_properties.get("capabilities", {})["connection.blocked"] = False  # as ours: read only for confirms
        floor, singles = 0, set()

        def on_ack(tag, multiple):
            nonlocal floor, singles
            if multiple:
                floor, singles = tag, {t for t in singles if t > tag}
            else:
                singles.add(tag)

        def on_nack(tag, multiple):
            raise RuntimeError(f"broker nacked publish {tag}")
        ch.events["basic_ack"].add(on_ack)
        ch.events["basic_nack"].add(on_nack)
        started = time.perf_counter()
        for i, (body, event_id, seq) in enumerate(messages):
            while i - floor - len(singles) >= window:
                conn.drain_events(timeout=10)
            ch.basic_publish(amqp.Message(body, delivery_mode=2, content_type="application/cloudevents+json",
                                          message_id=event_id, type="pos.sale.v1",
                                          application_headers={H_STORE: STORE, H_STORE_SEQ: seq}),
                             EXCHANGE, "pos.sale.v1", mandatory=True)
        while floor + len(singles) < len(messages):
            conn.drain_events(timeout=10)
        return len(messages) / (time.perf_counter() - started)
    finally:
        conn.close()


def open_loop_while_draining(agent: Agent, template: Path, rows: int, rate: float, tag: str) -> dict:
    """Sales at `rate`/s, each sent at its time on a free connection (a new one if none
    is free), while the backlog drains; latency from the scheduled time to the answer."""
    agent.start(outbox_from=template)
    drained = eventlet.spawn(wait_drained, agent.outbox, rows)
    terminals = list(agent.keys)
    idle: deque[Till] = deque()
    samples: list[tuple[float, float, int]] = []
    pool = eventlet.GreenPool(10_000)

    def sell(at: float, request: bytes):
        till = idle.pop() if idle else Till(agent.port)
        status = till.call(request)
        samples.append((at, time.monotonic() - at, status))
        idle.append(till)
    t0, n = time.monotonic(), 0
    while not drained.dead:
        at = t0 + n / rate
        eventlet.sleep(max(0.0, at - time.monotonic()))
        pool.spawn_n(sell, at, agent.request(terminals[n % len(terminals)], f"{tag}-{n:07d}"))
        n += 1
    pool.waitall()
    drained_at = drained.wait()
    agent.stop()
    for till in idle:
        till.close()
    during = [(lat, status) for at, lat, status in samples if at < drained_at]
    latencies = [lat for lat, _ in during]
    return {"sales": len(during), "errors": sum(1 for _, status in during if status != 200),
            "p50_ms": percentile(latencies, 50) * 1000, "p99_ms": percentile(latencies, 99) * 1000,
            "drain_rows_per_s": drain_rate(sent_times(agent.outbox, rows))}


def backlog_messages(template: Path) -> list[tuple[bytes, str, int]]:
    db = sqlite3.connect(str(template))
    try:
        return [(bytes(b), e, s) for b, e, s in db.execute("SELECT body, event_id, stream_seq FROM outbox ORDER BY seq")]
    finally:
        db.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--amqp-uri", help="an existing broker (default: a throw-away node)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--sales", type=int, default=3000, help="sales per concurrency level per run (a)")
    parser.add_argument("--clients", default="1,8,32", help="concurrent tills (a)")
    parser.add_argument("--backlog", type=int, default=100_000, help="outbox rows to drain (b, c)")
    parser.add_argument("--rate", type=float, default=100.0, help="open-loop sales/s while draining (b)")
    args = parser.parse_args()
    levels = [int(c) for c in args.clients.split(",")]
    terminals = [f"{n:02d}" for n in range(1, max(levels) + 1)]
    figures: dict = {"bench": "store_agent", "runs": args.runs, "sales": args.sales, "backlog": args.backlog,
                     "rate": args.rate, "goals": GOALS}
    with tempfile.TemporaryDirectory(prefix="retailbus-bench-agent-") as tmp, \
            bench_broker(args.amqp_uri) as (uri, broker):
        home = Path(tmp)
        declare_sink(uri)
        agent = Agent(home / "agent", uri, terminals)
        template = home / "backlog.db"
        started = time.monotonic()
        prefill(template, args.backlog, terminals)
        print(f"backlog of {args.backlog:,} rows written in {time.monotonic() - started:.1f}s", flush=True)
        messages = backlog_messages(template)
        bodies = [m[0] for m in messages[:500]]
        closed: dict[int, list[dict]] = {c: [] for c in levels}
        raw_fsync, raw, ours, loaded, agent_cpu = [], [], [], [], []
        try:
            for run in range(args.runs):
                raw_fsync.append(sqlite_fsync_per_sale(home / f"naive{run}.db", bodies))
                # (a) one agent, the levels taking turns
                agent.start()
                cpu_before = cpu_seconds(agent.process.pid)
                for c in levels:
                    closed[c].append(closed_loop(agent, c, args.sales, f"R{run}C{c}"))
                    r = closed[c][-1]
                    print(f"run {run + 1} (a) {c:>2} tills: {r['accepted_per_s']:,.0f} sales/s, p50 "
                          f"{r['p50_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms, errors {r['errors']}", flush=True)
                sold = sum(closed[c][-1]["sales"] for c in levels)
                agent_cpu.append((cpu_seconds(agent.process.pid) - cpu_before) / sold * 1000)
                agent.stop()
                purge_sink(uri)
                # (c) raw and ours take turns on the same backlog
                raw.append(raw_drain(uri, messages))
                purge_sink(uri)
                ours.append(ours_drain(agent, template, args.backlog))
                purge_sink(uri)
                print(f"run {run + 1} (c) drain: raw {raw[-1]:,.0f} rows/s, ours {ours[-1]:,.0f} rows/s "
                      f"(x{ours[-1] / raw[-1]:.2f}); agent CPU {agent_cpu[-1]:.2f} ms a sale in (a)", flush=True)
                # (b) the same backlog drains while tills sell at a steady rate
                loaded.append(open_loop_while_draining(agent, template, args.backlog, args.rate, f"R{run}L"))
                purge_sink(uri)
                r = loaded[-1]
                print(f"run {run + 1} (b) {args.rate:.0f} sales/s while draining: p50 {r['p50_ms']:.2f} ms, "
                      f"p99 {r['p99_ms']:.2f} ms over {r['sales']} sales, errors {r['errors']}; "
                      f"drain {r['drain_rows_per_s']:,.0f} rows/s", flush=True)
        finally:
            agent.stop()
        broker_hwm = process_hwm_kib(broker.pid() if broker else None)
        env = environment(uri)
    accept = {c: {k: median([r[k] for r in runs]) for k in ("accepted_per_s", "p50_ms", "p99_ms")}
              | {"errors": sum(r["errors"] for r in runs), "runs": [round(r["accepted_per_s"]) for r in runs]}
              for c, runs in closed.items()}
    top = max(levels)
    figures.update(
        accept=accept, raw_fsync_per_sale_per_s=median(raw_fsync),
        accept_ratio_to_fsync_per_sale=accept[top]["accepted_per_s"] / median(raw_fsync),
        while_draining={"p50_ms": median([r["p50_ms"] for r in loaded]),
                        "p99_ms": median([r["p99_ms"] for r in loaded]),
                        "p99_ms_runs": [round(r["p99_ms"], 2) for r in loaded],
                        "sales": sum(r["sales"] for r in loaded), "errors": sum(r["errors"] for r in loaded),
                        "drain_rows_per_s": median([r["drain_rows_per_s"] for r in loaded])},
        drain={"raw_rows_per_s": median(raw), "rows_per_s": median(ours), "ratio": median(ours) / median(raw),
               "raw_runs": [round(x) for x in raw], "runs": [round(x) for x in ours],
               "ratio_runs": [round(o / r, 2) for o, r in zip(ours, raw)]},
        agent_cpu_ms_per_sale=median(agent_cpu), agent_hwm_kib=agent.hwm_kib, broker_hwm_kib=broker_hwm, peak_rss_kib=peak_rss_kib(), environment=env)
    met = {"sales_per_s_at_32": 32 in accept and accept[32]["accepted_per_s"] >= GOALS["sales_per_s_at_32"]
           and accept[32]["errors"] == 0,
           "p99_ms_while_draining": figures["while_draining"]["p99_ms"] < GOALS["p99_ms_while_draining"]
           and figures["while_draining"]["errors"] == 0,
           "drain_ratio": figures["drain"]["ratio"] >= GOALS["drain_ratio"]}
    figures["goals_met"] = met
    print()
    for c in levels:
        a = accept[c]
        print(f"(a) {c:>2} tills: {a['accepted_per_s']:,.0f} sales/s (runs {a['runs']}), p50 {a['p50_ms']:.2f} ms, "
              f"p99 {a['p99_ms']:.2f} ms, errors {a['errors']}")
    print(f"    baseline, sqlite3 fsync per sale: {median(raw_fsync):,.0f} sales/s; "
          f"goal >= {GOALS['sales_per_s_at_32']} at 32 tills: {'met' if met['sales_per_s_at_32'] else 'MISSED'}")
    w = figures["while_draining"]
    print(f"(b) {args.rate:.0f} sales/s while {args.backlog:,} rows drain: p50 {w['p50_ms']:.2f} ms, p99 "
          f"{w['p99_ms']:.2f} ms (runs {w['p99_ms_runs']}); goal < {GOALS['p99_ms_while_draining']} ms: "
          f"{'met' if met['p99_ms_while_draining'] else 'MISSED'}")
    d = figures["drain"]
    print(f"(c) drain: raw {d['raw_rows_per_s']:,.0f} rows/s, ours {d['rows_per_s']:,.0f} rows/s, x{d['ratio']:.2f} "
          f"(each run against its own raw: {d['ratio_runs']}); "
          f"goal >= {GOALS['drain_ratio']}: {'met' if met['drain_ratio'] else 'MISSED'}")
    print(f"peak RSS: agent {agent.hwm_kib / 1024:.0f} MiB, bench {peak_rss_kib() / 1024:.0f} MiB, broker "
          + (f"{broker_hwm / 1024:.0f} MiB" if broker_hwm else "n/a (external broker)"))
    emit_json(figures)


if __name__ == "__main__":
    main()
