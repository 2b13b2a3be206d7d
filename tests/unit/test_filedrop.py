"""Layouts, config errors and the CUST_MST mapping (real SQLite file, no broker)."""
from __future__ import annotations

import io
from datetime import datetime, timezone

import pytest
from sqlalchemy import MetaData, text

from contracts.batch import BatchItem, EventBatchV1
from contracts.customer import CustomerUpdatedV1
from contracts.envelope import CloudEvent
from demo.legacy_erp.schema import create_schema, engine_for
from legacy_wrappers.filedrop import config as fd_config
from legacy_wrappers.filedrop.layout import Layout
from services.bus.inbox import metadata as inbox_tables
from services.bus.consumer import DUPLICATE
from services.erp.customers import on_file_rows, upsert_customer

pytestmark = pytest.mark.unit


def drops():
    return fd_config.load(fd_config.DEFAULT_PATH)


def test_config_errors_name_the_field_path(tmp_path):
    bad = tmp_path / "config" / "filedrops.yaml"
    bad.parent.mkdir()
    bad.write_text("inbound:\n  x:\n    folder: a\n    format: fixed\n    completion: {rule: marker}\n"
                   "    fields: [{name: a, start: 5, end: 2}]\n")
    with pytest.raises(fd_config.FileDropConfigError, match=r"inbound\.x\.fields\.0"):
        fd_config.load(bad)


def test_fixed_width_scan_checks_types_widths_and_trailer():
    layout = Layout(drops().inbound["stock"])
    good = f"{'S001':<8}{'100001':<20}{5:09d}2026-11-27T06:00:00+00:00"
    data = "\n".join(["HDR", good, good[:-1], good.replace("000000005", "00000000X"),
                      "TRL000000003000000000000005"]) + "\n"
    rows, bad = [], []
    out = Layout.scan(layout, io.BytesIO(data.encode()), lambda n, v: rows.append((n, v)),
                      lambda n, p: bad.append((n, [c for c, _, _ in p])))
    assert [n for n, _ in rows] == [2] and rows[0][1]["on_hand"] == 5
    assert bad == [(3, ["<record>"]), (4, ["on_hand"])]
    assert out.problems == [] and len(out.sha256) == 64


def test_wrong_trailer_count_is_a_file_problem():
    layout = Layout(drops().inbound["stock"])
    good = f"{'S001':<8}{'100001':<20}{5:09d}2026-11-27T06:00:00+00:00"
    out = layout.scan(io.BytesIO(f"HDR\n{good}\nTRL000000002000000000000005\n".encode()),
                      lambda *a: None, lambda *a: None)
    assert out.problems == ["trailer count '000000002' does not match 1 data rows"]


def customer(cid: str, name: str, hour: int) -> CustomerUpdatedV1:
    return CustomerUpdatedV1(customer_id=cid, name=name, email=None,
                             updated_at=datetime(2026, 11, 27, hour, tzinfo=timezone.utc))


@pytest.fixture
def engine(tmp_path):
    e = engine_for(f"sqlite:///{tmp_path / 'legacy.db'}")
    create_schema(e)
    inbox_tables.create_all(e)
    yield e
    e.dispose()


def cust_mst(engine):
    md = MetaData()
    md.reflect(engine, only=("CUST_MST",))
    return md.tables["CUST_MST"]


def test_newest_updated_at_wins(engine):
    table = cust_mst(engine)
    with engine.begin() as conn:
        assert upsert_customer(conn, table, customer("C1", "new", 10))
        assert not upsert_customer(conn, table, customer("C1", "old", 9))
        assert not upsert_customer(conn, table, customer("C1", "new", 10))
    with engine.connect() as conn:
        assert conn.execute(text("SELECT NAME, UPD_TS FROM CUST_MST WHERE CUST_NO='C1'")).one() == (
            "new", "2026-11-27T10:00:00.000000")


def test_a_redelivered_chunk_applies_no_row_twice(engine):
    items = [BatchItem(row=n, idempotencykey=f"{'a' * 64}:{n}",
                       data=customer(f"C{n}", f"n{n}", 8).model_dump(mode="json")) for n in (2, 3)]
    batch = EventBatchV1(item_type="customer.updated.v1", file="f.csv", sha256="a" * 64, items=items)
    event = CloudEvent.new("event.batch.v1", "legacy/filedrop/customers", batch, idempotencykey="x")
    table = cust_mst(engine)
    with engine.begin() as conn:
        assert on_file_rows(conn, table, batch, event) == 2
    with engine.begin() as conn:  # redelivered: every row key was claimed
        assert on_file_rows(conn, table, batch, event) is DUPLICATE
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM RB_INBOX")).scalar() == 2
        assert conn.execute(text("SELECT count(*) FROM CUST_MST WHERE CUST_NO IN ('C2','C3')")).scalar() == 2
