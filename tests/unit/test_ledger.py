"""services/erp/ledger.py: a contract sale or return becomes exactly the rows the legacy
ERP's own posting program writes (real SQLite file with the legacy ERP's schema)."""
from __future__ import annotations

from datetime import date, datetime, timezone

import pytest
import sqlalchemy as sa

from contracts.pos import PosReturnV1, PosSaleV1
from demo.legacy_erp import postings
from demo.legacy_erp.schema import DEMO_ON_HAND, create_schema, engine_for, seed_demo_data
from routing.legacy_payload import return_from_legacy, sale_from_legacy
from services.erp import ledger, unknown_sku

pytestmark = pytest.mark.unit


def legacy_sale(txn_id="S001-07-000001", **overrides) -> dict:
    """2 x 1999 - 100 + 3 x 500 = 5398, paid 5000 card + 398 cash."""
    payload = {
        "STORE": "S001", "TERMINAL": "07", "TXN_ID": txn_id, "TXN_DATE": "20261127",
        "TXN_TIME": "101500", "CURRENCY": "EUR", "LOYALTY_CARD": "LC0000000001", "CUST_NO": "C00001",
        "LINES": [{"SKU": "100001", "QTY": 2, "PRICE": 1999, "DISC": 100, "LINE": 3898},
                  {"SKU": "100002", "QTY": 3, "PRICE": 500, "LINE": 1500}],
        "TOTAL": 5398,
        "TENDERS": [{"TYPE": "CARD", "AMOUNT": 5000}, {"TYPE": "CASH", "AMOUNT": 398}],
    }
    payload.update(overrides)
    return payload


def legacy_return(txn_id="S001-07-R00001", orig="S001-07-000001", **overrides) -> dict:
    payload = {
        "STORE": "S001", "TERMINAL": "07", "TXN_ID": txn_id, "TXN_DATE": "20261128",
        "TXN_TIME": "090000", "CURRENCY": "EUR",
        "LINES": [{"SKU": "100002", "QTY": 1, "PRICE": 500, "LINE": 500}],
        "TOTAL": 500, "TENDERS": [{"TYPE": "CASH", "AMOUNT": 500}],
        "ORIG_STORE": "S001", "ORIG_TXN_ID": orig, "REASON": "damaged",
    }
    payload.update(overrides)
    return payload


def make_db(path):
    engine = engine_for(f"sqlite:///{path}")
    create_schema(engine)
    with engine.begin() as conn:
        seed_demo_data(conn)
    unknown_sku.metadata.create_all(engine)
    md = sa.MetaData()
    md.reflect(engine, only=ledger.LEGACY_TABLES)
    return engine, ledger.LegacyTables.of(dict(md.tables))


@pytest.fixture
def db(tmp_path):
    engine, tables = make_db(tmp_path / "erp.db")
    yield engine, tables
    engine.dispose()


def rows(engine, table, *order, where=None):
    query = sa.select(table)
    if where is not None:
        query = query.where(where)
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(query.order_by(*order)).mappings()]


def on_hand(engine, t, store, sku):
    with engine.connect() as conn:
        return conn.execute(sa.select(t.stock.c.ON_HAND).where(
            t.stock.c.STORE_NO == store, t.stock.c.SKU == sku)).scalar()


def post(engine, fn, t, txn):
    with engine.begin() as conn:
        return fn(conn, t, txn)


# --- sale -------------------------------------------------------------------------------

def test_sale_header(db):
    engine, t = db
    doc_no = post(engine, ledger.post_sale, t, sale_from_legacy(legacy_sale()))
    assert doc_no == "S00000001"
    [hdr] = rows(engine, t.header, t.header.c.DOC_NO)
    assert hdr["DOC_NO"] == "S00000001"
    assert hdr["DOC_TYPE"] == "S"
    assert hdr["CHANNEL"] == "RBUS"
    assert hdr["STORE_NO"] == "S001" and hdr["TERM_NO"] == "07"
    assert hdr["POS_TXN_ID"] == "S001-07-000001"
    assert hdr["TXN_DATE"] == "20261127" and hdr["TXN_TIME"] == "101500"
    assert hdr["TOTAL_CENTS"] == 5398 and hdr["CURRENCY"] == "EUR"
    assert hdr["LOYALTY_CARD"] == "LC0000000001" and hdr["CUST_NO"] == "C00001"
    assert hdr["ORIG_DOC_NO"] is None
    assert len(hdr["CREATED_TS"]) == 26
    datetime.strptime(hdr["CREATED_TS"], "%Y-%m-%dT%H:%M:%S.%f")


def test_document_numbers_count_up_per_sequence(db):
    engine, t = db
    assert post(engine, ledger.post_sale, t, sale_from_legacy(legacy_sale("A"))) == "S00000001"
    assert post(engine, ledger.post_sale, t, sale_from_legacy(legacy_sale("B"))) == "S00000002"
    assert post(engine, ledger.post_return, t, return_from_legacy(legacy_return("R", orig="A"))) == "R00000001"
    with engine.connect() as conn:
        seq = dict(conn.execute(sa.select(t.doc_seq.c.SEQ_NAME, t.doc_seq.c.NEXT_NO)).tuples().all())
    assert seq == {"SLS": 3, "RTN": 2, "ORD": 1}  # no order document was written


def test_sale_lines_and_tenders(db):
    engine, t = db
    post(engine, ledger.post_sale, t, sale_from_legacy(legacy_sale()))
    lines = rows(engine, t.lines, t.lines.c.LINE_NO)
    assert [(r["DOC_NO"], r["LINE_NO"], r["SKU"], r["QTY"], r["UNIT_PRICE_CENTS"], r["DISC_CENTS"],
             r["LINE_CENTS"]) for r in lines] == [
        ("S00000001", 1, "100001", 2, 1999, 100, 3898),
        ("S00000001", 2, "100002", 3, 500, 0, 1500),
    ]
    tenders = rows(engine, t.tenders, t.tenders.c.SEQ)
    assert [(r["DOC_NO"], r["SEQ"], r["TND_TYPE"], r["AMOUNT_CENTS"]) for r in tenders] == [
        ("S00000001", 1, "CARD", 5000), ("S00000001", 2, "CASH", 398)]


def test_sale_takes_stock_off_the_shelf(db):
    engine, t = db
    post(engine, ledger.post_sale, t, sale_from_legacy(legacy_sale()))
    assert on_hand(engine, t, "S001", "100001") == DEMO_ON_HAND - 2
    assert on_hand(engine, t, "S001", "100002") == DEMO_ON_HAND - 3
    assert on_hand(engine, t, "S002", "100001") == DEMO_ON_HAND  # other store untouched
    assert on_hand(engine, t, "S001", "100003") == DEMO_ON_HAND


def test_sale_of_unknown_sku_invents_no_stock_row_and_records_the_move(db):
    """The legacy posting program would make up the row at -4; the bus path records it."""
    engine, t = db
    payload = legacy_sale(LINES=[{"SKU": "NEW-1", "QTY": 4, "PRICE": 100, "LINE": 400}], TOTAL=400,
                          TENDERS=[{"TYPE": "CASH", "AMOUNT": 400}])
    post(engine, ledger.post_sale, t, sale_from_legacy(payload))
    assert on_hand(engine, t, "S001", "NEW-1") is None
    assert [(r["STORE_NO"], r["SKU"], r["DOC_NO"], r["QTY"]) for r in rows(engine, unknown_sku.TABLE, "ID")] == \
        [("S001", "NEW-1", "S00000001", -4)]


def test_sale_gl_balances_with_right_accounts(db):
    engine, t = db
    post(engine, ledger.post_sale, t, sale_from_legacy(legacy_sale(
        TENDERS=[{"TYPE": "CARD", "AMOUNT": 5000}, {"TYPE": "CASH", "AMOUNT": 198},
                 {"TYPE": "VOUCHER", "AMOUNT": 100}, {"TYPE": "LOYALTY", "AMOUNT": 50},
                 {"TYPE": "OTHER", "AMOUNT": 50}])))
    gl = rows(engine, t.gl, t.gl.c.GL_ID)
    assert {(r["ACCOUNT"], r["DR_CENTS"], r["CR_CENTS"]) for r in gl} == {
        ("1100", 5000, 0), ("1000", 198, 0), ("1200", 100, 0), ("1300", 50, 0), ("1900", 50, 0),
        ("4000", 0, 5398)}
    assert len(gl) == 6
    assert sum(r["DR_CENTS"] for r in gl) == sum(r["CR_CENTS"] for r in gl) == 5398
    assert {r["DOC_NO"] for r in gl} == {"S00000001"}
    assert {r["POST_DATE"] for r in gl} == {"20261127"}


def test_sale_in_a_rolled_back_transaction_leaves_nothing(db):
    engine, t = db
    with pytest.raises(RuntimeError):
        with engine.begin() as conn:
            ledger.post_sale(conn, t, sale_from_legacy(legacy_sale()))
            raise RuntimeError("caller fails after posting")
    assert rows(engine, t.header, t.header.c.DOC_NO) == []
    assert rows(engine, t.gl, t.gl.c.GL_ID) == []
    assert on_hand(engine, t, "S001", "100001") == DEMO_ON_HAND


def test_sale_from_contract_with_local_time_keeps_the_posting_date(db):
    """business_day is the posting date even when occurred_at is in another day in UTC."""
    engine, t = db
    sale = PosSaleV1.model_validate({
        "store_id": "S001", "terminal_id": "07", "pos_txn_id": "X1", "business_day": date(2026, 11, 27),
        "occurred_at": "2026-11-27T23:30:00+01:00", "currency": "EUR",
        "lines": [{"line_no": 1, "sku": "100001", "quantity": 1, "unit_price_minor": 100,
                   "line_total_minor": 100}],
        "total_minor": 100, "tenders": [{"kind": "cash", "amount_minor": 100}]})
    post(engine, ledger.post_sale, t, sale)
    [hdr] = rows(engine, t.header, t.header.c.DOC_NO)
    assert hdr["TXN_DATE"] == "20261127"
    assert hdr["LOYALTY_CARD"] is None and hdr["CUST_NO"] is None


# --- return -----------------------------------------------------------------------------

def test_return_restores_stock_references_sale_and_reverses_gl(db):
    engine, t = db
    sale_no = post(engine, ledger.post_sale, t, sale_from_legacy(legacy_sale()))
    doc_no = post(engine, ledger.post_return, t, return_from_legacy(legacy_return()))
    assert doc_no == "R00000001"
    [hdr] = rows(engine, t.header, t.header.c.DOC_NO, where=t.header.c.DOC_TYPE == "R")
    assert hdr["DOC_NO"] == "R00000001" and hdr["ORIG_DOC_NO"] == sale_no == "S00000001"
    assert hdr["CHANNEL"] == "RBUS" and hdr["TOTAL_CENTS"] == 500 and hdr["TXN_DATE"] == "20261128"
    assert on_hand(engine, t, "S001", "100002") == DEMO_ON_HAND - 3 + 1
    gl = rows(engine, t.gl, t.gl.c.GL_ID, where=t.gl.c.DOC_NO == "R00000001")
    assert {(r["ACCOUNT"], r["DR_CENTS"], r["CR_CENTS"]) for r in gl} == {("1000", 0, 500), ("4000", 500, 0)}
    assert sum(r["DR_CENTS"] for r in gl) == sum(r["CR_CENTS"] for r in gl)


def test_return_of_unknown_sale_has_no_original(db):
    engine, t = db
    post(engine, ledger.post_return, t, return_from_legacy(legacy_return(orig="never-sold")))
    [hdr] = rows(engine, t.header, t.header.c.DOC_NO)
    assert hdr["DOC_TYPE"] == "R" and hdr["ORIG_DOC_NO"] is None


def test_return_finds_the_sale_in_the_original_store(db):
    engine, t = db
    post(engine, ledger.post_sale, t, sale_from_legacy(legacy_sale("S002-01-1", STORE="S002")))
    post(engine, ledger.post_sale, t, sale_from_legacy(legacy_sale("S002-01-1")))  # same id, S001
    post(engine, ledger.post_return, t,
         return_from_legacy(legacy_return(orig="S002-01-1", ORIG_STORE="S002")))
    [hdr] = rows(engine, t.header, t.header.c.DOC_NO, where=t.header.c.DOC_TYPE == "R")
    assert hdr["ORIG_DOC_NO"] == "S00000001"
    assert hdr["STORE_NO"] == "S001"
    assert on_hand(engine, t, "S001", "100002") == DEMO_ON_HAND - 3 + 1  # stock back where returned


# --- parity with the legacy ERP's own posting ---------------------------------------------

IGNORED = {"DOC_NO", "CHANNEL", "CREATED_TS", "UPD_TS", "GL_ID"}


def snapshot(engine, t) -> dict:
    def strip(rs):
        return [{k: v for k, v in r.items() if k not in IGNORED} for r in rs]
    return {
        "header": strip(rows(engine, t.header, t.header.c.DOC_TYPE, t.header.c.DOC_NO)),
        "lines": strip(rows(engine, t.lines, t.lines.c.DOC_NO, t.lines.c.LINE_NO)),
        "tenders": strip(rows(engine, t.tenders, t.tenders.c.DOC_NO, t.tenders.c.SEQ)),
        "stock": strip(rows(engine, t.stock, t.stock.c.STORE_NO, t.stock.c.SKU)),
        "gl": strip(rows(engine, t.gl, t.gl.c.DOC_NO, t.gl.c.ACCOUNT, t.gl.c.GL_ID)),
    }


def both_ways(tmp_path, documents):
    """Post the same legacy payloads through the legacy ERP and through the ledger."""
    legacy_engine, lt = make_db(tmp_path / "legacy.db")
    bus_engine, bt = make_db(tmp_path / "bus.db")
    try:
        for kind, payload in documents:
            with legacy_engine.begin() as conn:
                (postings.post_sale if kind == "S" else postings.post_return)(conn, payload)
            with bus_engine.begin() as conn:
                if kind == "S":
                    ledger.post_sale(conn, bt, sale_from_legacy(payload))
                else:
                    ledger.post_return(conn, bt, return_from_legacy(payload))
        legacy, bus = snapshot(legacy_engine, lt), snapshot(bus_engine, bt)
        with legacy_engine.connect() as a, bus_engine.connect() as b:
            channels = (set(a.execute(sa.select(lt.header.c.CHANNEL)).scalars()),
                        set(b.execute(sa.select(bt.header.c.CHANNEL)).scalars()))
        return legacy, bus, channels
    finally:
        legacy_engine.dispose()
        bus_engine.dispose()


def test_parity_with_legacy_posting(tmp_path):
    legacy, bus, channels = both_ways(tmp_path, [
        ("S", legacy_sale()),
        ("S", legacy_sale("S002-01-000009", STORE="S002", TERMINAL="01", LOYALTY_CARD=None, CUST_NO=None,
                          TENDERS=[{"TYPE": "VOUCHER", "AMOUNT": 5398}])),
        ("R", legacy_return()),
        ("R", legacy_return("S001-07-R00002", orig="never-sold")),
    ])
    assert channels == ({"POSAPI"}, {"RBUS"})
    assert len(bus["header"]) == 4 and len(bus["gl"]) == 3 + 2 + 2 + 2
    for part in ("header", "lines", "tenders", "stock", "gl"):
        assert bus[part] == legacy[part], part


def test_parity_detects_a_difference(tmp_path):
    """The comparison above can fail: a different amount shows up."""
    legacy_engine, lt = make_db(tmp_path / "legacy.db")
    bus_engine, bt = make_db(tmp_path / "bus.db")
    with legacy_engine.begin() as conn:
        postings.post_sale(conn, legacy_sale())
    with bus_engine.begin() as conn:
        ledger.post_sale(conn, bt, sale_from_legacy(legacy_sale(
            TENDERS=[{"TYPE": "CARD", "AMOUNT": 5398}])))
    assert snapshot(bus_engine, bt)["gl"] != snapshot(legacy_engine, lt)["gl"]
    legacy_engine.dispose()
    bus_engine.dispose()


@pytest.mark.parametrize("clock", [None, ""], ids=["absent", "empty"])
def test_parity_without_txn_time(tmp_path, clock):
    """A sale without TXN_TIME: both paths store no time (NULL), not midnight."""
    payload = legacy_sale()
    if clock is None:
        del payload["TXN_TIME"]
    else:
        payload["TXN_TIME"] = clock
    legacy, bus, _ = both_ways(tmp_path, [("S", payload)])
    assert [row["TXN_TIME"] for row in legacy["header"]] == [None]
    assert bus["header"] == legacy["header"]


def test_parity_with_empty_optional_fields(tmp_path):
    legacy, bus, _ = both_ways(tmp_path, [("S", legacy_sale(LOYALTY_CARD="", CUST_NO=""))])
    assert bus["header"] == legacy["header"]
