"""The return-to-refund estate for integration and chaos tests: the demo legacy ERP database,
the loyalty platform and the CRM as real processes, and the erp, loyalty, crm and returns
services as real nameko processes on the real broker, in a temporary root. Sales and returns
are published as a store agent publishes them; the oracle (`expected`) works out what a
workload must end as, from the earning rules, independently of the services' tables."""
from __future__ import annotations

import json
import random
import sqlite3
import subprocess
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import date, timedelta
from fractions import Fraction
from pathlib import Path

import amqp
import yaml
from sqlalchemy import create_engine, text

from bus import journal, topology
from bus.extensions import event_message
from bus.publisher import ConfirmingPublisher, connection_params
from contracts.envelope import CloudEvent
from contracts.pos import PosReturnV1, PosSaleV1
from demo.legacy_erp.schema import create_schema, seed_demo_data
from demo.legacy_erp.schema import engine_for as legacy_engine
from services.loyalty.rules import Earning, sale_points
from tests.conftest import free_ports
from tests.integration.support import Platform, ServiceProcesses, metric, wait_for, write_config

MODULES = {"erp": "services.erp", "loyalty": "services.loyalty", "crm": "services.crm", "returns": "services.returns",
           "journal": "services.journal"}
QUEUES = {  # what each service consumes before a test publishes to it
    "journal": journal.QUEUE,
    "erp": topology.handler_queue("erp", "erp.post_return.v1", "erp", "on_post_return"),
    "loyalty": topology.handler_queue("loyalty", "loyalty.return_points.v1", "loyalty", "on_return_points"),
    "crm": topology.handler_queue("crm", "crm.record_return.v1", "crm", "on_record_return"),
    "returns": topology.handler_queue("store_agent", "pos.return.v1", "returns", "on_pos_return"),
}
PURGED = (*QUEUES.values(), topology.handler_queue("store_agent", "pos.sale.v1", "erp", "on_pos_sale"),
          topology.handler_queue("erp", "erp.sale_posted.v1", "loyalty", "on_sale_posted"),
          topology.handler_queue("erp", "erp.sale_posted.v1", "crm", "on_sale_posted"),
          *(topology.handler_queue(source, kind, "returns", "on_process_message") for source, kind in (
              ("erp", "erp.return_posted.v1"), ("loyalty", "loyalty.return_points_booked.v1"),
              ("crm", "crm.return_recorded.v1"), ("loyalty", "process.step_failed.v1"),
              ("crm", "process.step_failed.v1"), ("cases", "process.step_retry.v1"))))
PROMOTION = {"name": "spend100", "min_spend_minor": 10_000, "bonus_points": 250,
             "valid_from": "2020-01-01", "valid_to": "2099-12-31"}
RULES = {"accrual": {"mode": "api"}, "earning": {"points_per_unit": 1, "excluded_sku_prefixes": ["99"],
                                                "threshold_promotions": [PROMOTION]}}
SALE_DAY = date.today() - timedelta(days=5)


class ReturnsEstate(ServiceProcesses):
    modules, ready = MODULES, QUEUES

    def __init__(self, root: Path, amqp_uri: str, processes: dict | None = None, handlers: dict | None = None,
                 returns_db: str | None = None, policy: dict | None = None):
        self.root, self.uri = root, amqp_uri
        (root / "var").mkdir(parents=True, exist_ok=True)
        self.legacy_db = root / "var" / "legacy_erp.db"
        engine = legacy_engine(f"sqlite:///{self.legacy_db}")
        create_schema(engine)
        with engine.begin() as conn:
            seed_demo_data(conn)
        engine.dispose()
        loyalty_port, crm_port, self.metrics_port = free_ports(3)
        self.platform = Platform("demo.loyalty_platform", root / "platform.db", loyalty_port)
        self.crm = Platform("demo.crm", root / "crm.db", crm_port)
        (root / "config").mkdir(exist_ok=True)
        (root / "config" / "loyalty.yaml").write_text(yaml.safe_dump(RULES))
        (root / "config" / "returns.yaml").write_text(yaml.safe_dump({"policy": policy or {}}))
        fast = {"attempts": 12, "delays": [0.5, 1, 2]}
        self.returns_db = returns_db or f"sqlite:///{root / 'var' / 'returns.db'}"
        self.config = write_config(
            root, amqp_uri, legacy_db=f"sqlite:///{self.legacy_db}",
            loyalty_platform={"http": self.platform.url.removeprefix("http://"), "db": "var/unused.db"},
            crm={"http": self.crm.url.removeprefix("http://"), "db": "var/unused-crm.db"},
            services={name: {"module": module, **({"metrics_port": self.metrics_port} if name == "returns" else {})}
                      for name, module in MODULES.items()},
            processes=processes or {},
            handlers={**{h: fast for h in ("loyalty.on_sale_posted", "loyalty.on_return_points", "crm.on_sale_posted",
                                          "crm.on_record_return", "returns.on_process_message",
                                          "returns.on_pos_return")}, **(handlers or {})})
        config = yaml.safe_load(self.config.read_text())
        config["RETURNS_DB_URI"] = self.returns_db
        config.setdefault("CRM_DB_URI", f"sqlite:///{root / 'var' / 'crm_service.db'}")
        self.config.write_text(yaml.safe_dump(config, sort_keys=False))
        self.purge(PURGED)
        self.processes: dict[str, subprocess.Popen] = {}
        self.publisher = ConfirmingPublisher(amqp_uri, window=1000)
        self.earning = Earning.model_validate(RULES["earning"])

    # ---------------------------------------------------------------- processes
    def close(self) -> None:
        self.stop_all()
        self.publisher.close()
        self.platform.stop()
        if self.crm.proc.poll() is None:
            self.crm.stop()

    # ---------------------------------------------------------------- traffic
    def enrol(self, card: str, points: int = 0) -> None:
        assert self.platform.call("POST", "/members", {"card": card, "customer_id": f"CU-{card}"},
                                  key=f"enrol:{card}")[0] in (201, 409)
        if points:
            self.platform.call("POST", "/transactions", {"card": card, "type": "EARN", "points": points,
                                                         "reference": "welcome"}, key=f"welcome:{card}")

    def publish(self, txns: list[PosSaleV1 | PosReturnV1]) -> None:
        events = [CloudEvent.new(t.TYPE, f"store/{t.store_id}/pos/{t.terminal_id}", t, subject=t.pos_txn_id,
                                 idempotencykey=f"{t.TYPE}:{t.store_id}:{t.pos_txn_id}") for t in txns]
        messages = [event_message(e, "store_agent.events") for e in events]
        assert self.publisher.publish_many(messages) == [None] * len(messages)

    # ---------------------------------------------------------------- the systems' records
    def erp(self, sql: str, *args) -> list[tuple]:
        with sqlite3.connect(self.legacy_db, timeout=30) as db:
            return db.execute(sql, args).fetchall()

    def loyalty(self, sql: str, *args) -> list[tuple]:
        """Rows of the loyalty service's database ([] before it created its tables)."""
        with sqlite3.connect(self.root / "var" / "loyalty.db", timeout=30) as db:
            try:
                return db.execute(sql, args).fetchall()
            except sqlite3.OperationalError as exc:
                if "no such table" in str(exc):
                    return []
                raise

    def instances(self, prefix: str = "") -> dict[str, int]:
        """Process instances of returns whose POS id starts with `prefix`, by state (none before
        the service created its tables)."""
        engine = create_engine(self.returns_db)
        try:
            with engine.connect() as conn:
                return dict(conn.execute(text('SELECT "STATE", count(*) FROM "RB_PROCESS" WHERE "CORR_KEY" LIKE :k '
                                              'GROUP BY "STATE"'), {"k": f"%:{prefix}%"}).all())
        except Exception:  # noqa: BLE001  (not created yet)
            return {}
        finally:
            engine.dispose()

    def returns(self, sql: str, **params) -> list[tuple]:
        """Rows of the returns service's database (SQLite or PostgreSQL)."""
        engine = create_engine(self.returns_db)
        try:
            with engine.connect() as conn:
                return list(conn.execute(text(sql), params).all())
        finally:
            engine.dispose()

    def history(self, pos_txn_id: str) -> list[tuple[str | None, str]]:
        """(step, what) of the return's process instance, in order ([] before the service created its tables)."""
        if not self.instances():
            return []
        return [tuple(r) for r in self.returns(
            'SELECT h."STEP", h."WHAT" FROM "RB_PROCESS_HISTORY" h JOIN "RB_PROCESS" p USING ("PROCESS_ID") '
            'WHERE p."CORR_KEY" LIKE :k ORDER BY h."ID"', k=f"%:{pos_txn_id}")]

    def metric(self, name: str, **labels) -> float | None:
        """A sample of the returns service's /metrics; None when not (yet) exported."""
        return metric(self.metrics_port, name, **labels)

    def settled(self, count: int, timeout: float, prefix: str = "") -> bool:
        """`count` instances (of POS ids starting with `prefix`) completed or failed, none running."""
        def done():
            states = self.instances(prefix)
            return sum(states.get(s, 0) for s in ("completed", "failed")) >= count and not \
                states.get("running") and not states.get("compensating")
        return wait_for(done, timeout, interval=0.5)


def reply_queue(uri: str, service: str, message_type: str) -> str:
    """A queue of the test's own bound to `message_type` on `<service>.events` (emptied): what a
    process, or the workbench for case.opened.v1, would take."""
    name = f"test.{service}.{message_type}"
    conn = amqp.Connection(**connection_params(uri, 5))
    conn.connect()
    try:
        channel = conn.channel()
        channel.exchange_declare(topology.events_exchange(service), "topic", durable=True, auto_delete=False)
        channel.queue_declare(name, durable=True, auto_delete=False)
        channel.queue_purge(name)
        channel.queue_bind(name, topology.events_exchange(service), message_type)
    finally:
        conn.collect()
    return name


def taken(uri: str, queue: str) -> list[dict]:
    """The CloudEvents (as JSON) waiting in `queue`, taken."""
    conn = amqp.Connection(**connection_params(uri, 5))
    conn.connect()
    out = []
    try:
        channel = conn.channel()
        while (message := channel.basic_get(queue, no_ack=True)) is not None:
            out.append(json.loads(message.body))
    finally:
        conn.collect()
    return out


# -------------------------------------------------------------------- workload and oracle
@dataclass
class Sale:
    txn: PosSaleV1
    returns: list[PosReturnV1] = field(default_factory=list)


def sale(store: str, txn_id: str, card: str | None, lines: list[tuple[str, int, int, int]], day: date = SALE_DAY,
         tenders: list[dict] | None = None) -> PosSaleV1:
    """lines: (sku, quantity, unit price, discount) in minor units."""
    body = [{"line_no": n, "sku": sku, "quantity": q, "unit_price_minor": p, "discount_minor": d,
             "line_total_minor": q * p - d} for n, (sku, q, p, d) in enumerate(lines, start=1)]
    total = sum(line["line_total_minor"] for line in body)
    return PosSaleV1.model_validate({
        "store_id": store, "terminal_id": "07", "pos_txn_id": txn_id, "business_day": day.isoformat(),
        "currency": "EUR", "lines": body, "total_minor": total,
        "tenders": tenders or [{"kind": "card", "amount_minor": total}], "loyalty_card": card})


def return_of(original: PosSaleV1 | None, txn_id: str, units: dict[str, int], day: date | None = None,
              store: str = "S001", card: str | None = None, customer: str | None = None,
              refund: dict[str, int] | None = None) -> PosReturnV1:
    """Return `units` per SKU at the price paid per unit (rounded down), or `refund` per SKU."""
    lines = []
    for n, (sku, q) in enumerate(sorted(units.items()), start=1):
        if refund and sku in refund:
            amount = refund[sku]
        else:
            sold = [line for line in original.lines if line.sku == sku]
            amount = sum(line.line_total_minor for line in sold) * q // sum(line.quantity for line in sold)
        unit = -(-amount // q)  # the unit price rounded up, the difference as the line's discount
        lines.append({"line_no": n, "sku": sku, "quantity": q, "unit_price_minor": unit,
                      "discount_minor": unit * q - amount, "line_total_minor": amount})
    total = sum(line["line_total_minor"] for line in lines)
    return PosReturnV1.model_validate({
        "store_id": original.store_id if original else store, "terminal_id": "07", "pos_txn_id": txn_id,
        "business_day": (day or date.today()).isoformat(), "currency": "EUR", "lines": lines, "total_minor": total,
        "tenders": [{"kind": "cash", "amount_minor": total}],
        "original": {"store_id": original.store_id, "pos_txn_id": original.pos_txn_id} if original else None,
        "loyalty_card": card, "customer_id": customer})


def workload(prefix: str, sales: int, cards: int, seed: int) -> list[Sale]:
    """`sales` sales with cards, 1-3 lines, a third above the promotion's threshold, each with two
    returns: one unit of its first line, then what is left of some of its lines."""
    rng = random.Random(seed)
    out = []
    for n in range(sales):
        skus = rng.sample([f"1000{k:02d}" for k in range(1, 11)], rng.randint(1, 3))
        big = n % 3 == 0
        lines = []
        for k, sku in enumerate(skus):
            q = rng.randint(2, 4) if k == 0 else rng.randint(1, 4)
            price = rng.randint(3_000, 6_000) if big else rng.randint(300, 2_000)
            lines.append((sku, q, price, rng.choice([0, 0, q * price // 10])))
        s = Sale(sale(rng.choice(["S001", "S002"]), f"{prefix}-S{n:05d}", f"{prefix}C{n % cards:03d}", lines))
        first = s.txn.lines[0].sku
        s.returns.append(return_of(s.txn, f"{prefix}-R{n:05d}a", {first: 1}))
        rest = {line.sku: line.quantity - (1 if line.sku == first else 0) for line in s.txn.lines
                if rng.random() < 0.6}
        rest = {sku: q for sku, q in rest.items() if q > 0} or {first: 1}
        s.returns.append(return_of(s.txn, f"{prefix}-R{n:05d}b", rest))
        out.append(s)
    return out


def expected(earning: Earning, sales: list[Sale]) -> tuple[dict[str, int], dict[str, int], dict[str, int]]:
    """(points each return takes back for its lines, bonus clawed back per sale, balance per card),
    by the earning rules at tier BASE, a return's points being what its lines earned."""
    back, clawed, balance = {}, {}, defaultdict(int)
    promotion = earning.threshold_promotions[0]
    for s in sales:
        txn = s.txn
        points = sale_points(earning, "BASE", txn.business_day,
                             [(line.sku, line.quantity, line.line_total_minor) for line in txn.lines])
        spend = sum(line.line_total_minor for line in txn.lines)
        bonus = promotion.bonus_points if spend >= promotion.min_spend_minor else 0
        balance[txn.loyalty_card] += sum(points) + bonus
        sold = defaultdict(lambda: [0, 0, 0])  # units, points, paid
        for line, p in zip(txn.lines, points):
            sold[line.sku][0] += line.quantity
            sold[line.sku][1] += p
            sold[line.sku][2] += line.line_total_minor
        returned = defaultdict(int)
        for ret in s.returns:
            back[ret.pos_txn_id] = sum(sold[line.sku][1] * line.quantity // sold[line.sku][0] for line in ret.lines)
            balance[txn.loyalty_card] -= back[ret.pos_txn_id]
            for line in ret.lines:
                returned[line.sku] += line.quantity
        left = sum(Fraction(paid * (units - returned[sku]), units) for sku, (units, _, paid) in sold.items())
        clawed[txn.pos_txn_id] = bonus if bonus and left < promotion.min_spend_minor else 0
        balance[txn.loyalty_card] -= clawed[txn.pos_txn_id]
    return back, clawed, dict(balance)
