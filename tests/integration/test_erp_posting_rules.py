"""The erp's posting rules on both legacy databases (SQLite and a real PostgreSQL): a
document the legacy API booked is a duplicate, a return posted before its sale is
linked when the sale posts, a SKU without a stock row is recorded, not invented."""
from __future__ import annotations

import pytest
import sqlalchemy as sa

from demo.legacy_erp import postings as legacy_postings
from demo.legacy_erp.schema import DEMO_ON_HAND, create_schema, seed_demo_data
from legacy_wrappers import inbox
from legacy_wrappers.batched_writes import write_batch
from legacy_wrappers.legacy_db import engine_for
from services.erp import ledger, outbox, posting, return_links, unknown_sku
from tests.unit.test_erp_service import refund, sale

pytestmark = pytest.mark.integration


@pytest.fixture
def db(legacy_dsn):
    engine = engine_for(legacy_dsn)
    create_schema(engine)
    with engine.begin() as conn:
        seed_demo_data(conn)
    for metadata in (inbox.metadata, outbox.metadata, return_links.metadata, unknown_sku.metadata):
        metadata.create_all(engine)
    md = sa.MetaData()
    md.reflect(engine, only=ledger.LEGACY_TABLES)
    yield engine, ledger.LegacyTables.of(dict(md.tables))
    engine.dispose()


def post(db, *txns):
    engine, t = db
    items = [posting.Posting(t, txn, f"{txn.TYPE}:{txn.store_id}:{txn.pos_txn_id}", f"m-{txn.pos_txn_id}", None)
             for txn in txns]
    return write_batch(engine, posting.post_many, items)


def rows(engine, query) -> list[tuple]:
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(query)]


def test_the_posting_rules_hold_on_each_legacy_database(db):
    engine, t = db
    with engine.begin() as conn:  # booked by the legacy API, then the same sale on the bus
        legacy_postings.post_sale(conn, {
            "STORE": "S001", "TERMINAL": "07", "TXN_ID": "LEG-1", "TXN_DATE": "20261127", "CURRENCY": "EUR",
            "LINES": [{"SKU": "100001", "QTY": 2, "PRICE": 1999, "LINE": 3998}], "TOTAL": 3998,
            "TENDERS": [{"TYPE": "CARD", "AMOUNT": 3998}]})
    ret = refund("R-1", orig="LATE-1")
    [duplicate, early_return] = post(db, sale("LEG-1"), ret)
    assert duplicate[1] is True and early_return[:2] == ("R00000001", False)
    [late_sale] = post(db, sale("LATE-1", sku="NO-SUCH-SKU", qty=3))
    assert late_sale.unknown_skus == ((late_sale.doc_no, "S001", "NO-SUCH-SKU", -3),)
    h, s = t.header.c, t.stock.c
    assert rows(engine, sa.select(h.POS_TXN_ID, h.ORIG_DOC_NO, h.CHANNEL).order_by(h.DOC_NO)) == [
        ("R-1", late_sale.doc_no, "RBUS"), ("LEG-1", None, "POSAPI"), ("LATE-1", None, "RBUS")]
    assert rows(engine, sa.select(s.ON_HAND).where(s.STORE_NO == "S001", s.SKU == "100001")) == \
        [(DEMO_ON_HAND - 2 + 1,)]  # the legacy sale once, the return once
    assert rows(engine, sa.select(s.SKU).where(s.SKU == "NO-SUCH-SKU")) == []
    u = unknown_sku.TABLE.c
    assert rows(engine, sa.select(u.STORE_NO, u.SKU, u.DOC_NO, u.QTY)) == [("S001", "NO-SUCH-SKU",
                                                                          late_sale.doc_no, -3)]
    assert rows(engine, sa.select(return_links.TABLE)) == []
