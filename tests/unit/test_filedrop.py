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


@pytest.mark.parametrize("drop, records", [
    ("customers", [["C1", "Ann", "a@b.c", "", "", "2026-11-27T06:00:00+00:00"],
                   ["", "Ann", "", "", "", "2026-11-27T06:00:00+00:00"],            # missing id
                   ["C1", "Ann", "", "", "", "2026-11-27T06:00:00"],                # no offset
                   ["C1", "Ann", "", "", "", "yesterday"],                          # not a timestamp
                   ["C1234567890123", "Ann", "", "", "", "2026-11-27T06:00:00+00:00"],  # too long
                   ["C1", "Ann", "", "", "2026-11-27T06:00:00+00:00"]]),           # a column short
    ("stock", [f"{'S001':<8}{'100001':<20}{5:09d}2026-11-27T06:00:00+00:00",
               f"{'S001':<8}{'100001':<20}{'5X':>9}2026-11-27T06:00:00+00:00",  # not an integer
               f"{'':<8}{'100001':<20}{5:09d}2026-11-27T06:00:00+00:00",        # missing store
               f"{'S001':<8}{'100001':<20}{5:09d}2026-11-27T06:00:00+00:0"]),   # a character short
])
def test_generated_converter_agrees_with_the_reference_row(drop, records):
    layout = Layout(drops().inbound[drop])
    for rec in records:
        values, problems = layout.row(rec)
        assert layout.convert(rec) == values, rec
        assert (values is None) == bool(problems)
    assert layout.convert(records[0]) is not None and all(layout.convert(r) is None for r in records[1:])


def test_row_values_are_checked_against_the_contract_naming_the_rows():
    from contracts.batch import check_rows, value_check
    from contracts.errors import ContractError
    good = {"customer_id": "C1", "name": "Ann", "email": None, "phone": None, "loyalty_card": None,
            "updated_at": "2026-11-27T06:00:00+00:00"}
    ok = value_check(CustomerUpdatedV1)
    assert ok(good) and not ok({**good, "email": "not-an-email"}) and not ok({**good, "name": None})
    check_rows(CustomerUpdatedV1, [good, good], [2, 3], "f.csv")
    with pytest.raises(ContractError, match=r"f.csv: rows \[4\].*email"):
        check_rows(CustomerUpdatedV1, [good, good, {**good, "email": "x@y"}], [2, 3, 4], "f.csv")
    with pytest.raises(ContractError, match=r"rows \[2, 3\].*extra"):  # the shape, from the first row
        check_rows(CustomerUpdatedV1, [{**good, "extra": 1}] * 2, [2, 3], "f.csv")


def test_a_cheap_first_look_counts_records_for_the_trailer_without_validating():
    layout = Layout(drops().inbound["customers"])
    assert not layout.needs_validation_first  # skip_rows, trailer count only
    assert Layout(drops().inbound["stock"]).needs_validation_first  # reject_file, control total
    data = ("customer_id,name,email,phone,loyalty_card,updated_at\n"
            "C1,Ann,,,,2026-11-27T06:00:00+00:00\nC2,,,,,bad\nTRL,2,,,,\n")
    first = layout.scan(io.BytesIO(data.encode()), validate=False)
    assert (first.records, first.rows, first.bad_rows, first.problems) == (2, 0, 0, [])
    rows, bad = [], []
    full = layout.scan(io.BytesIO(data.encode()), lambda n, v: rows.append(n), lambda n, p: bad.append(n))
    assert (full.sha256, rows, bad) == (first.sha256, [2], [3])
    wrong = layout.scan(io.BytesIO(data.replace("TRL,2", "TRL,3").encode()), validate=False)
    assert wrong.problems == ["trailer count '3' does not match 2 data rows"]
