"""`retailbus trace` end to end: a store agent in bus mode, the erp, files, customers and journal
services as real `nameko run` processes on a real broker, the legacy SQLite
database, real folders; the trace is read by the real command line."""
from __future__ import annotations

import json
import re
import sqlite3
import subprocess
import sys
import urllib.request
from contextlib import ExitStack
from pathlib import Path

import pytest
from nameko.containers import ServiceContainer

from demo.batch.jobs import customer_rows, write_customer_export
from demo.legacy_erp.schema import create_schema, engine_for, seed_demo_data
from bus import journal, topology
from bus.journal import JournalHops
from tests.conftest import free_ports
from tests.integration.filedrop_support import write_drops
from tests.integration.routing_estate import table_text
from tests.integration.support import legacy_sale, nameko_run, purge_queues, queue_state, stop, wait_for, write_config

pytestmark = pytest.mark.integration

RETAILBUS = Path(sys.executable).with_name("retailbus")
QUEUES = {  # process -> a queue it consumes: it is up once that queue has its consumer
    "journal": journal.QUEUE,
    "erp": topology.handler_queue("store_agent", "pos.sale.v1", "erp", "on_pos_sale"),
    "files": topology.handler_queue("erp", "batch", "files", "on_posted"),
    "customers": topology.handler_queue("files", "event.batch.v1", "customers", "on_file_rows"),
}
FILE_ROWS_QUEUE = topology.handler_queue("files", "event.batch.v1", "customers", "on_file_rows")


def purge(uri: str, queue: str) -> None:
    """Hops other tests' processes sent to this shared broker are not this journal's."""
    purge_queues(uri, [queue])


def healthy(url: str) -> bool:
    try:
        return urllib.request.urlopen(url, timeout=1).status == 200
    except OSError:
        return False


class Estate:
    def __init__(self, root: Path, uri: str):
        self.root, self.uri = root, uri
        (root / "var").mkdir(parents=True)
        self.legacy_db = root / "var" / "legacy_erp.db"
        engine = engine_for(f"sqlite:///{self.legacy_db}")
        create_schema(engine)
        with engine.begin() as conn:
            seed_demo_data(conn)
        engine.dispose()
        self.agent_port, unused_erp_port = free_ports(2)
        (root / "config").mkdir()
        (root / "config" / "routes.yaml").write_text(table_text(1, unused_erp_port, "mode: bus"))
        self.config = write_config(
            root, uri, legacy_db=f"sqlite:///{self.legacy_db}", retry={"delays": [0.5, 1]},
            stores=[{"id": "S001", "http": f"127.0.0.1:{self.agent_port}"}], agent={"auth_required": False},
            journal={"flush_seconds": 0.1})
        write_drops(root, loyalty_points={"roll_seconds": 1})
        (root / "drops" / "customers").mkdir(parents=True)
        purge(uri, journal.QUEUE)

    def log(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text()[-3000:] if path.exists() else ""

    def start(self, stack: ExitStack):
        for name, queue in QUEUES.items():
            stack.callback(stop, nameko_run(self.config, f"services.{name}", self.root / f"{name}.log"))
        for name, queue in QUEUES.items():
            assert wait_for(lambda: queue_state(self.uri, queue)[1] == 1, timeout=90), self.log(name)
        agent = nameko_run(self.config, "routing.store_agent", self.root / "agent.log", RETAILBUS_STORE="S001",
                           WEB_SERVER_ADDRESS=f"127.0.0.1:{self.agent_port}")
        stack.callback(stop, agent)
        assert wait_for(lambda: healthy(f"http://127.0.0.1:{self.agent_port}/healthz"), timeout=90), \
            self.log("agent")

    def sell(self, txn_id: str, **extra) -> dict:
        body = json.dumps({**legacy_sale(txn_id), **extra}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{self.agent_port}/erp/sales", data=body,
                                         headers={"Content-Type": "application/json"})
        return json.loads(urllib.request.urlopen(request, timeout=15).read())

    def trace(self, name: str, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(RETAILBUS), "trace", name, "--config", str(self.config), *args],
                              capture_output=True, text=True, timeout=60, cwd=self.root)

    def trace_until(self, name: str, last_hop: str) -> list[list[str]]:
        """The trace table's rows (cells split on runs of 2+ spaces) once `last_hop` is in it."""
        def rows():
            done = self.trace(name)
            lines = [[cell for cell in line.split("  ") if cell.strip()] for line in done.stdout.splitlines()[1:]]
            return lines if done.returncode == 0 and any(r[2].strip() == last_hop for r in lines) else None
        found = wait_for(rows, timeout=90, interval=0.5)
        assert found, (self.trace(name).stdout, self.log("journal"), self.log("files"), self.log("erp"))
        return [[cell.strip() for cell in row] for row in found]


@pytest.fixture(scope="module")
def estate(amqp_uri, tmp_path_factory):
    estate = Estate(tmp_path_factory.mktemp("trace"), amqp_uri)
    with ExitStack() as stack:
        estate.start(stack)
        yield estate


@pytest.mark.timeout(300)
def test_a_sale_is_traced_from_the_pos_to_the_erp_to_the_loyalty_points_file(estate):
    answer = estate.sell("S001-TRACE-0001", LOYALTY_CARD="LC0000000042")
    assert answer["STATUS"] == "OK" and answer["DOC_NO"] == "PENDING"

    rows = estate.trace_until("S001-TRACE-0001", "written")
    assert [row[2] for row in rows] == ["accepted", "forwarded", "consumed", "posted", "written"], rows
    assert [row[1] for row in rows] == ["store_agent", "store_agent", "erp", "erp", "files"]
    assert {row[4] for row in rows[:4]} == {answer["REF"]}  # one message id from the till to the posting
    with sqlite3.connect(estate.legacy_db) as db:
        [(doc_no,)] = db.execute("SELECT DOC_NO FROM SLS_HDR WHERE POS_TXN_ID = 'S001-TRACE-0001'").fetchall()
    assert f"doc_no {doc_no}" in rows[3][5]
    # the points file's name and the line that carries this sale
    file_name, line = re.match(r"(POINTS_\S+\.dat) line (\d+), folder (.+)$", rows[4][5]).group(1, 2)
    points = estate.root / "drops" / "loyalty_points" / file_name
    assert "S001-TRACE-0001" in points.read_text().splitlines()[int(line) - 1]

    by_ref = estate.trace(answer["REF"], "--json")  # the message id finds the same path
    assert by_ref.returncode == 0, by_ref.stderr
    assert [json.loads(line)["hop"] for line in by_ref.stdout.splitlines()] == [row[2] for row in rows]

    unknown = estate.trace("S001-NEVER-SOLD")
    assert unknown.returncode == 1 and "nothing is known about 'S001-NEVER-SOLD'" in unknown.stderr


@pytest.mark.timeout(300)
def test_a_customer_row_is_traced_from_the_crm_export_file_through_the_hub_to_the_erp_customer_table(estate):
    folder = estate.root / "drops" / "customers"
    export = folder / "customers_20261127_trace.csv"
    write_customer_export(export, customer_rows(600, start=700_001))  # two chunks: 500 + 100
    customer = "C00700550"  # in the second chunk

    def cust_mst() -> list:
        with sqlite3.connect(estate.legacy_db) as db:
            return db.execute("SELECT NAME FROM CUST_MST WHERE CUST_NO = ?", (customer,)).fetchall()
    assert wait_for(cust_mst, timeout=90), estate.log("erp")

    rows = estate.trace_until(customer, "applied")
    hops = {(row[1], row[2], row[4]): row[5] for row in rows}
    chunk, mastered = rows[0][4], rows[-1][4]  # the file's chunk; the hub's customer.mastered.v1
    assert [(row[1], row[2]) for row in rows[:1] + rows[-2:]] == [
        ("files", "read"), ("erp", "consumed"), ("erp", "applied")], rows
    assert set(hops) == {("files", "read", chunk), ("customers", "consumed", chunk),
                         ("customers", "mastered", chunk), ("erp", "consumed", chunk),  # the erp acks it: not its
                         ("erp", "consumed", mastered), ("erp", "applied", mastered)}, rows
    archived = next((folder / "archive").rglob(export.name))
    line = next(n for n, text in enumerate(archived.read_text().splitlines(), start=1) if customer in text)
    assert line == 551
    assert hops[("files", "read", chunk)].startswith(f"{export.name} line {line}, chunk 1, rows 502-601")
    assert hops[("customers", "mastered", chunk)].startswith(f"{export.name} line {line}, writes ")
    assert hops[("erp", "applied", mastered)].startswith(f"key erp:{customer}, system erp, table CUST_MST")
    assert queue_state(estate.uri, f"{FILE_ROWS_QUEUE}.dlq")[0] == 0


class Emitter:
    """Any service that notes hops: its Journal sends them."""
    name = "emitter"
    hops = JournalHops()


def emitter(uri: str, root: Path) -> ServiceContainer:
    container = ServiceContainer(Emitter, {"AMQP_URI": uri, "RETAILBUS": {
        "root": str(root), "publisher": {"connect_timeout": 1}, "journal": {"flush_seconds": 0.05}}})
    container.start()
    return container


@pytest.mark.timeout(120)
def test_hops_wait_while_the_bus_is_away_and_reach_the_journal_when_it_is_back(estate, tmp_path, monkeypatch):
    journal.BUFFER.hops.clear()
    failed_rounds = []
    flush = journal.Journal.flush

    def counted_flush(self, timeout=None):
        sent = flush(self, timeout)
        if not sent:
            failed_rounds.append(timeout)
        return sent
    monkeypatch.setattr(journal.Journal, "flush", counted_flush)
    away = emitter(f"amqp://nobody:secret@127.0.0.1:{free_ports(1)[0]}/", tmp_path)
    try:
        for n in range(3):
            journal.record("probe", id=f"PROBE-{n}", subject="PROBE-SUBJECT", detail={"n": n})
        assert wait_for(lambda: len(failed_rounds) >= 3, timeout=60)  # flush rounds, all failing
        assert [hop["id"] for hop in journal.BUFFER.hops] == ["PROBE-0", "PROBE-1", "PROBE-2"]  # nothing lost
    finally:
        away.stop()
    back = emitter(estate.uri, tmp_path)
    try:
        rows = wait_for(lambda: (lambda rows: rows if len(rows) == 3 else None)(
            estate.trace_until("PROBE-SUBJECT", "probe")), timeout=30)
        assert not journal.BUFFER.hops
    finally:
        back.stop()
    assert [(row[1], row[2], row[4]) for row in rows] == [("emitter", "probe", f"PROBE-{n}") for n in range(3)]
