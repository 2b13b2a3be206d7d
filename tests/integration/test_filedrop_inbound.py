"""Inbound file drops against a real broker and real folders (files service in-process)."""
from __future__ import annotations

import csv
import hashlib
import os
import sqlite3
import threading
import time
from contextlib import closing

import pytest

from demo.batch.jobs import customer_rows, stock_line, write_customer_export, write_stock_snapshot
from legacy_wrappers.filedrop.ledger import Ledger
from services.files.service import FilesService
from tests.integration.filedrop_support import Tap, service_config, write_drops
from tests.integration.support import wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
def files(container_factory, amqp_uri, tmp_path, request):
    overrides = getattr(request, "param", {})
    cfg = write_drops(tmp_path, **overrides)
    tap = Tap(amqp_uri, f"tap-{request.node.name[:40]}")
    container = container_factory(FilesService, service_config(amqp_uri, tmp_path))
    container.start()
    ledger = Ledger(tmp_path / "var" / "filedrops.db")
    yield tmp_path, cfg, tap, ledger
    container.stop()
    ledger.close()
    tap.close()


def archived(folder):
    return [p.name for p in (folder / "archive").rglob("*") if p.is_file()]


def rejects(folder, name):
    with open(folder / "error" / f"{name}.rejects.csv", newline="") as f:
        return list(csv.reader(f))[1:]


@pytest.mark.timeout(240)
def test_slow_writer_is_not_read_before_its_marker(files):
    root, _, tap, ledger = files
    folder = root / "drops" / "customers"
    path = folder / "customers_slow.csv"
    writer = threading.Thread(target=write_customer_export, args=(path, customer_rows(30)),
                              kwargs={"marker": False, "delay": 0.1})
    writer.start()
    while writer.is_alive():  # over 3 s: nothing read, nothing recorded
        assert tap.drain() == [] and ledger.counts_since("customers", "") == {}
        time.sleep(0.2)
    writer.join()
    # a complete file dropped after it: once that one is archived, the folder was scanned
    # with the slow file complete, and the slow file, without its marker, was still left alone
    sentinel = folder / "customers_sentinel.csv"
    write_customer_export(sentinel, customer_rows(1), marker=False)
    sentinel_keys = [f"{hashlib.sha256(sentinel.read_bytes()).hexdigest()}:2"]
    (folder / "customers_sentinel.csv.done").touch()
    assert wait_for(lambda: "customers_sentinel.csv" in archived(folder), timeout=60)
    assert tap.drain() == sentinel_keys and path.exists()
    (folder / "customers_slow.csv.done").touch()
    assert wait_for(lambda: sorted(archived(folder)) == ["customers_sentinel.csv", "customers_slow.csv"],
                    timeout=60)
    keys = tap.drain()[1:]  # archived after its chunks were confirmed: all of them are in the tap
    assert len(keys) == 30 and len(set(keys)) == 30
    assert sorted(int(k.split(":")[1]) for k in keys) == list(range(2, 32))


@pytest.mark.timeout(60)
def test_bad_rows_are_reported_and_skipped(files):
    root, _, tap, _ = files
    folder = root / "drops" / "customers"
    rows = list(customer_rows(5))
    rows[1][5] = "yesterday"          # row 3: wrong type
    rows[3][1] = ""                   # row 5: missing name
    rows[4] = rows[4][:4]             # row 6: missing columns
    write_customer_export(folder / "customers_bad.csv", rows)
    assert wait_for(lambda: (folder / "error" / "customers_bad.csv.rejects.csv").exists())
    assert [(r[0], r[1]) for r in rejects(folder, "customers_bad.csv")] == [
        ("3", "updated_at"), ("5", "name"), ("6", "<record>")]
    assert wait_for(lambda: len(tap.drain()) == 2, timeout=20)  # skip_rows: the good rows flow
    assert sorted(int(k.split(":")[1]) for k in tap.keys) == [2, 4]


@pytest.mark.timeout(60)
def test_a_quoted_value_spanning_lines_is_counted_exactly_for_the_trailer(files):
    """Such a file leaves pass 1's count on blocks of bytes for the exact reader (count.py)."""
    root, _, tap, ledger = files
    folder = root / "drops" / "customers"
    rows = list(customer_rows(5))
    rows[2][1] = 'Two "line"\r\nname'  # quoted by the writer, across two lines
    write_customer_export(folder / "customers_quoted.csv", rows)  # trailer count 5
    assert wait_for(lambda: archived(folder) == ["customers_quoted.csv"], timeout=20)
    assert wait_for(lambda: len(tap.drain()) == 5, timeout=20)
    assert len(set(tap.keys)) == 5 and list((folder / "error").iterdir()) == []
    assert ledger.counts_since("customers", "") == {"done": 1}


@pytest.mark.timeout(60)
def test_reject_file_publishes_nothing(files):
    root, _, tap, ledger = files
    folder = root / "drops" / "stock"
    lines = [stock_line("S001", "100001", 5), stock_line("S001", "100002", 7)[:-3],
             stock_line("S001", "100003", 1).replace("000000001", "00000000X")]
    write_stock_snapshot(folder / "stock_bad.dat", lines, total=6)
    assert wait_for(lambda: (folder / "error" / "stock_bad.dat").exists())
    assert [(r[0], r[1]) for r in rejects(folder, "stock_bad.dat")][:2] == [
        ("3", "<record>"), ("4", "on_hand")]
    assert wait_for(lambda: ledger.counts_since("stock", "") == {"rejected": 1})  # its outcome is final
    assert tap.drain() == []


@pytest.mark.timeout(60)
@pytest.mark.parametrize("count,total,reason", [(3, None, "trailer count"), (None, 99, "control total")])
def test_wrong_trailer_rejects_the_whole_file(files, count, total, reason):
    root, _, tap, ledger = files
    folder = root / "drops" / "stock"
    lines = [stock_line("S001", f"10000{i}", i) for i in range(1, 3)]
    write_stock_snapshot(folder / "stock_trl.dat", lines, count=count, total=total)
    assert wait_for(lambda: (folder / "error" / "stock_trl.dat").exists())
    report = rejects(folder, "stock_trl.dat")
    assert report[-1][1] == "<file>" and reason in report[-1][3]
    assert wait_for(lambda: ledger.counts_since("stock", "") == {"rejected": 1})  # its outcome is final
    assert tap.drain() == []


@pytest.mark.timeout(60)
def test_same_content_under_a_new_name_publishes_nothing(files):
    root, _, tap, ledger = files
    folder = root / "drops" / "stock"
    lines = [stock_line("S001", f"10000{i}", i) for i in range(1, 4)]
    write_stock_snapshot(folder / "stock_a.dat", lines)
    assert wait_for(lambda: len(tap.drain()) == 3)
    write_stock_snapshot(folder / "stock_b.dat", lines)
    assert wait_for(lambda: "stock_b.dat" in archived(folder))  # archived only after any publish
    assert len(tap.drain()) == 3
    assert ledger.counts_since("stock", "") == {"done": 1}


@pytest.mark.timeout(60)
def test_symlink_to_etc_passwd_is_refused(files):
    root, _, tap, ledger = files
    folder = root / "drops" / "stock"
    os.symlink("/etc/passwd", folder / "stock_evil.dat")
    lines = [stock_line("S001", "100001", 4)]
    write_stock_snapshot(folder / "stock_ok.dat", lines)  # a good file after it still flows
    assert wait_for(lambda: "stock_ok.dat" in archived(folder))
    with closing(sqlite3.connect(root / "var" / "filedrops.db")) as conn:
        seen = conn.execute("SELECT NAME, OUTCOME FROM FD_SEEN").fetchall()
        taken = [name for (name,) in conn.execute("SELECT NAME FROM FD_FILE")]
    assert seen == [("stock_evil.dat", "refused")] and taken == ["stock_ok.dat"]
    assert (folder / "stock_evil.dat").is_symlink() and len(tap.drain()) == 1


@pytest.mark.timeout(60)
def test_undecodable_file_is_rejected_with_a_clear_reason(files):
    root, _, tap, _ = files
    folder = root / "drops" / "stock"
    (folder / "stock_bin.dat").write_bytes(b"HDR\n\xff\xfe\x00garbage\n")
    assert wait_for(lambda: (folder / "error" / "stock_bin.dat").exists())
    assert "unreadable content" in rejects(folder, "stock_bin.dat")[-1][3]
    assert tap.drain() == []
