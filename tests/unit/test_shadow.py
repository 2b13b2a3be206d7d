"""Shadow comparison on a real SQLite legacy database: the bus path's dry run
matches what the legacy ERP posted, writes nothing, and names a changed field."""
from __future__ import annotations

import pytest
from sqlalchemy import MetaData, func, select

from demo.legacy_erp import postings
from demo.legacy_erp.schema import create_schema, engine_for, seed_demo_data
from routing.legacy_payload import return_from_legacy, sale_from_legacy
from services.erp import ledger, shadow
from tests.integration.support import legacy_sale

pytestmark = pytest.mark.unit


@pytest.fixture
def db(tmp_path):
    engine = engine_for(f"sqlite:///{tmp_path / 'erp.db'}")
    create_schema(engine)
    with engine.begin() as conn:
        seed_demo_data(conn)
    md = MetaData()
    md.reflect(engine, only=ledger.LEGACY_TABLES)
    yield engine, ledger.LegacyTables.of(md.tables)
    engine.dispose()


def legacy_post(engine, payload, kind="S"):
    with engine.begin() as conn:
        post = postings.post_sale if kind == "S" else postings.post_return
        return post(conn, payload).doc_no


def compare(engine, t, txn, doc_no):
    """The comparison in a transaction that is then COMMITTED: the dry run must
    leave nothing behind even when its caller commits."""
    with engine.begin() as conn:
        return shadow.compare(conn, t, txn, doc_no)


def counts(engine, t):
    with engine.connect() as conn:
        return [conn.execute(select(func.count()).select_from(x)).scalar()
                for x in (t.header, t.lines, t.gl, t.doc_seq)] + [
            conn.execute(select(t.doc_seq.c.NEXT_NO).where(t.doc_seq.c.SEQ_NAME == "SLS")).scalar()]


def test_dry_run_matches_the_legacy_posting_and_writes_nothing(db):
    engine, t = db
    payload = legacy_sale("SH-1", qty=3, price=250)
    payload["TENDERS"] = [{"TYPE": "CARD", "AMOUNT": 500}, {"TYPE": "CASH", "AMOUNT": 250}]
    doc_no = legacy_post(engine, payload)
    before = counts(engine, t)
    assert compare(engine, t, sale_from_legacy(payload), doc_no) == []
    assert counts(engine, t) == before


def test_returns_compare_too(db):
    engine, t = db
    legacy_post(engine, legacy_sale("SH-2"))
    ret = {**legacy_sale("SH-2R"), "ORIG_STORE": "S001", "ORIG_TXN_ID": "SH-2", "REASON": "damaged"}
    doc_no = legacy_post(engine, ret, "R")
    assert compare(engine, t, return_from_legacy(ret), doc_no) == []


def test_a_changed_mapping_is_reported_with_the_field(db, monkeypatch):
    engine, t = db
    payload = legacy_sale("SH-3")
    doc_no = legacy_post(engine, payload)
    monkeypatch.setitem(ledger.TENDER_ACCOUNTS, "cash", "1001")  # a deliberately wrong mapping
    diffs = compare(engine, t, sale_from_legacy(payload), doc_no)
    assert diffs == [{"field": "gl[1].ACCOUNT", "bus": "1001", "legacy": "1000"}]


def test_a_missing_legacy_document_is_a_mismatch(db):
    engine, t = db
    diffs = compare(engine, t, sale_from_legacy(legacy_sale("SH-4")), "S99999999")
    assert diffs == [{"field": "header.count", "bus": 1, "legacy": 0}]
