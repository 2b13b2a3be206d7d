"""Crashes: the inbound wrapper SIGKILLed mid-file, the outbound writer dying
between write and rename. Real processes, real broker, real folders."""
from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
from contextlib import closing
from datetime import date, datetime, timezone

import pytest
from sqlalchemy import text

from contracts.envelope import CloudEvent
from contracts.erp import ErpReturnPostedV1, ErpSalePostedV1
from demo.batch.jobs import customer_rows, read_points_files, write_customer_export
from demo.legacy_erp.schema import create_schema, engine_for
from legacy_wrappers.filedrop.ledger import Ledger
from bus import topology
from bus.extensions import event_message
from bus.publisher import ConfirmingPublisher
from bus.consumer import reliable_handler
from legacy_wrappers.legacy_db import LegacyDatabase
from legacy_wrappers import inbox
from tests.integration.filedrop_support import Tap, write_drops
from tests.integration.support import nameko_run, stop, wait_for, write_config

pytestmark = pytest.mark.integration
CONSUMER = "filedrop_sink.on_rows"


class CustomerSink:
    """Downstream: each row's key claimed in an inbox on a real database, in the worker's
    transaction, as the customer hub takes the rows (that service end to end:
    test_filedrop_erp.py)."""

    name = "filedrop_sink"
    db = LegacyDatabase(create=(inbox.metadata,))

    @reliable_handler("files", "event.batch.v1")
    def on_rows(self, batch, event):
        return sum(inbox.claim(self.db.conn, CONSUMER, item.idempotencykey, event.id) for item in batch.items)


@pytest.mark.timeout(300)
def test_sigkill_mid_file_applies_every_row_once(container_factory, amqp_uri, tmp_path):
    dsn = f"sqlite:///{tmp_path / 'legacy_erp.db'}"
    engine = engine_for(dsn)
    create_schema(engine)
    # 1,000 chunks of 100, one confirm at a time: slow enough to be caught mid-file however
    # fast the rows are read (with 200 chunks, 2 in flight, the file was done before the kill)
    write_drops(tmp_path, customers={"inflight_chunks": 1, "chunk_rows": 100})
    config = write_config(tmp_path, amqp_uri, legacy_db=dsn)
    sink = container_factory(CustomerSink, {"AMQP_URI": amqp_uri, "max_workers": 16, "LEGACY_DB_URI": dsn,
                                            "RETAILBUS": {"root": str(tmp_path)}})
    sink.start()
    tap = Tap(amqp_uri, "tap-sigkill")
    folder = tmp_path / "drops" / "customers"
    folder.mkdir(parents=True)
    write_customer_export(folder / "customers_big.csv", customer_rows(100_000))
    ledger = Ledger(tmp_path / "var" / "filedrops.db")

    def rows_done():
        with closing(sqlite3.connect(tmp_path / "var" / "filedrops.db")) as conn:
            return conn.execute("SELECT max(ROWS_DONE) FROM FD_FILE").fetchone()[0] or 0

    first = nameko_run(config, "services.files", tmp_path / "files-1.log")
    try:
        assert wait_for(lambda: rows_done() >= 2_000, timeout=120, interval=0.01)
        first.send_signal(signal.SIGKILL)
        first.wait()
        killed_at = rows_done()
        assert killed_at < 100_000, "the file finished before the kill"
        second = nameko_run(config, "services.files", tmp_path / "files-2.log")
        try:
            assert wait_for(lambda: (folder / "archive").exists()
                            and any((folder / "archive").rglob("customers_big.csv")), timeout=180)
        finally:
            stop(second)

        def applied():
            with engine.connect() as conn:
                return tuple(conn.execute(text(
                    "SELECT count(*), count(DISTINCT IDEM_KEY) FROM RB_INBOX WHERE CONSUMER = :c"), {"c": CONSUMER}
                ).one())
        assert wait_for(lambda: applied() == (100_000, 100_000), timeout=120), applied()
        published = tap.drain()
        # resumed after the checkpoint: far fewer than a second full pass was sent again
        assert 100_000 <= len(published) < 100_000 + 10 * 500
        assert len(set(published)) == 100_000
    finally:
        stop(first)
        ledger.close()
        tap.close()
        engine.dispose()


CRASHING = """
import os, sys
import legacy_wrappers.filedrop.outbound as outbound
real = os.replace
def crash(src, dst):
    if os.path.basename(str(src)).startswith(".POINTS_"):
        os._exit(9)          # dies between writing the temp file and renaming it
    return real(src, dst)
outbound.os.replace = crash
from nameko.cli.main import main
sys.argv = ["nameko", "run", "--config", sys.argv[1], "services.files"]
main()
"""


def posted(i: int) -> CloudEvent:
    cls = ErpReturnPostedV1 if i % 5 == 0 else ErpSalePostedV1
    doc = cls(store_id="S001", pos_txn_id=f"T{i:05d}", doc_no=f"D{i:05d}", business_day=date(2026, 11, 27),
              posted_at=datetime.now(timezone.utc), currency="EUR", total_minor=1000 + i,
              loyalty_card=f"LC{i:010d}", lines=[{"sku": "100001", "quantity": 1, "line_total_minor": 1000 + i}])
    return CloudEvent.new(cls.TYPE, "erp", doc, idempotencykey=f"{cls.TYPE}:{i}")


@pytest.mark.timeout(120)
def test_outbound_crash_before_rename_leaves_no_partial_file(amqp_uri, tmp_path):
    write_drops(tmp_path, loyalty_points={"roll_rows": 40, "roll_seconds": 1})
    config = write_config(tmp_path, amqp_uri)
    out = tmp_path / "drops" / "loyalty_points"
    log = tmp_path / "files.log"
    crashing = subprocess.Popen([sys.executable, "-c", CRASHING, str(config)], cwd=tmp_path,
                                stdout=log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        queue = topology.handler_queue("erp", "batch", "files", "on_posted")
        from tests.integration.test_erp_posting import queue_state
        assert wait_for(lambda: queue_state(amqp_uri, queue)[1] == 1, timeout=60)
        publisher = ConfirmingPublisher(amqp_uri)
        events = [posted(i) for i in range(1, 101)]
        assert publisher.publish_many([event_message(e, "erp.events") for e in events]) == [None] * 100
        publisher.close()
        assert crashing.wait(timeout=30) == 9
        visible = [p.name for p in out.iterdir() if not p.name.startswith(".")]
        assert visible == [] and any(p.name.startswith(".POINTS_") for p in out.iterdir())
        assert read_points_files(out) == []
    finally:
        stop(crashing)
    normal = nameko_run(config, "services.files", log)
    try:
        assert wait_for(lambda: len(read_points_files(out)) == 100, timeout=60)
        assert wait_for(lambda: queue_state(amqp_uri, queue)[0] == 0, timeout=30)
    finally:
        stop(normal)
    records = read_points_files(out)
    txns = sorted(r[29:69].strip() for r in records)
    assert txns == [f"T{i:05d}" for i in range(1, 101)]
    assert sum(r[0] == "R" for r in records) == 20
    assert not any(p.name.startswith(".") for p in out.iterdir())
