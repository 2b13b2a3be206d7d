"""file_drop resuming and re-reading, on real files and the real SQLite ledger in a real
nameko container (no broker: the service method records what it is handed).

A file whose pass stopped part-way is resumed after the last row confirmed, whatever
the chunk size or the layout are by then; and pass 2 hands on only the bytes pass 1
hashed, so a file replaced or rewritten meanwhile never sends its rows under the first
content's sha256 keys."""
from __future__ import annotations

import csv
import os
import sqlite3
import time
from pathlib import Path

import orjson
import pytest
import yaml
from nameko.containers import ServiceContainer

from demo.batch.jobs import customer_rows, write_customer_export
from legacy_wrappers.filedrop.inbound import file_drop
from legacy_wrappers.filedrop.ledger import Ledger
from tests.integration.filedrop_support import SHIPPED, write_drops

pytestmark = pytest.mark.unit

received: list[tuple[str, int, str]] = []  # (sha256, row, name) of every row handed to the method
hooks: dict = {}


class Drops:
    name = "drops_test"

    @file_drop("customers")
    def on_rows(self, chunk):
        hooks["calls"] += 1
        if hooks["fail_from"] is not None and hooks["calls"] >= hooks["fail_from"]:
            raise ConnectionError("the broker is down")
        if hooks["on_first"]:
            hooks["on_first"].pop()()
        for item in chunk.take_rows().items:
            doc = orjson.loads(item)
            received.append((doc["idempotencykey"].split(":")[0], doc["row"], doc["data"]["name"]))


def wait_for(predicate, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@pytest.fixture
def drops(tmp_path):
    received.clear()
    hooks.update(calls=0, fail_from=None, on_first=[])
    started = []

    def run(**customers) -> ServiceContainer:
        write_drops(tmp_path, customers={"poll_seconds": 0.05, "max_attempts": 10, **customers})
        container = ServiceContainer(Drops, {"RETAILBUS": {"root": str(tmp_path)}})
        container.start()
        started.append(container)
        return container

    yield tmp_path / "drops" / "customers", run
    for container in started:
        if container.started:
            container.stop()


def archived(folder: Path) -> list[str]:
    return [p.name for p in (folder / "archive").rglob("*") if p.is_file()]


def customers(n: int, long_names: int = 0) -> list[list[str]]:
    """`n` customer rows (file rows 2..n+1); the first `long_names` have names of 14 characters."""
    rows = [list(r) for r in customer_rows(n)]
    for i, row in enumerate(rows, start=1):
        row[1] = f"Long name {i:04d}" if i <= long_names else f"N{i:04d}"
    return rows


def shipped_fields(**name) -> list[dict]:
    fields = yaml.safe_load(SHIPPED.read_text())["inbound"]["customers"]["fields"]
    return [{**f, **name} if f["name"] == "name" else f for f in fields]


@pytest.mark.parametrize("resumed_with", [
    {"chunk_rows": 25},  # bigger chunks: 5 chunks of 25 are rows the first run never sent
    {"chunk_rows": 10, "fields": shipped_fields(max_length=10)},  # rows 2-41 turn bad: chunks shift
], ids=["chunk_rows", "layout"])
def test_a_resumed_file_skips_nothing_when_the_chunks_or_the_layout_changed(drops, resumed_with):
    folder, run = drops
    folder.mkdir(parents=True)
    write_customer_export(folder / "customers_a.csv", customers(100, long_names=40))
    hooks["fail_from"] = 6  # chunks 1-5 go (file rows 2-51, checkpointed), the 6th fails
    first = run(chunk_rows=10, inflight_chunks=1)
    wait_for(lambda: hooks["calls"] >= 6)
    first.stop()  # as a crash would leave it: the file in progress, the ledger at the checkpoint
    assert sorted(r for _, r, _ in received) == list(range(2, 52))

    hooks["fail_from"] = None
    run(inflight_chunks=1, **resumed_with)
    wait_for(lambda: archived(folder) == ["customers_a.csv"])
    assert sorted({r for _, r, _ in received}) == list(range(2, 102))  # every row, none skipped


def test_pass_2_reads_the_file_pass_1_hashed_though_the_name_was_replaced_in_between(drops, monkeypatch):
    folder, run = drops
    folder.mkdir(parents=True)
    path = folder / "customers_a.csv"
    write_customer_export(path, customers(30))
    original = {r + 2: row[1] for r, row in enumerate(customers(30))}
    replacement = customers(30)
    for row in replacement:
        row[1] = "Replaced " + row[1]
    begin = Ledger.begin

    def replace_then_begin(self, *args, **kwargs):  # between the passes: the legacy job puts a new file there
        if not (folder / ".new").exists():
            write_customer_export(folder / ".new", replacement, marker=False)
            os.replace(folder / ".new", path)
        return begin(self, *args, **kwargs)

    monkeypatch.setattr(Ledger, "begin", replace_then_begin)
    run(chunk_rows=10)
    wait_for(lambda: len({s for s, _, _ in received}) == 2 and len(received) == 60)
    first_sha = received[0][0]
    assert {(r, name) for s, r, name in received if s == first_sha} == set(original.items())
    assert {(r, name) for s, r, name in received if s != first_sha} == {
        (r, "Replaced " + name) for r, name in original.items()}  # the new file, under its own sha256
    wait_for(lambda: archived(folder) == ["customers_a.csv"])


def test_a_file_rewritten_during_pass_2_sends_no_new_bytes_under_the_old_keys(drops):
    folder, run = drops
    folder.mkdir(parents=True)
    path = folder / "customers_big.csv"
    rows = customers(40_000)  # about 2.3 MiB: the rewrite lands in a segment pass 2 has not read
    write_customer_export(path, rows)
    original = {r + 2: row[1] for r, row in enumerate(rows)}
    target = 38_000 + 1  # the file row (line) of customer 38000
    with open(path, "rb") as f:
        start = sum(len(line) for _, line in zip(range(target - 1), f))  # where that line starts

    def rewrite_in_place():  # the same inode, a later row changed: no rename to notice
        with open(path, "r+b") as f:
            f.seek(start + len(rows[target - 2][0]) + 1)  # the first letter of the name
            f.write(b"M")
            f.flush()
            os.fsync(f.fileno())

    hooks["on_first"] = [rewrite_in_place]
    run(chunk_rows=500)
    wait_for(lambda: len({s for s, _, _ in received}) == 2 and archived(folder), timeout=120)
    first_sha = received[0][0]
    assert all(original[r] == name for s, r, name in received if s == first_sha)  # no new byte, old key
    new = {r: name for s, r, name in received if s != first_sha}  # the new content, whole, under its key
    assert new == {**original, target: "M" + original[target][1:]}


def test_an_older_ledger_gains_the_row_checkpoint_and_resumes_from_the_first_row(tmp_path):
    path = tmp_path / "filedrops.db"
    conn = sqlite3.connect(path)
    conn.execute('CREATE TABLE "FD_FILE" ("DROP_NAME" VARCHAR(60) NOT NULL, "SHA256" VARCHAR(64) NOT NULL, '
                 '"NAME" VARCHAR(255) NOT NULL, "STATE" VARCHAR(12) NOT NULL, "ROWS" INTEGER NOT NULL, '
                 '"BAD_ROWS" INTEGER NOT NULL, "CHUNKS_DONE" INTEGER NOT NULL, "ATTEMPTS" INTEGER NOT NULL, '
                 '"REASON" VARCHAR(2000), "UPDATED_TS" VARCHAR(32) NOT NULL, PRIMARY KEY ("DROP_NAME", "SHA256"))')
    conn.execute("INSERT INTO FD_FILE VALUES ('customers', 'a', 'c.csv', 'in_progress', 100, 0, 7, 1, NULL, '')")
    conn.commit()
    conn.close()
    ledger = Ledger(path)
    try:
        record = ledger.begin("customers", "a", "c.csv", 100, 0)
        assert (record["ROWS_DONE"], record["ATTEMPTS"]) == (0, 2)  # 7 chunks of an unknown size: row 1
        ledger.checkpoint("customers", "a", 51)
        assert ledger.file("customers", "a")["ROWS_DONE"] == 51
    finally:
        ledger.close()


def test_the_reject_report_of_a_resumed_file_still_names_every_bad_row(drops):
    folder, run = drops
    folder.mkdir(parents=True)
    rows = customers(60)
    rows[4][5] = "yesterday"  # file row 6: not a timestamp
    rows[44][5] = "tomorrow"  # file row 46
    write_customer_export(folder / "customers_b.csv", rows)
    hooks["fail_from"] = 4
    first = run(chunk_rows=10, inflight_chunks=1)
    wait_for(lambda: hooks["calls"] >= 4)
    first.stop()
    hooks["fail_from"] = None
    run(chunk_rows=25, inflight_chunks=1)
    wait_for(lambda: archived(folder) == ["customers_b.csv"])
    assert sorted({r for _, r, _ in received}) == [r for r in range(2, 62) if r not in (6, 46)]
    with open(folder / "error" / "customers_b.csv.rejects.csv", newline="") as f:
        assert [row[0] for row in list(csv.reader(f))[1:]] == ["6", "46"]
