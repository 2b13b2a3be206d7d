"""Posting scale-out: sales posted into PostgreSQL by one erp process against two erp
processes on two partitions (bus/partitions.py), same run.

    python bench/bench_erp_scaleout.py [--amqp-uri URI] [--sales 6000] [--stores 100] [--runs 3]

Each variant runs real erp processes (`python -m bus.runner ... services.erp`, as
`retailbus up` runs them) on a fresh legacy database in one throw-away PostgreSQL
cluster: `one` is today's configuration (one ordered queue, one process); `two` splits
the sales queue into two partitions by store and runs two processes
(RETAILBUS_INSTANCE 0/2 and 1/2), each owning one. `--sales` pos.sale.v1 (3 lines
each, `--stores` stores, with the store header the forwarder sets) are queued, then
the processes start; the rate is taken while 20 % to 80 % of the sales reach SLS_HDR
(polled), so start-up and one process starting before the other fall outside it
(first-to-last is reported too), and every sale is checked posted once. Variants
take turns within each run. Goal: two / one >= 1.5.

Where the time goes is measured per run: the CPU seconds of the erp processes, the
PostgreSQL server and the broker over the timed window (from /proc), against what
the machine's cores could give in it: when they add up to the cores, the machine,
not the design, is the limit.
"""
import warnings

warnings.filterwarnings("ignore", message=r"\s*Eventlet is deprecated")  # its import-time banner
import eventlet  # noqa: E402

eventlet.monkey_patch()  # bench.bench_erp's helpers run on eventlet; must precede other imports

import argparse  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import sqlalchemy as sa  # noqa: E402
import yaml  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from bench.bench_erp import Databases, sale  # noqa: E402
from bench.common import (bench_broker, connect, cpu_seconds, emit_json, environment, median,  # noqa: E402
                          peak_rss_kib, process_hwm_kib)
from bus import partitions, topology  # noqa: E402
from bus.constants import H_STORE, H_STORE_SEQ  # noqa: E402
from bus.extensions import event_message  # noqa: E402
from bus.publisher import ConfirmingPublisher  # noqa: E402
from contracts.envelope import CloudEvent  # noqa: E402
from tests.postgres import PostgresCluster  # noqa: E402

GOALS = {"two_over_one": 1.5}
REPO = Path(__file__).resolve().parents[1]
QUEUE = topology.handler_queue("store_agent", "pos.sale.v1", "erp", "on_pos_sale")
EXCHANGE = topology.events_exchange("store_agent")
POSTED_QUEUE = "bench.erp_scaleout.sale_posted"  # a subscriber, so erp.sale_posted.v1 is routed
DELAYS = [1.0, 5.0, 30.0]  # bus.yaml's retry delays: the queues are declared as the erp declares them


def messages(n: int, stores: int) -> list:
    """The sales as the stores' forwarders publish them, built before any clock."""
    out, seqs = [], {}
    for i in range(n):
        s = sale(i, stores)
        seqs[s.store_id] = seqs.get(s.store_id, 0) + 1
        event = CloudEvent.new("pos.sale.v1", f"store/{s.store_id}/pos/07", s, subject=s.pos_txn_id,
                               idempotencykey=f"pos.sale.v1:{s.store_id}:{s.pos_txn_id}")
        message = event_message(event, EXCHANGE)
        message.headers = {H_STORE: s.store_id, H_STORE_SEQ: seqs[s.store_id]}
        out.append(message)
    return out


def reset_queues(uri: str, parts: int):
    """Fresh sales queues for `parts` partitions (1: the plain queue) as the erp declares
    them, and a subscriber for what the erp publishes."""
    conn = connect(uri)
    try:
        ch = conn.channel()
        for queue in [QUEUE, *partitions.partition_queues(QUEUE, 2)]:
            ch.queue_delete(queue)
        ch.exchange_delete(partitions.partition_exchange(QUEUE))
        if parts > 1:
            partitions.declare(ch, EXCHANGE, "pos.sale.v1", QUEUE, parts, DELAYS)
        else:
            topology.declare_handler_queues(ch, EXCHANGE, "pos.sale.v1", QUEUE, DELAYS, single_active=True)
        topology.declare_exchange(ch, "erp.events")
        topology.declare_queue(ch, POSTED_QUEUE)
        ch.queue_bind(POSTED_QUEUE, "erp.events", "erp.sale_posted.v1")
        ch.queue_purge(POSTED_QUEUE)
    finally:
        conn.close()


def server_cpu(postmaster: int | None) -> float:
    """CPU seconds of the PostgreSQL server: the postmaster and its children (backends)."""
    if postmaster is None:
        return 0.0
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(stat.parent.name) == postmaster or int(fields[1]) == postmaster:
                total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            continue
    return total


def machine_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far (/proc/stat), whoever used them."""
    ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = ticks[3] + ticks[4]  # idle, iowait
    hz = os.sysconf("SC_CLK_TCK")
    return (sum(ticks) - idle) / hz, sum(ticks) / hz


class Snapshot:
    """CPU seconds so far of the erp processes, the PostgreSQL server, the broker and
    the whole machine."""

    def __init__(self, procs, cluster: PostgresCluster, broker_pid: int | None, posted: int):
        self.at, self.posted = time.monotonic(), posted
        self.machine = machine_busy()
        self.erp = sum(cpu_seconds(p.pid) for p in procs)
        self.pg = server_cpu(cluster._pid())
        self.broker = cpu_seconds(broker_pid) if broker_pid else 0.0


def run_variant(home: Path, uri: str, dsn: str, parts: int, sales: list, cluster: PostgresCluster,
                broker_pid: int | None) -> dict:
    """The sales queued first, then the processes started; timed while 20 % to 80 % of the
    sales are posted (start-up, one process starting before the other, and the tail
    are outside the window), and from the first sale posted to the last."""
    reset_queues(uri, parts)
    publisher = ConfirmingPublisher(uri)
    assert publisher.publish_many(sales) == [None] * len(sales)
    publisher.close()
    shipped = yaml.safe_load((REPO / "config" / "bus.yaml").read_text())
    config = {k: v for k, v in shipped.items() if k != "RETAILBUS"}
    config.update(AMQP_URI=uri, LEGACY_DB_URI=dsn)
    config["RETAILBUS"] = {"root": str(home), "retry": {"delays": DELAYS},
                           "handlers": {"erp.on_pos_sale": {"partitions": parts}}}
    path = home / f"bus-{parts}.yaml"
    path.write_text(yaml.safe_dump(config))
    log = (home / f"erp-{parts}.log").open("ab")
    engine = sa.create_engine(dsn)
    count = sa.text("SELECT count(*) FROM \"SLS_HDR\" WHERE \"DOC_TYPE\" = 'S' AND \"STORE_NO\" LIKE 'S%'")
    with engine.connect() as c:
        before = c.execute(count).scalar()
    procs = [subprocess.Popen([sys.executable, "-m", "bus.runner", "--config", str(path), "services.erp"],
                              cwd=REPO, stdout=log, stderr=log, start_new_session=True,
                              env={**os.environ, "EVENTLET_NO_GREENDNS": "yes", "PYTHONWARNINGS": "ignore",
                                   **({partitions.ENV_INSTANCE: f"{i}/{parts}"} if parts > 1 else {})})
             for i in range(parts)]
    marks: dict[str, Snapshot] = {}
    n = len(sales)
    try:
        deadline = time.monotonic() + 900
        while True:
            with engine.connect() as c:
                done = c.execute(count).scalar() - before
            for name, share in (("first", 1), ("20", n // 5), ("80", n * 4 // 5), ("last", n)):
                if done >= share and name not in marks:
                    marks[name] = Snapshot(procs, cluster, broker_pid, done)
            if done >= n:
                break
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                raise RuntimeError(f"{done} of {n} posted; see {home}/erp-{parts}.log")
            time.sleep(0.05)
        hwm = max(process_hwm_kib(p.pid) or 0 for p in procs)
        with engine.connect() as c:
            twice = c.execute(sa.text(
                'SELECT "POS_TXN_ID", count(*), min("DOC_NO"), max("DOC_NO") FROM "SLS_HDR" WHERE "DOC_TYPE" = \'S\' '
                'GROUP BY "POS_TXN_ID" HAVING count(*) > 1')).all()
            assert not twice and c.execute(count).scalar() - before == n, \
                (f"posted twice (POS id, times, first and last DOC_NO): {twice[:10]}; the erp log ends: "
                 + (home / f"erp-{parts}.log").read_text()[-3000:])
    finally:
        engine.dispose()
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(60)
            except subprocess.TimeoutExpired:
                p.kill()
    a, b = marks["20"], marks["80"]
    window, sold = b.at - a.at, b.posted - a.posted
    erp, pg, broker = b.erp - a.erp, b.pg - a.pg, b.broker - a.broker
    return {"sales_per_s": sold / window, "first_to_last_per_s": (n - marks["first"].posted) /
            (marks["last"].at - marks["first"].at), "erp_cpu_ms_per_sale": erp / sold * 1000,
            "pg_cpu_ms_per_sale": pg / sold * 1000, "broker_cpu_ms_per_sale": broker / sold * 1000,
            "cpu_share": (erp + pg + broker) / (window * (os.cpu_count() or 1)),
            "machine_busy": (b.machine[0] - a.machine[0]) / (b.machine[1] - a.machine[1]), "erp_hwm_kib": hwm,
            "load": os.getloadavg()[0]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--amqp-uri", help="an existing broker (default: a throw-away node)")
    parser.add_argument("--sales", type=int, default=6000)
    parser.add_argument("--stores", type=int, default=100)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    figures: dict = {"bench": "erp_scaleout", "sales": args.sales, "stores": args.stores, "runs": args.runs,
                     "goals": GOALS}
    results: dict[str, list[dict]] = {"one": [], "two": []}
    with tempfile.TemporaryDirectory(prefix="retailbus-bench-scaleout-") as tmp, \
            bench_broker(args.amqp_uri) as (uri, broker):
        home = Path(tmp)
        cluster = PostgresCluster().start()
        try:
            dbs = Databases(home, cluster, args.stores)
            sales = messages(args.sales, args.stores)
            for run in range(args.runs):
                for name, parts in (("one", 1), ("two", 2)) if run % 2 == 0 else (("two", 2), ("one", 1)):
                    r = run_variant(home, uri, dbs.fresh("postgresql"), parts, sales, cluster,
                                    broker.pid() if broker else None)
                    results[name].append(r)
                    print(f"run {run + 1} {name}: {r['sales_per_s']:,.0f} sales/s; CPU a sale: erp "
                          f"{r['erp_cpu_ms_per_sale']:.2f} ms, PostgreSQL {r['pg_cpu_ms_per_sale']:.2f} ms, "
                          f"broker {r['broker_cpu_ms_per_sale']:.2f} ms; {r['cpu_share']:.0%} of "
                          f"{os.cpu_count()} cores, the machine {r['machine_busy']:.0%} busy; "
                          f"load {r['load']:.1f}", flush=True)
            figures["environment"] = environment(uri)
        finally:
            cluster.stop()
    for name, runs in results.items():
        figures[name] = {k: median([r[k] for r in runs]) for k in runs[0]} | {
            "runs": [round(r["sales_per_s"]) for r in runs]}
    ratio = figures["two"]["sales_per_s"] / figures["one"]["sales_per_s"]
    figures.update(two_over_one=ratio, goals_met={"two_over_one": ratio >= GOALS["two_over_one"]},
                   peak_rss_kib=peak_rss_kib())
    print()
    for name in ("one", "two"):
        f = figures[name]
        print(f"{name} erp process(es): {f['sales_per_s']:,.0f} sales/s (runs {f['runs']}), CPU a sale: erp "
              f"{f['erp_cpu_ms_per_sale']:.2f} ms, PostgreSQL {f['pg_cpu_ms_per_sale']:.2f} ms, broker "
              f"{f['broker_cpu_ms_per_sale']:.2f} ms; {f['cpu_share']:.0%} of the cores theirs, the machine "
              f"{f['machine_busy']:.0%} busy")
    print(f"two / one = {ratio:.2f} (goal >= {GOALS['two_over_one']}: "
          f"{'met' if figures['goals_met']['two_over_one'] else 'MISSED'})")
    emit_json(figures)


if __name__ == "__main__":
    main()
