"""How a POS sale or return becomes rows in the legacy ERP schema.

The mapping between the contracts and the legacy tables lives here and only
here. The schema is the legacy ERP's, reflected at start: we live with it
and never change it. Rules mirror the legacy posting program: document
numbers from DOC_SEQ, stock moved per line, GL debits equal credits.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone

from sqlalchemy import Table, select, update
from sqlalchemy.engine import Connection

from contracts.pos import PosReturnV1, PosSaleV1
from legacy_wrappers.legacy_db import check_row

CHANNEL = "RBUS"
REVENUE_ACCOUNT = "4000"
TENDER_ACCOUNTS = {"cash": "1000", "card": "1100", "voucher": "1200", "loyalty": "1300", "other": "1900"}
LEGACY_TABLES = ("DOC_SEQ", "SLS_HDR", "SLS_LIN", "SLS_TND", "STK_LVL", "GL_PST")


@dataclass(frozen=True)
class LegacyTables:
    doc_seq: Table
    header: Table
    lines: Table
    tenders: Table
    stock: Table
    gl: Table

    @classmethod
    def of(cls, t: dict[str, Table]) -> "LegacyTables":
        return cls(t["DOC_SEQ"], t["SLS_HDR"], t["SLS_LIN"], t["SLS_TND"], t["STK_LVL"], t["GL_PST"])


def _stamp() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")


def next_doc_no(conn: Connection, t: LegacyTables, seq_name: str, prefix: str) -> str:
    seq = t.doc_seq.c
    conn.execute(update(t.doc_seq).where(seq.SEQ_NAME == seq_name).values(NEXT_NO=seq.NEXT_NO + 1))
    number = conn.execute(select(seq.NEXT_NO - 1).where(seq.SEQ_NAME == seq_name)).scalar_one()
    return f"{prefix}{number:08d}"


def _move_stock(conn: Connection, t: LegacyTables, store: str, sku: str, delta: int, now: str):
    c = t.stock.c
    moved = conn.execute(
        update(t.stock).where(c.STORE_NO == store, c.SKU == sku)
        .values(ON_HAND=c.ON_HAND + delta, UPD_TS=now)).rowcount
    if not moved:
        conn.execute(t.stock.insert().values(STORE_NO=store, SKU=sku, ON_HAND=delta, UPD_TS=now))


def find_document(conn: Connection, t: LegacyTables, store: str, doc_type: str, pos_txn_id: str) -> str | None:
    c = t.header.c
    return conn.execute(
        select(c.DOC_NO).where(c.STORE_NO == store, c.DOC_TYPE == doc_type, c.POS_TXN_ID == pos_txn_id)
        .order_by(c.DOC_NO).limit(1)).scalar()


def _write(conn: Connection, t: LegacyTables, txn: PosSaleV1 | PosReturnV1, doc_type: str,
           orig_doc_no: str | None) -> str:
    doc_no = next_doc_no(conn, t, "SLS" if doc_type == "S" else "RTN", doc_type)
    now = _stamp()
    post_date = txn.business_day.strftime("%Y%m%d")
    header = dict(
        DOC_NO=doc_no, DOC_TYPE=doc_type, STORE_NO=txn.store_id, TERM_NO=txn.terminal_id,
        POS_TXN_ID=txn.pos_txn_id, TXN_DATE=post_date,
        TXN_TIME=txn.occurred_at.strftime("%H%M%S"), TOTAL_CENTS=txn.total_minor,
        CURRENCY=txn.currency, LOYALTY_CARD=txn.loyalty_card, CUST_NO=txn.customer_id,
        ORIG_DOC_NO=orig_doc_no, CHANNEL=CHANNEL, CREATED_TS=now)
    lines = [dict(DOC_NO=doc_no, LINE_NO=line.line_no, SKU=line.sku, QTY=line.quantity,
                  UNIT_PRICE_CENTS=line.unit_price_minor, DISC_CENTS=line.discount_minor,
                  LINE_CENTS=line.line_total_minor) for line in txn.lines]
    check_row(t.header, header)  # refused whole, before anything is written
    for line in lines:
        check_row(t.lines, line)
    conn.execute(t.header.insert().values(**header))
    conn.execute(t.lines.insert(), lines)
    conn.execute(t.tenders.insert(), [
        dict(DOC_NO=doc_no, SEQ=seq, TND_TYPE=tender.kind.upper(), AMOUNT_CENTS=tender.amount_minor)
        for seq, tender in enumerate(txn.tenders, start=1)])
    sign = -1 if doc_type == "S" else 1  # a sale takes units off the shelf, a return puts them back
    for line in txn.lines:
        _move_stock(conn, t, txn.store_id, line.sku, sign * line.quantity, now)
    sale = doc_type == "S"
    gl = [dict(DOC_NO=doc_no, ACCOUNT=TENDER_ACCOUNTS[tender.kind], POST_DATE=post_date,
               DR_CENTS=tender.amount_minor if sale else 0, CR_CENTS=0 if sale else tender.amount_minor)
          for tender in txn.tenders]
    gl.append(dict(DOC_NO=doc_no, ACCOUNT=REVENUE_ACCOUNT, POST_DATE=post_date,
                   DR_CENTS=0 if sale else txn.total_minor, CR_CENTS=txn.total_minor if sale else 0))
    conn.execute(t.gl.insert(), gl)
    return doc_no


def post_sale(conn: Connection, t: LegacyTables, sale: PosSaleV1) -> str:
    return _write(conn, t, sale, "S", None)


def post_return(conn: Connection, t: LegacyTables, ret: PosReturnV1) -> str:
    original = ret.original and find_document(conn, t, ret.original.store_id, "S", ret.original.pos_txn_id)
    return _write(conn, t, ret, "R", original)


def sale_status(conn: Connection, t: LegacyTables, store: str, pos_txn_id: str) -> dict | None:
    """The posted sale of a store transaction, as the ERP holds it; None if not posted."""
    check_row(t.header, {"STORE_NO": store, "POS_TXN_ID": pos_txn_id})
    c = t.header.c
    row = conn.execute(
        select(c.DOC_NO, c.TXN_DATE, c.TOTAL_CENTS, c.CURRENCY, c.CHANNEL, c.CREATED_TS)
        .where(c.STORE_NO == store, c.DOC_TYPE == "S", c.POS_TXN_ID == pos_txn_id)
        .order_by(c.DOC_NO).limit(1)).first()
    if row is None:
        return None
    day = row.TXN_DATE
    return {"store_id": store, "pos_txn_id": pos_txn_id, "doc_no": row.DOC_NO,
            "business_day": f"{day[:4]}-{day[4:6]}-{day[6:]}", "total_minor": row.TOTAL_CENTS,
            "currency": row.CURRENCY, "channel": row.CHANNEL,
            "posted_at": datetime.fromisoformat(row.CREATED_TS).replace(tzinfo=timezone.utc).isoformat()}
