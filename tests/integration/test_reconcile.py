"""Reconciliation end to end: a store agent, the erp, files and reconcile services
as real `nameko run` processes on a broker node of this module, the legacy SQLite
database and the loyalty points folder. Sales and returns flow through the agent;
`retailbus reconcile` (a real subprocess) finds the day in order, then names exactly
the posting the test deletes and the one it duplicates, and so does the service's
`retailbus_reconciliation_gap{store}`."""
from __future__ import annotations

import json
import re
import sqlite3
import subprocess
import sys
import urllib.error
import urllib.request
from contextlib import suppress
from datetime import date
from pathlib import Path

import pytest
from sqlalchemy import insert

from demo.legacy_erp.schema import SLS_HDR, create_schema, engine_for, seed_demo_data
from bus import topology
from services.reconcile import sources
from tests.conftest import free_ports, start_broker
from tests.integration.filedrop_support import write_drops
from tests.integration.support import legacy_sale, nameko_run, queue_state, stop, wait_for, write_config

pytestmark = pytest.mark.integration

DAY = "2026-11-27"  # legacy_sale's TXN_DATE
CARD = "LC0000000001"
TOTALS_QUEUE = topology.handler_queue("store_agent", "store.control_totals.v2", "reconcile", "on_control_digests")
SALES_QUEUE = topology.handler_queue("store_agent", "pos.sale.v1", "erp", "on_pos_sale")
POINTS_QUEUE = topology.handler_queue("erp", "batch", "files", "on_posted")
RETURNS_QUEUE = topology.handler_queue("store_agent", "pos.return.v1", "returns", "on_pos_return")


class Estate:
    def __init__(self, root: Path):
        self.root = root
        self.broker = start_broker(root / "broker")
        self.legacy_db = root / "legacy_erp.db"
        engine = engine_for(f"sqlite:///{self.legacy_db}")
        create_schema(engine)
        with engine.begin() as conn:
            seed_demo_data(conn)
        engine.dispose()
        self.agent_port, self.metrics_port = free_ports(2)
        write_drops(root, loyalty_points={"roll_seconds": 0.5})
        self.points_folder = root / "drops" / "loyalty_points"
        self.config = write_config(
            root, self.broker.uri(), legacy_db=f"sqlite:///{self.legacy_db}",
            retry={"delays": [1, 2], "prefetch": 64},
            stores=[{"id": "S001", "http": f"127.0.0.1:{self.agent_port}"}],
            agent={"auth_required": False, "control_totals_interval": 0.5},
            reconcile={"dsn": "sqlite:///var/reconcile.db", "interval": 0.5},
            services={"reconcile": {"module": "services.reconcile", "metrics_port": self.metrics_port}})
        self.processes: dict[str, subprocess.Popen] = {}

    def start(self, name: str, module: str, **env):
        self.processes[name] = nameko_run(self.config, module, self.root / f"{name}.log",
                                          RETAILBUS_AMQP_URI=self.broker.uri(), **env)

    def log(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text()[-3000:] if path.exists() else ""

    def consumers(self, queue: str) -> int:
        return queue_state(self.broker.uri(), queue)[1]

    def post(self, path: str, body: dict) -> int:
        req = urllib.request.Request(f"http://127.0.0.1:{self.agent_port}{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=15) as r:
                return r.status
        except urllib.error.HTTPError as exc:
            return exc.code
        except OSError:  # not listening (yet)
            return 0

    def documents(self) -> int:
        with sqlite3.connect(self.legacy_db) as db:
            return db.execute("SELECT count(*) FROM SLS_HDR WHERE STORE_NO = 'S001'").fetchone()[0]

    def reconcile(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "services.cli", "reconcile", "--config", str(self.config),
                               *args], capture_output=True, text=True, timeout=120, cwd=self.root)

    def gap_metric(self) -> float | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
                text = r.read().decode()
        except OSError:
            return None
        found = re.search(r'^retailbus_reconciliation_gap\{store="S001"\} (\S+)$', text, re.M)
        return float(found.group(1)) if found else None

    def stop_all(self):
        for name in list(self.processes):
            with suppress(Exception):
                stop(self.processes.pop(name))
        try:
            self.broker.stop()
        finally:
            if self.broker.is_running():
                self.broker.kill()


@pytest.fixture(scope="module")
def estate(tmp_path_factory):
    e = Estate(tmp_path_factory.mktemp("reconcile"))
    try:
        e.start("erp", "services.erp")
        e.start("files", "services.files")
        e.start("reconcile", "services.reconcile")
        e.start("returns", "services.returns")  # a bus-routed return reaches the ERP by the return process
        assert wait_for(lambda: e.consumers(SALES_QUEUE) == 1, timeout=90), e.log("erp")
        assert wait_for(lambda: e.consumers(TOTALS_QUEUE) == 1, timeout=90), e.log("reconcile")
        assert wait_for(lambda: e.consumers(POINTS_QUEUE) == 1, timeout=90), e.log("files")
        assert wait_for(lambda: e.consumers(RETURNS_QUEUE) == 1, timeout=90), e.log("returns")
        e.start("agent", "routing.store_agent", RETAILBUS_STORE="S001",
                WEB_SERVER_ADDRESS=f"127.0.0.1:{e.agent_port}")
        assert wait_for(lambda: e.post("/erp/sales", {}) == 400, timeout=90), e.log("agent")
        yield e
    finally:
        e.stop_all()


def sale(n: int, **extra) -> dict:
    return {**legacy_sale(f"S001-R{n:04d}"), **extra}


@pytest.mark.timeout(300)
def test_reconcile_finds_the_day_in_order_then_exactly_the_two_broken_postings(estate):
    sales = [sale(n, **({"LOYALTY_CARD": CARD} if n % 3 == 0 else {})) for n in range(30)]
    assert [estate.post("/erp/sales", s) for s in sales] == [200] * 30
    refund = {**legacy_sale("S001-RET0001"), "LOYALTY_CARD": CARD}
    assert estate.post("/erp/returns", refund) == 200
    assert estate.post("/erp/sales", sales[4]) == 200  # a till's retry: still one sale
    assert wait_for(lambda: estate.documents() == 31, timeout=120), estate.log("erp")

    # control totals arrive behind the sales; points files roll every 0.5 s
    first = wait_for(lambda: (r := estate.reconcile("--date", DAY)).returncode == 0 and r, timeout=120)
    assert first, f"{estate.reconcile('--date', DAY).stdout}\n{estate.log('reconcile')}\n{estate.log('agent')}"
    assert "store S001  business day 2026-11-27  OK" in first.stdout
    assert re.search(r"sales\s+agent\s+30 / 1,199.40 EUR\s+ERP\s+30 / 1,199.40 EUR\s+loyalty records 10", first.stdout), \
        first.stdout
    assert re.search(r"returns\s+agent\s+1 / 39.98 EUR\s+ERP\s+1 / 39.98 EUR\s+loyalty records 1", first.stdout)
    assert wait_for(lambda: estate.gap_metric() == 0.0, timeout=30), estate.log("reconcile")

    with sqlite3.connect(estate.legacy_db) as db:  # the ERP loses one posting and doubles another
        doc = db.execute("SELECT DOC_NO FROM SLS_HDR WHERE POS_TXN_ID = 'S001-R0007'").fetchone()[0]
        for table in ("SLS_TND", "SLS_LIN", "SLS_HDR"):
            db.execute(f"DELETE FROM {table} WHERE DOC_NO = ?", (doc,))
        db.execute("INSERT INTO SLS_HDR SELECT 'S99999999', DOC_TYPE, STORE_NO, TERM_NO, POS_TXN_ID, TXN_DATE, "
                   "TXN_TIME, TOTAL_CENTS, CURRENCY, LOYALTY_CARD, CUST_NO, ORIG_DOC_NO, CHANNEL, CREATED_TS "
                   "FROM SLS_HDR WHERE POS_TXN_ID = 'S001-R0012'")

    text = estate.reconcile("--date", DAY, "--store", "S001")
    assert text.returncode == 1, text.stdout + text.stderr
    assert "erp missing         sale   S001-R0007" in text.stdout
    assert "erp duplicated      sale   S001-R0012  (2 documents:" in text.stdout
    listed = re.findall(r"^  (erp|loyalty|amount) .*$", text.stdout, re.M)
    assert len(listed) == 2, text.stdout

    result = estate.reconcile("--date", DAY, "--json")
    assert result.returncode == 1
    [report] = json.loads(result.stdout)
    assert report["gap"] == 2
    assert [f["pos_txn_id"] for f in report["erp_missing"]] == ["S001-R0007"]
    assert [f["pos_txn_id"] for f in report["erp_duplicated"]] == ["S001-R0012"]
    assert all(report[k] == [] for k in ("erp_unexpected", "amount_mismatch", "loyalty_missing",
                                         "loyalty_duplicated", "loyalty_unexpected"))
    assert wait_for(lambda: estate.gap_metric() == 2.0, timeout=30), estate.log("reconcile")

    other_day = estate.reconcile("--date", "2026-11-26", "--store", "S001")
    assert other_day.returncode == 0 and "no control totals received" in other_day.stdout


def test_bad_date_is_exit_2_naming_it(estate):
    result = estate.reconcile("--date", "2026-02-30")
    assert result.returncode == 2 and "--date" in result.stderr


def test_erp_side_reads_both_database_kinds(legacy_dsn):
    """The SLS_HDR query is plain SQLAlchemy Core: the same on SQLite and PostgreSQL."""
    engine = engine_for(legacy_dsn)
    create_schema(engine)
    row = dict(DOC_TYPE="S", STORE_NO="S001", TERM_NO="07", POS_TXN_ID="T1", TXN_DATE="20261127",
               TOTAL_CENTS=3998, CURRENCY="EUR", CHANNEL="RBUS", CREATED_TS="x")
    with engine.begin() as conn:
        conn.execute(insert(SLS_HDR), [dict(row, DOC_NO="S1"), dict(row, DOC_NO="S2"),
                                       dict(row, DOC_NO="R1", DOC_TYPE="R", POS_TXN_ID="T2", TOTAL_CENTS=5),
                                       dict(row, DOC_NO="S3", STORE_NO="S002")])
    docs = sources.erp_docs(engine, "S001", date(2026, 11, 27))
    assert [(d.kind, d.pos_txn_id, d.doc_no, d.total_minor) for d in docs] == \
        [("return", "T2", "R1", 5), ("sale", "T1", "S1", 3998), ("sale", "T1", "S2", 3998)]
    assert sources.erp_stores(engine, date(2026, 11, 27)) == {"S001", "S002"}
    engine.dispose()
