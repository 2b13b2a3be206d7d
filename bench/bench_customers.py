"""Customer mastering: golden-record updates/s from the CRM's nightly file and propagation lag to each system.

    python bench/bench_customers.py [--amqp-uri URI] [--runs 3] [--rows 100000] [--members 5000]

Real processes, as `retailbus up` runs them (`python -m bus.runner`): the demo CRM and loyalty
platform, the legacy ERP's SQLite database, and the files, customers, erp, crm and loyalty
services on a throw-away broker, journal off. Each run takes ROWS customers of their own:

(a) raw, first: the customers service stopped, a ROWS-row nightly file is dropped; the chunks
    the files service publishes for the hub are taken from the hub's own queue by plain
    py-amqp (prefetch 8) and applied as the nightly path applied them before mastering: each
    row upserted into a CUST_MST-shaped SQLite table, newest wins, one transaction per chunk
    with an inbox key per row, then acked. Rate = rows / (last commit - drop).
(b) ours: MEMBERS of the run's next customers enrol at the tills first (the loyalty platform's
    feed -> the hub: a golden record each), then the customers service takes another
    ROWS-row file: every row matched, decided, its history written and its writes queued
    in one transaction per chunk. Rate = rows / (the last golden record's commit - drop).
    Each process's CPU per row (/proc, the broker's too), drop -> the file mastered and drop ->
    the last write in every system: where the 2 cores went.
(c) propagation lag of (b)'s writes, per system: from the golden record's commit
    (CUS_GOLDEN.UPDATED_AT) to the write in the system: a new ERP account (CUST_MST.UPD_TS),
    the CRM profile told its golden id (the CRM's change feed: `at` of the bus's change),
    the member told the file's name, phone and consents (the platform's feed, likewise).
Goals (issue 21): (b) >= 5,000 updates/s, (c) p99 < 5 s to each system. Each figure is the
median of the runs'; every run is printed.
"""
from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
import tempfile
import threading
import time
import urllib.request
from datetime import datetime, timedelta, timezone
from pathlib import Path

import amqp
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from bench.common import (bench_broker, cpu_seconds, emit_json, environment, median, percentile,  # noqa: E402
                          process_hwm_kib, start_process, stop_process, wait_http)
from bus import topology  # noqa: E402
from bus.publisher import connection_params  # noqa: E402
from demo.batch.jobs import write_customer_export  # noqa: E402
from demo.legacy_erp.schema import create_schema, engine_for  # noqa: E402
from services.broker.setup import free_ports  # noqa: E402
from services.customers.propagation import binding  # noqa: E402

GOALS = {"updates_per_s": 5000.0, "lag_p99_s": 5.0}
REPO = Path(__file__).resolve().parents[1]
SERVICES = ("files", "erp", "crm", "loyalty", "customers")
HUB_QUEUE = topology.handler_queue("files", "event.batch.v1", "customers", "on_file_rows")
READY = {"files": topology.handler_queue("erp", "batch", "files", "on_posted"),
         **{system: topology.handler_queue("customers", binding(system), system, "on_customer_mastered")
            for system in ("erp", "crm", "loyalty")},
         "customers": HUB_QUEUE}
STAMP = "%Y-%m-%dT%H:%M:%S.%f"


def rows_of(first: int, count: int, at: str) -> list[list]:
    return [[f"C{n:08d}", f"Customer {n}", f"c{n}@example.com", f"+49 30 {n:07d}", f"LC{n:010d}", at, "Y", "N", "N"]
            for n in range(first, first + count)]


def write_config(home: Path, uri: str, crm_port: int, loyalty_port: int) -> Path:
    shipped = yaml.safe_load((REPO / "config" / "bus.yaml").read_text())
    config = {k: v for k, v in shipped.items() if k != "RETAILBUS"}
    config.update(AMQP_URI=uri, LEGACY_DB_URI=f"sqlite:///{home / 'var' / 'legacy_erp.db'}")
    config["RETAILBUS"] = {"root": str(home), "journal": {"enabled": False},
                           "crm": {"http": f"127.0.0.1:{crm_port}", "db": "var/crm.db"},
                           "loyalty_platform": {"http": f"127.0.0.1:{loyalty_port}", "db": "var/loyalty_platform.db"},
                           "services": {name: {"module": f"services.{name}"} for name in SERVICES}}
    path = home / "config" / "bus.yaml"
    path.write_text(yaml.safe_dump(config))
    for name in ("customers.yaml", "loyalty.yaml"):
        (home / "config" / name).write_text((REPO / "config" / name).read_text())
    drops = yaml.safe_load((REPO / "config" / "filedrops.yaml").read_text())
    drops["ledger"] = str(home / "var" / "filedrops.db")
    for kind in ("inbound", "outbound"):
        for name, drop in drops[kind].items():
            drop["folder"] = str(home / "drops" / name)
    drops["inbound"]["customers"]["poll_seconds"] = 0.1
    (home / "config" / "filedrops.yaml").write_text(yaml.safe_dump(drops))
    return path


class Estate:
    def __init__(self, home: Path, uri: str, broker=None):
        self.home, self.uri, self.broker = home, uri, broker
        for folder in ("var", "config", "drops/customers"):
            (home / folder).mkdir(parents=True, exist_ok=True)
        engine = engine_for(f"sqlite:///{home / 'var' / 'legacy_erp.db'}")
        create_schema(engine)
        engine.dispose()
        crm_port, loyalty_port = free_ports(2)
        self.config = write_config(home, uri, crm_port, loyalty_port)
        self.platforms = {"crm": f"http://127.0.0.1:{crm_port}", "loyalty": f"http://127.0.0.1:{loyalty_port}"}
        self.processes = {
            "crm-platform": start_process([sys.executable, "-m", "demo.crm", "--db", str(home / "var" / "crm.db"),
                                           "--port", str(crm_port)], home, "crm-platform"),
            "loyalty-platform": start_process([sys.executable, "-m", "demo.loyalty_platform", "--db",
                                               str(home / "var" / "loyalty_platform.db"), "--port",
                                               str(loyalty_port)], home, "loyalty-platform")}
        for url in self.platforms.values():
            wait_http(f"{url}/health")
        for name in SERVICES:
            self.start(name)

    def start(self, name: str) -> None:
        self.processes[name] = start_process([sys.executable, "-m", "bus.runner", "--config", str(self.config),
                                              f"services.{name}"], self.home, name)
        deadline = time.monotonic() + 120
        while consumers(self.uri, READY[name]) < 1:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start: {(self.home / f'{name}.log').read_text()[-2000:]}")
            time.sleep(0.2)

    def stop(self, name: str) -> None:
        stop_process(self.processes.pop(name))

    def close(self) -> None:
        for name in list(self.processes):
            stop_process(self.processes.pop(name))

    def db(self, name: str) -> sqlite3.Connection:
        return sqlite3.connect(self.home / "var" / name, timeout=60)

    def enrol(self, first: int, count: int) -> None:
        """Tills enrol members (one call each, as tills do)."""
        for n in range(first, first + count):
            body = json.dumps({"card": f"LC{n:010d}", "customer_id": f"TILL-{n}", "email": f"c{n}@example.com",
                               "name": f"C. {n}"}).encode()
            request = urllib.request.Request(f"{self.platforms['loyalty']}/members", body, method="POST",
                                             headers={"Idempotency-Key": f"enrol-{n}"})
            urllib.request.urlopen(request, timeout=30).read()

    def drop(self, name: str, rows: list[list]) -> float:
        started = time.time()
        write_customer_export(self.home / "drops" / "customers" / name, rows)
        return started


def consumers(uri: str, queue: str) -> int:
    conn = amqp.Connection(**connection_params(uri, 10))
    conn.connect()
    try:
        return conn.channel().queue_declare(queue, passive=True).consumer_count
    except amqp.exceptions.NotFound:
        return 0
    finally:
        conn.collect()


def wait(what, timeout: float, label: str):
    deadline = time.monotonic() + timeout
    while not (found := what()):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{label}: not done in {timeout:.0f}s")
        time.sleep(0.2)
    return found


def raw_pass(estate: Estate, first: int, rows: int, run: int) -> float:
    """(a): the hub's chunks upserted by plain py-amqp into a CUST_MST-shaped table; rows/s."""
    table = estate.home / "var" / "raw.db"
    with sqlite3.connect(table) as db:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("CREATE TABLE IF NOT EXISTS CUST_MST (CUST_NO TEXT PRIMARY KEY, NAME TEXT, EMAIL TEXT, PHONE TEXT, "
                   "LOYALTY_CARD TEXT, MKT_EMAIL TEXT, MKT_SMS TEXT, DATA_SHARE TEXT, UPD_TS TEXT NOT NULL)")
        db.execute("CREATE TABLE IF NOT EXISTS RB_INBOX (IDEM_KEY TEXT PRIMARY KEY)")
    done, last = [0], [0.0]
    stop = threading.Event()

    def consume():
        db = sqlite3.connect(table, isolation_level=None)
        db.execute("PRAGMA synchronous=FULL")
        conn = amqp.Connection(**connection_params(estate.uri, 10))
        conn.connect()
        ch = conn.channel()
        ch.basic_qos(0, 8, False)

        def on_message(message):
            batch = json.loads(message.body)["data"]
            db.execute("BEGIN IMMEDIATE")
            for item in batch["items"]:
                if db.execute("INSERT OR IGNORE INTO RB_INBOX VALUES (?)", (item["idempotencykey"],)).rowcount:
                    r = item["data"]
                    db.execute("INSERT INTO CUST_MST VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (CUST_NO) DO "
                               "UPDATE SET NAME = excluded.NAME, EMAIL = excluded.EMAIL, PHONE = excluded.PHONE, "
                               "LOYALTY_CARD = excluded.LOYALTY_CARD, MKT_EMAIL = excluded.MKT_EMAIL, "
                               "MKT_SMS = excluded.MKT_SMS, DATA_SHARE = excluded.DATA_SHARE, UPD_TS = excluded.UPD_TS "
                               "WHERE excluded.UPD_TS > CUST_MST.UPD_TS",
                               (r["customer_id"], r["name"], r["email"], r["phone"], r["loyalty_card"],
                                r["consent_marketing_email"], r["consent_sms"], r["consent_data_sharing"],
                                r["updated_at"]))
            db.execute("COMMIT")
            ch.basic_ack(message.delivery_tag)
            done[0] += len(batch["items"])
            last[0] = time.time()
        ch.basic_consume(HUB_QUEUE, callback=on_message)
        while not stop.is_set():
            try:
                conn.drain_events(timeout=0.2)
            except TimeoutError:
                pass
        conn.close()
        db.close()

    consumer = threading.Thread(target=consume, daemon=True)
    consumer.start()
    dropped = estate.drop(f"customers_raw_{run}.csv", rows_of(first, rows, at_of(run)))
    wait(lambda: done[0] >= rows, 600, "raw pass")
    stop.set()
    consumer.join(10)
    return rows / (last[0] - dropped)


def at_of(run: int) -> str:
    return (datetime.now(timezone.utc) - timedelta(days=1, minutes=run)).isoformat(timespec="seconds")


def cpu_of(estate: Estate) -> dict[str, float]:
    """CPU seconds so far of every process of the estate (and the broker's, when it is ours)."""
    pids = {name: p.pid for name, p in estate.processes.items()}
    if estate.broker is not None:
        pids["broker"] = estate.broker.pid()
    return {name: cpu_seconds(pid) for name, pid in pids.items()}


def hub_pass(estate: Estate, first: int, rows: int, members: int, run: int) -> tuple[float, dict, dict, dict]:
    """(b) and (c), and each process's CPU seconds per row: drop -> the file mastered (b), and
    drop -> the last write in every system (b and c)."""
    estate.enrol(first, members)
    wait(lambda: count(estate, "customers.db", "SELECT count(*) FROM CUS_RECORD WHERE SYSTEM = 'loyalty' AND "
                       "RECORD_ID >= ? AND RECORD_ID < ?", f"LC{first:010d}", f"LC{first + members:010d}") >= members,
         300, "enrolments mastered")
    ids = (f"C{first:08d}", f"C{first + rows:08d}")
    cpu = cpu_of(estate)
    dropped = estate.drop(f"customers_hub_{run}.csv", rows_of(first, rows, at_of(run)))
    wait(lambda: count(estate, "customers.db", "SELECT count(*) FROM CUS_RECORD WHERE SYSTEM = 'crm' AND "
                       "RECORD_ID >= ? AND RECORD_ID < ?", *ids) >= rows, 900, "file mastered")
    cpu_mastered = {name: (spent - cpu[name]) / rows for name, spent in cpu_of(estate).items()}
    with estate.db("customers.db") as db:
        mastered = dict(db.execute("SELECT r.RECORD_ID, g.UPDATED_AT FROM CUS_RECORD r JOIN CUS_GOLDEN g USING "
                                   "(GOLDEN_ID) WHERE r.SYSTEM = 'crm' AND r.RECORD_ID >= ? AND r.RECORD_ID < ?", ids))
    rate = rows / (max(map(hub_time, mastered.values())) - dropped)
    cards = {f"LC{int(cid[1:]):010d}": at for cid, at in mastered.items()}
    # a member's golden record has its ERP account since the enrolment: the others get theirs now
    erp = wait(lambda: dict_if_all(estate, "legacy_erp.db", "SELECT CUST_NO, UPD_TS FROM CUST_MST WHERE CUST_NO >= ? "
                                   "AND CUST_NO < ?", ids, rows - members), 900, "ERP accounts")
    crm = wait(lambda: dict_if_all(estate, "crm.db", "SELECT record_id, min(at) FROM changes WHERE actor = 'retailbus' "
                                   "AND record_id >= ? AND record_id < ? GROUP BY record_id", ids, rows),
               900, "CRM profiles")
    members_of = (f"LC{first:010d}", f"LC{first + members:010d}")
    loyalty = wait(lambda: dict_if_all(estate, "loyalty_platform.db", "SELECT record_id, max(at) FROM changes WHERE "
                                       "actor = 'retailbus' AND record_id >= ? AND record_id < ? GROUP BY record_id",
                                       members_of, members), 900, "members")
    cpu_all = {name: (spent - cpu[name]) / rows for name, spent in cpu_of(estate).items()}
    lags = {"erp": [legacy_time(at) - hub_time(mastered[n]) for n, at in erp.items()],
            "crm": [platform_time(at) - hub_time(mastered[n]) for n, at in crm.items()],
            "loyalty": [platform_time(at) - hub_time(cards[card]) for card, at in loyalty.items()]}
    return rate, lags, cpu_mastered, cpu_all


def count(estate: Estate, db: str, sql: str, *args) -> int:
    try:
        with estate.db(db) as conn:
            return conn.execute(sql, args).fetchone()[0]
    except sqlite3.OperationalError:  # not created yet
        return 0


def dict_if_all(estate: Estate, db: str, sql: str, ids: tuple, expected: int) -> dict | None:
    try:
        with estate.db(db) as conn:
            found = dict(conn.execute(sql, ids))
    except sqlite3.OperationalError:
        return None
    return found if len(found) >= expected else None


def hub_time(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def legacy_time(stamp: str) -> float:
    return datetime.strptime(stamp, STAMP).replace(tzinfo=timezone.utc).timestamp()


def platform_time(stamp: str) -> float:
    return datetime.fromisoformat(stamp).timestamp()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--amqp-uri")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--members", type=int, default=5000)
    args = parser.parse_args()
    raw_rates, rates, cpus, lags = [], [], [], {"erp": [], "crm": [], "loyalty": []}
    spent: dict[str, list[float]] = {}
    with bench_broker(args.amqp_uri) as (uri, broker), tempfile.TemporaryDirectory(prefix="bench-customers-") as home:
        estate = Estate(Path(home), uri, broker)
        try:
            for run in range(args.runs):
                first = 1 + run * 2 * args.rows
                estate.stop("customers")
                raw_rates.append(raw_pass(estate, first, args.rows, run))
                estate.start("customers")
                rate, run_lags, cpu_mastered, cpu_all = hub_pass(estate, first + args.rows, args.rows, args.members,
                                                                 run)
                cpu = cpu_mastered["customers"]
                rates.append(rate)
                cpus.append(cpu)
                for name, seconds in cpu_mastered.items():
                    spent.setdefault(name, []).append(seconds)
                for system, values in run_lags.items():
                    lags[system].append(percentile(values, 99))
                print(f"run {run + 1}: raw {raw_rates[-1]:,.0f} rows/s, ours {rate:,.0f} updates/s "
                      f"({rate / raw_rates[-1]:.2f}; the hub's CPU {cpu * 1e6:.0f} us a row), lag p99 " + ", ".join(
                          f"{s} {percentile(v, 99):.2f} s (p50 {percentile(v, 50):.2f})" for s, v in run_lags.items()),
                      flush=True)
                print(f"run {run + 1}: CPU us a row, drop -> mastered (-> last write): " + ", ".join(
                    f"{name} {seconds * 1e6:.0f} ({cpu_all[name] * 1e6:.0f})" for name, seconds in
                    sorted(cpu_mastered.items(), key=lambda item: -item[1])), flush=True)
            rss = process_hwm_kib(estate.processes["customers"].pid)
        finally:
            estate.close()
        figures = {"updates_per_s": median(rates), "raw_rows_per_s": median(raw_rates),
                   "hub_cpu_us_per_row": round(median(cpus) * 1e6),
                   "cpu_us_per_row_mastered": {name: round(median(v) * 1e6) for name, v in spent.items()},
                   "load_average": os.getloadavg()[0],
                   "ratio": median(rates) / median(raw_rates),
                   **{f"lag_p99_s_{s}": median(v) for s, v in lags.items()},
                   "customers_rss_mib": round(rss / 1024, 1) if rss else None, "runs": args.runs, "rows": args.rows}
        met = {"updates_per_s": figures["updates_per_s"] >= GOALS["updates_per_s"],
               **{f"lag_p99_s_{s}": figures[f"lag_p99_s_{s}"] < GOALS["lag_p99_s"] for s in lags}}
        emit_json({"bench": "customers", **figures, "goals": GOALS, "goals_met": met, **environment(uri)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
