"""The loyalty side of the estate for integration tests: the demo loyalty platform, the
loyalty service and (as a test needs them) the files and erp services as real processes
on a real broker, with the legacy ERP database, the points-file folder and the rules file
in a temporary root."""
from __future__ import annotations

import random
import sqlite3
import subprocess
import sys
from contextlib import suppress
from datetime import date, datetime, timezone
from pathlib import Path

import yaml

from bus import topology
from bus.extensions import event_message
from bus.publisher import ConfirmingPublisher
from contracts.envelope import CloudEvent
from contracts.erp import ErpSalePostedV1
from demo.legacy_erp.schema import create_schema, engine_for, seed_demo_data
from tests.conftest import free_ports
from tests.integration.filedrop_support import write_drops
from tests.integration.support import Platform, ServiceProcesses, metric, write_config

MODULES = {"loyalty": "services.loyalty", "files": "services.files", "erp": "services.erp"}
QUEUES = {  # the queue each service must be consuming before a test publishes
    "loyalty": topology.handler_queue("erp", "erp.sale_posted.v1", "loyalty", "on_sale_posted"),
    "files": topology.handler_queue("erp", "batch", "files", "on_posted"),
    "erp": topology.handler_queue("loyalty", "loyalty.settlement.v1", "erp", "on_loyalty_settlement"),
}
OTHER_QUEUES = (topology.handler_queue("loyalty", "loyalty.return_points.v1", "loyalty", "on_return_points"),
                topology.handler_queue("store_agent", "pos.sale.v1", "erp", "on_pos_sale"))


def sale(store: str, txn: str, card: str | None, lines: list[tuple[str, int, int]], day: date,
         posted_at: datetime | None = None, kind=ErpSalePostedV1, **extra) -> CloudEvent:
    """An erp.sale_posted.v1 (or return) as the erp announces it."""
    doc = kind(store_id=store, pos_txn_id=txn, doc_no=f"D-{txn}", business_day=day,
               posted_at=posted_at or datetime.now(timezone.utc), currency="EUR",
               total_minor=sum(t for _, _, t in lines), loyalty_card=card,
               lines=[{"sku": s, "quantity": q, "line_total_minor": t} for s, q, t in lines], **extra)
    return CloudEvent.new(kind.TYPE, "erp", doc, subject=txn, idempotencykey=f"{kind.TYPE}:D-{txn}")


def random_lines(rng: random.Random, skus=("100001", "100002", "100003")) -> list[tuple[str, int, int]]:
    """1-3 lines with totals in cents (not whole units: rounding matters)."""
    return [(rng.choice(skus), rng.randint(1, 3), rng.randint(30, 15_000)) for _ in range(rng.randint(1, 3))]


class LoyaltyEstate(ServiceProcesses):
    modules, ready = MODULES, QUEUES

    def __init__(self, root: Path, amqp_uri: str, rules: dict, handlers: dict | None = None, **retailbus):
        self.root, self.uri = root, amqp_uri
        (root / "var").mkdir(parents=True, exist_ok=True)
        platform_port, *ports = free_ports(1 + len(MODULES))
        self.platform = Platform("demo.loyalty_platform", root / "platform.db", platform_port)
        self.rules = root / "config" / "loyalty.yaml"
        self.rules.parent.mkdir(parents=True, exist_ok=True)
        self.rules.write_text(yaml.safe_dump(rules, sort_keys=False))
        write_drops(root, loyalty_points={"roll_seconds": 0.3})
        self.points_folder = root / "drops" / "loyalty_points"
        self.legacy_db = root / "var" / "legacy_erp.db"
        engine = engine_for(f"sqlite:///{self.legacy_db}")
        create_schema(engine)
        with engine.begin() as conn:
            seed_demo_data(conn)
        engine.dispose()
        self.metrics_ports = dict(zip(MODULES, ports))
        fast = {"attempts": 12, "delays": [0.5, 1, 2]}
        self.config = write_config(
            root, amqp_uri, legacy_db=f"sqlite:///{self.legacy_db}",
            loyalty_platform={"http": self.platform.url.removeprefix("http://"), "db": "var/unused.db"},
            loyalty_rules=str(self.rules),
            services={name: {"module": module, "metrics_port": self.metrics_ports[name]}
                      for name, module in MODULES.items()},
            handlers={"loyalty.on_sale_posted": fast, "loyalty.on_return_points": fast,
                      "erp.on_loyalty_settlement": fast, **(handlers or {})}, **retailbus)
        self.purge([*QUEUES.values(), *OTHER_QUEUES])
        self.processes: dict[str, subprocess.Popen] = {}
        self.publisher = ConfirmingPublisher(amqp_uri, window=500)

    def publish(self, events: list[CloudEvent], exchange: str = "erp.events") -> None:
        assert self.publisher.publish_many([event_message(e, exchange) for e in events]) == [None] * len(events)

    def metric(self, service: str, name: str, **labels) -> float | None:
        return metric(self.metrics_ports[service], name, **labels)

    def points_file(self) -> list[tuple[str, str, int]]:
        """(kind, POS id, points) of every record in the complete points files."""
        out = []
        for path in sorted(self.points_folder.glob("POINTS_*.dat")):
            if not path.with_name(path.name + ".done").exists():
                continue
            for line in path.read_text().splitlines():
                if line[:1] in ("A", "R"):
                    out.append((line[0], line[29:69].strip(), int(line[77:86])))
        return out

    def loyalty_rows(self, sql: str, *args) -> list[tuple]:
        with sqlite3.connect(self.root / "var" / "loyalty.db", timeout=30) as db:
            return db.execute(sql, args).fetchall()

    def legacy_rows(self, sql: str, *args) -> list[tuple]:
        with sqlite3.connect(self.legacy_db, timeout=30) as db:
            return db.execute(sql, args).fetchall()

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "services.cli", *args, "--config", str(self.config)],
                              capture_output=True, text=True, timeout=120, cwd=self.root)

    def enrol(self, card: str, tier: str = "BASE", points: int = 0) -> None:
        assert self.platform.call("POST", "/members", {"card": card, "customer_id": f"CU-{card}", "tier": tier},
                                  f"m-{card}")[0] == 201
        if points:
            assert self.platform.call("POST", "/transactions", {"card": card, "type": "EARN", "points": points,
                                                                "reference": f"seed-{card}"}, f"seed-{card}")[0] == 201

    def close(self) -> None:
        with suppress(Exception):
            self.publisher.close()
        self.stop_all()
        self.platform.stop()

