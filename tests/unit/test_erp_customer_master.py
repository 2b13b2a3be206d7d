"""CUST_MST and the customer hub on a real SQLite legacy database, no broker: the hub's writes
are recognised by change capture as the bus's own, a legacy program's edit is not, and an edit
the bus is about to overwrite is reported first."""
from __future__ import annotations

from datetime import datetime, timezone

import pytest
from sqlalchemy import MetaData, select

from contracts.customer import CustomerValues
from contracts.mastering import CustomerWrite
from demo.legacy_erp.schema import create_schema, engine_for
from services.erp import customer_master

pytestmark = pytest.mark.unit


@pytest.fixture
def legacy(tmp_path):
    engine = engine_for(f"sqlite:///{tmp_path / 'legacy_erp.db'}")
    create_schema(engine)
    customer_master.metadata.create_all(engine)
    md = MetaData()
    md.reflect(engine, only=("CUST_MST",))
    yield engine, md.tables["CUST_MST"]
    engine.dispose()


def write(record_id: str, create: bool = False, **values) -> CustomerWrite:
    return CustomerWrite(system="erp", record_id=record_id, golden_id="G00000000001", origin="crm", create=create,
                         write_golden_id=create, values=CustomerValues(**values))


def rows(engine, cust) -> list[dict]:
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(select(cust)).mappings()]


def test_the_hubs_writes_are_its_own_and_a_legacy_edit_is_not(legacy):
    engine, cust = legacy
    with engine.begin() as conn:
        assert customer_master.apply_writes(conn, cust, [
            write("C1", create=True, name="Ada", email="ada@x.org", consent_sms=False, tax_id=None)]) == (1, [])
    [row] = rows(engine, cust)
    assert (row["NAME"], row["EMAIL"], row["MKT_SMS"], row["MASTER_ID"]) == ("Ada", "ada@x.org", "N", "G00000000001")
    with engine.connect() as conn:
        assert customer_master.not_ours(conn, [row]) == []  # change capture will not report it
    with engine.begin() as conn:  # the same values again: nothing written, nothing to capture
        assert customer_master.apply_writes(conn, cust, [write("C1", name="Ada")]) == (0, [])

    with engine.begin() as conn:  # a legacy program sets a tax id
        conn.execute(cust.update().where(cust.c.CUST_NO == "C1").values(
            TAX_ID="DE1", UPD_TS=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")))
    [edited] = rows(engine, cust)
    with engine.connect() as conn:
        assert customer_master.not_ours(conn, [edited]) == [edited]
    change = customer_master.customer_updated(edited).payload()
    assert (change.origin, change.record_id, change.values.given()["tax_id"]) == ("erp", "C1", "DE1")

    with engine.begin() as conn:  # the hub writes a name before capture saw the edit: the edit is reported
        written, overwritten = customer_master.apply_writes(conn, cust, [write("C1", name="Ada Lovelace")])
    assert written == 1 and overwritten == [edited]
    [row] = rows(engine, cust)
    assert (row["NAME"], row["TAX_ID"]) == ("Ada Lovelace", "DE1")  # only the written column changed
    with engine.connect() as conn:
        assert customer_master.not_ours(conn, [row]) == []
