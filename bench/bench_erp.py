"""erp benchmark: sales posted through the event path, and change capture, each against
plain SQLAlchemy on the same rows in the same run, on SQLite and PostgreSQL.

(a) raw: the same rows (`ledger.rows_for`) written with plain SQLAlchemy Core
    (statements built once, `conn.execute`) on one connection, committing every
    `--commit-every` sales (default 64): what a careful raw program does, since one
    commit (one fsync) per sale caps it at ~150/s here; `--commit-every 1` gives the
    baseline with the same durability per message as ours;
(b) ours: pos.sale.v1 events (3 lines each, from `--stores` stores) already queued,
    consumed by the erp service (reliable_handler ordered per store, inbox claim,
    ledger, outbox row, commit, ack; relay publishes erp.sale_posted.v1
    confirmed and marks it sent); timed until every outbox row is sent.
    Goals: b >= 1,000 sales/s and b/a >= 0.5.
(c) raw: keyset-paged SELECTs of the whole STK_LVL table;
(d) ours: the erp service's change capture on the same table, each row checked
    against erp.stock_changed.v1 and published, 500 to an erp.stock_changes.v1,
    confirmed. Goal: d >= 10,000 rows/s.
"""
import eventlet

eventlet.monkey_patch()  # nameko containers run on eventlet; must precede other imports

import argparse  # noqa: E402
import cProfile  # noqa: E402
import pstats  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import sqlalchemy as sa  # noqa: E402
from sqlalchemy import bindparam, select, update  # noqa: E402
from nameko.containers import ServiceContainer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere
from bench.common import bench_broker, connect, emit_json, environment, median, peak_rss_kib  # noqa: E402
from contracts.envelope import CloudEvent  # noqa: E402
from contracts.pos import PosSaleV1  # noqa: E402
from demo.legacy_erp import schema  # noqa: E402
from legacy_wrappers.legacy_db import engine_for  # noqa: E402
from legacy_wrappers.table_changes import ROWS, _after  # noqa: E402
from bus import topology  # noqa: E402
from bus.extensions import event_message  # noqa: E402
from bus.publisher import ConfirmingPublisher  # noqa: E402
from services.erp import ledger  # noqa: E402
from services.erp.outbox import OUTBOX, RELAYED as relayed  # noqa: E402
from services.erp.service import ErpService  # noqa: E402
from tests.postgres import PostgresCluster  # noqa: E402

GOALS = {"sales_per_s": 1000, "sales_ratio": 0.5, "cdc_rows_per_s": 10000}
SALES_QUEUE = topology.handler_queue("store_agent", "pos.sale.v1", "erp", "on_pos_sale")
POSTED_QUEUE = "bench.erp.sale_posted"  # a subscriber, so erp.sale_posted.v1 is routed as in production


def sale(n: int, stores: int) -> PosSaleV1:
    lines = [{"line_no": i, "sku": schema.DEMO_SKUS[(n + i) % len(schema.DEMO_SKUS)], "quantity": 1,
              "unit_price_minor": 100 * i, "line_total_minor": 100 * i} for i in (1, 2, 3)]
    return PosSaleV1.model_validate({
        "store_id": f"S{n % stores:03d}", "terminal_id": "07", "pos_txn_id": f"B-{n:08d}", "business_day": "2026-11-27",
        "occurred_at": "2026-11-27T10:15:00+00:00", "currency": "EUR", "lines": lines,
        "total_minor": 600, "tenders": [{"kind": "card", "amount_minor": 600}]})


class Databases:
    """A fresh legacy database per run: SQLite files, databases in one PostgreSQL cluster;
    seeded with stock for every benchmark store, so each sale line moves an existing row."""

    def __init__(self, home: Path, cluster: PostgresCluster | None, stores: int):
        self.home, self.cluster, self.stores, self.n = home, cluster, stores, 0

    def fresh(self, kind: str, seed: bool = True) -> str:
        self.n += 1
        dsn = (f"sqlite:///{self.home / f'erp{self.n}.db'}" if kind == "sqlite"
               else self.cluster.create_database(f"bench{self.n}"))
        engine = schema.engine_for(dsn)
        schema.create_schema(engine)
        if seed:
            with engine.begin() as conn:
                schema.seed_demo_data(conn)
                conn.execute(schema.STK_LVL.insert(), [
                    dict(STORE_NO=f"S{n:03d}", SKU=sku, ON_HAND=schema.DEMO_ON_HAND, UPD_TS=schema.utc_stamp())
                    for n in range(self.stores) if f"S{n:03d}" not in schema.DEMO_STORES for sku in schema.DEMO_SKUS])
        engine.dispose()
        return dsn


class PlainPosting:
    """The rows of `ledger.rows_for` written with plain SQLAlchemy Core: statements
    built once, `conn.execute(statement, params)`, as a careful program writes them."""

    def __init__(self, t: ledger.LegacyTables):
        seq, stock = t.doc_seq.c, t.stock.c
        self.t = t
        self.bump = update(t.doc_seq).where(seq.SEQ_NAME == "SLS").values(NEXT_NO=seq.NEXT_NO + 1)
        self.read = select(seq.NEXT_NO - 1).where(seq.SEQ_NAME == "SLS")
        self.move = (update(t.stock).where(stock.STORE_NO == bindparam("store"), stock.SKU == bindparam("sku"))
                     .values(ON_HAND=stock.ON_HAND + bindparam("delta"), UPD_TS=bindparam("now")))
        self.inserts = [t.header.insert(), t.lines.insert(), t.tenders.insert(), t.gl.insert()]

    def post_sale(self, conn, sale: PosSaleV1) -> str:
        conn.execute(self.bump)
        doc_no = f"S{conn.execute(self.read).scalar_one():08d}"
        now = ledger._stamp()
        rows = ledger.rows_for(sale, "S", doc_no, None, now)
        for insert, values in zip(self.inserts, (rows.header, rows.lines, rows.tenders, rows.gl)):
            conn.execute(insert, values)
        for sku, delta in rows.stock_moves:
            conn.execute(self.move, {"store": sale.store_id, "sku": sku, "delta": delta, "now": now})
        return doc_no


def raw_posting(dsn: str, sales: list[PosSaleV1], commit_every: int) -> float:
    engine = engine_for(dsn)
    md = sa.MetaData()
    md.reflect(engine, only=ledger.LEGACY_TABLES)
    plain = PlainPosting(ledger.LegacyTables.of(dict(md.tables)))
    started = time.perf_counter()
    with engine.connect() as conn:
        for start in range(0, len(sales), commit_every):
            with conn.begin():
                for s in sales[start:start + commit_every]:
                    plain.post_sale(conn, s)
    elapsed = time.perf_counter() - started
    engine.dispose()
    return len(sales) / elapsed


def config(uri: str, dsn: str, home: Path) -> dict:
    """As config/bus.yaml has it."""
    return {"AMQP_URI": uri, "LEGACY_DB_URI": dsn, "max_workers": 384,
            "RETAILBUS": {"root": str(home), "retry": {"prefetch": 128}}}


def our_posting(uri: str, dsn: str, sales: list[PosSaleV1], home: Path) -> float:
    conn = connect(uri)
    ch = conn.channel()
    topology.declare_exchange(ch, "store_agent.events")
    topology.declare_handler_queues(ch, "store_agent.events", "pos.sale.v1", SALES_QUEUE, [1, 5, 30],
                                    single_active=True)
    ch.queue_purge(SALES_QUEUE)
    topology.declare_exchange(ch, "erp.events")
    topology.declare_queue(ch, POSTED_QUEUE)
    ch.queue_bind(POSTED_QUEUE, "erp.events", "erp.sale_posted.v1")
    ch.queue_purge(POSTED_QUEUE)
    conn.close()
    publisher = ConfirmingPublisher(uri)
    events = [CloudEvent.new("pos.sale.v1", f"store/{s.store_id}/pos/07", s,
                             idempotencykey=f"pos.sale.v1:{s.store_id}:{s.pos_txn_id}") for s in sales]
    assert publisher.publish_many([event_message(e, "store_agent.events") for e in events]) == [None] * len(events)
    publisher.close()
    before = relayed.labels(topology.events_exchange("erp"), "confirmed")._value.get()
    container = ServiceContainer(ErpService, config(uri, dsn, home))
    # The clock starts at the first sale handed to a worker, as raw's at its first statement
    # (not at the change capture's first worker, which starts before any delivery).
    first_worker = []
    spawn_worker = container.spawn_worker

    def timed_spawn_worker(entrypoint, *args, **kwargs):
        if not first_worker and entrypoint.method_name == "on_pos_sale":
            first_worker.append(time.perf_counter())
        return spawn_worker(entrypoint, *args, **kwargs)
    container.spawn_worker = timed_spawn_worker
    container.start()
    try:
        while relayed.labels(topology.events_exchange("erp"), "confirmed")._value.get() - before < len(sales):
            eventlet.sleep(0.02)
        elapsed = time.perf_counter() - first_worker[0]
    finally:
        container.stop()
    engine = sa.create_engine(dsn)
    with engine.connect() as c:  # every sale posted once, every event marked sent
        sent = c.execute(sa.select(sa.func.count()).select_from(OUTBOX).where(OUTBOX.c.SENT_TS.is_not(None))).scalar()
    engine.dispose()
    assert sent == len(sales), f"{sent} of {len(sales)} outbox rows sent"
    return len(sales) / elapsed


def seed_stock(dsn: str, rows: int):
    engine = schema.engine_for(dsn)
    stamp = schema.utc_stamp()
    with engine.begin() as conn:
        conn.execute(schema.STK_LVL.insert(), [
            dict(STORE_NO=f"B{i % 100:03d}", SKU=f"SKU{i // 100:07d}", ON_HAND=i, UPD_TS=stamp) for i in range(rows)])
    engine.dispose()


def raw_capture(dsn: str, batch: int = 1000) -> float:
    engine = engine_for(dsn)
    t = schema.STK_LVL
    order = [t.c.UPD_TS, t.c.STORE_NO, t.c.SKU]
    started, n, mark = time.perf_counter(), 0, None
    while True:
        query = sa.select(t).order_by(*order).limit(batch)
        if mark is not None:
            query = query.where(_after(order, mark))
        with engine.connect() as conn:
            rows = [dict(r) for r in conn.execute(query).mappings()]
            conn.rollback()
        if not rows:
            break
        n += len(rows)
        mark = (rows[-1]["UPD_TS"], rows[-1]["STORE_NO"], rows[-1]["SKU"])
    elapsed = time.perf_counter() - started
    engine.dispose()
    return n / elapsed


def our_capture(uri: str, dsn: str, rows: int, home: Path) -> float:
    counter = ROWS.labels("STK_LVL", "new", "ok")
    before = counter._value.get()
    container = ServiceContainer(ErpService, config(uri, dsn, home))
    started = time.perf_counter()
    container.start()
    try:
        while counter._value.get() - before < rows:
            eventlet.sleep(0.02)
        elapsed = time.perf_counter() - started
    finally:
        container.stop()
    return rows / elapsed


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--amqp-uri", help="an existing broker (default: a throw-away node)")
    parser.add_argument("--sales", type=int, default=2000)
    parser.add_argument("--stock-rows", type=int, default=50000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--stores", type=int, default=100, help="sales are ordered per store, stores run in parallel")
    parser.add_argument("--commit-every", type=int, default=64, help="sales per commit in the raw baseline")
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--profile", choices=["sqlite", "postgresql"], help="cProfile our posting once")
    args = parser.parse_args()
    backends = args.backends.split(",")
    sales = [sale(n, args.stores) for n in range(args.sales)]
    figures: dict = {"bench": "erp", "sales": args.sales, "stores": args.stores, "raw_commit_every": args.commit_every, "stock_rows": args.stock_rows, "runs": args.runs, "goals": GOALS}
    with tempfile.TemporaryDirectory(prefix="retailbus-bench-erp-") as tmp, bench_broker(args.amqp_uri) as (uri, _):
        home = Path(tmp)
        cluster = PostgresCluster().start() if "postgresql" in backends else None
        try:
            dbs = Databases(home, cluster, args.stores)
            if args.profile:
                profiler = cProfile.Profile()
                profiler.enable()
                print(f"profiled: {our_posting(uri, dbs.fresh(args.profile), sales, home):.0f} sales/s")
                profiler.disable()
                pstats.Stats(profiler).sort_stats("cumulative").print_stats(30)
                return
            for kind in backends:
                raw = [raw_posting(dbs.fresh(kind), sales, args.commit_every) for _ in range(args.runs)]
                ours = [our_posting(uri, dbs.fresh(kind), sales, home) for _ in range(args.runs)]
                cap_raw, cap_ours = [], []
                for _ in range(args.runs):
                    dsn = dbs.fresh(kind, seed=False)
                    seed_stock(dsn, args.stock_rows)
                    cap_raw.append(raw_capture(dsn))
                    cap_ours.append(our_capture(uri, dsn, args.stock_rows, home))
                f = {"raw_sales_per_s": median(raw), "sales_per_s": median(ours),
                     "sales_ratio": median(ours) / median(raw),
                     "raw_cdc_rows_per_s": median(cap_raw), "cdc_rows_per_s": median(cap_ours),
                     "cdc_ratio": median(cap_ours) / median(cap_raw),
                     "runs": {"raw": raw, "ours": ours, "cdc_raw": cap_raw, "cdc_ours": cap_ours}}
                figures[kind] = f
                print(f"{kind}: posting raw {f['raw_sales_per_s']:.0f}/s, ours {f['sales_per_s']:.0f}/s "
                      f"(x{f['sales_ratio']:.2f}); capture raw {f['raw_cdc_rows_per_s']:.0f} rows/s, "
                      f"ours {f['cdc_rows_per_s']:.0f} rows/s (x{f['cdc_ratio']:.2f})", flush=True)
                for name, value in (("sales_per_s", f["sales_per_s"]), ("sales_ratio", f["sales_ratio"]),
                                    ("cdc_rows_per_s", f["cdc_rows_per_s"])):
                    print(f"  goal {name} >= {GOALS[name]}: {'met' if value >= GOALS[name] else 'MISSED'}")
            figures["goals_met"] = {f"{kind}.{name}": figures[kind][name] >= target
                                    for kind in backends for name, target in GOALS.items()}
            figures["peak_rss_kib"] = peak_rss_kib()
            figures["environment"] = environment(uri)
        finally:
            if cluster is not None:
                cluster.stop()
    emit_json(figures)


if __name__ == "__main__":
    main()
