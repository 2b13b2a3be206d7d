"""How a POS sale or return becomes rows in the legacy ERP schema.

The mapping between the contracts and the legacy tables lives here and only
here. The schema is the legacy ERP's, reflected at start: we live with it
and never change it. Rules mirror the legacy posting program: document
numbers from DOC_SEQ, stock moved per line, GL debits equal credits.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from functools import cached_property, lru_cache

from sqlalchemy import Table, bindparam, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from contracts.pos import PosReturnV1, PosSaleV1
from legacy_wrappers.legacy_db import check_row, pairs_in
from legacy_wrappers.prepared import Prepared, Statements, run_together
from services.erp import unknown_sku

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
        return _tables(t["DOC_SEQ"], t["SLS_HDR"], t["SLS_LIN"], t["SLS_TND"], t["STK_LVL"], t["GL_PST"])

    @cached_property
    def sql(self) -> "_Statements":
        return _Statements(self)


@lru_cache(maxsize=16)
def _tables(*tables: Table) -> LegacyTables:
    """One LegacyTables (and so one set of statements) per reflected schema."""
    return LegacyTables(*tables)


class _Statements:
    """The posting's statements, built and compiled once (`Prepared`): building a
    Core statement costs five times running it, and a posting runs a dozen."""

    def __init__(self, t: LegacyTables):
        seq, hdr = t.doc_seq.c, t.header.c
        self.take_doc_nos = Prepared(update(t.doc_seq).where(seq.SEQ_NAME == bindparam("seq_name"))
                                     .values(NEXT_NO=seq.NEXT_NO + bindparam("count")).returning(seq.NEXT_NO))
        self.move_stock = {name: _stock_upsert(insert, t.stock) for name, insert in
                           (("sqlite", sqlite.insert), ("postgresql", postgresql.insert))}
        self.find_document = Prepared(
            select(hdr.DOC_NO).where(hdr.STORE_NO == bindparam("store"), hdr.DOC_TYPE == bindparam("doc_type"),
                                     hdr.POS_TXN_ID == bindparam("pos_txn_id")).order_by(hdr.DOC_NO).limit(1))
        self.insert = {table.name: Prepared(table.insert()) for table in (t.header, t.lines, t.tenders, t.gl)}


def _stock_upsert(insert, stock: Table) -> Prepared:
    """Every stock move of a batch in one statement, each existing store/SKU row moved
    by it (as an upsert: one statement whatever the batch; UPDATEs cost one each, on
    PostgreSQL a round trip each). Only rows known to exist are moved (`documents`);
    should one vanish in between, the upsert starts it at the move, as legacy would."""
    statement = insert(stock)
    return Prepared(statement.on_conflict_do_update(
        index_elements=[stock.c.STORE_NO, stock.c.SKU],
        set_={"ON_HAND": stock.c.ON_HAND + statement.excluded.ON_HAND, "UPD_TS": statement.excluded.UPD_TS}))


def _stamp() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")


def next_doc_nos(conn: Connection, t: LegacyTables, seq_name: str, prefix: str, count: int) -> list[str]:
    """`count` consecutive document numbers, as the legacy posting program takes them
    (its UPDATE and SELECT as one statement: the row is locked by the UPDATE either way)."""
    after = t.sql.take_doc_nos(conn, {"seq_name": seq_name, "count": count}).scalar_one()
    return [f"{prefix}{number:08d}" for number in range(after - count, after)]


def find_document(conn: Connection, t: LegacyTables, store: str, doc_type: str, pos_txn_id: str) -> str | None:
    return t.sql.find_document(conn, {"store": store, "doc_type": doc_type, "pos_txn_id": pos_txn_id}).scalar()


def existing_documents(conn: Connection, t: LegacyTables,
                       keys: list[tuple[str, str, str]]) -> set[tuple[str, str, str]]:
    """Those of (store, doc type, POS transaction id) that already have a document, in
    one statement: a sale the legacy API booked (a till's call that timed out, then
    queued on the bus) is there under no RB_INBOX key, and must not be booked twice."""
    if not keys:
        return set()
    c = t.header.c
    pairs = sorted({(store, txn) for store, _, txn in keys})
    rows = conn.execute(select(c.STORE_NO, c.DOC_TYPE, c.POS_TXN_ID)
                        .where(pairs_in(c.STORE_NO, c.POS_TXN_ID, pairs))).all()
    return {tuple(row) for row in rows} & set(keys)


@dataclass(frozen=True)
class Rows:
    """The legacy rows of one document: the mapping from the contract, no database."""
    header: dict
    lines: list[dict]
    tenders: list[dict]
    gl: list[dict]
    stock_moves: list[tuple[str, int]]  # (sku, units added: negative for a sale)


def rows_for(txn: PosSaleV1 | PosReturnV1, doc_type: str, doc_no: str, orig_doc_no: str | None,
             now: str) -> Rows:
    post_date = txn.business_day.isoformat().replace("-", "")  # YYYYMMDD; strftime costs 3x
    at = txn.occurred_at
    sale = doc_type == "S"
    header = dict(
        DOC_NO=doc_no, DOC_TYPE=doc_type, STORE_NO=txn.store_id, TERM_NO=txn.terminal_id,
        POS_TXN_ID=txn.pos_txn_id, TXN_DATE=post_date,
        TXN_TIME=None if at is None else f"{at.hour:02d}{at.minute:02d}{at.second:02d}",  # NULL, as legacy
        TOTAL_CENTS=txn.total_minor,
        CURRENCY=txn.currency, LOYALTY_CARD=txn.loyalty_card, CUST_NO=txn.customer_id,
        ORIG_DOC_NO=orig_doc_no, CHANNEL=CHANNEL, CREATED_TS=now)
    lines = [dict(DOC_NO=doc_no, LINE_NO=line.line_no, SKU=line.sku, QTY=line.quantity,
                  UNIT_PRICE_CENTS=line.unit_price_minor, DISC_CENTS=line.discount_minor,
                  LINE_CENTS=line.line_total_minor) for line in txn.lines]
    tenders = [dict(DOC_NO=doc_no, SEQ=seq, TND_TYPE=tender.kind.upper(), AMOUNT_CENTS=tender.amount_minor)
               for seq, tender in enumerate(txn.tenders, start=1)]
    gl = [dict(DOC_NO=doc_no, ACCOUNT=TENDER_ACCOUNTS[tender.kind], POST_DATE=post_date,
               DR_CENTS=tender.amount_minor if sale else 0, CR_CENTS=0 if sale else tender.amount_minor)
          for tender in txn.tenders]
    gl.append(dict(DOC_NO=doc_no, ACCOUNT=REVENUE_ACCOUNT, POST_DATE=post_date,
                   DR_CENTS=0 if sale else txn.total_minor, CR_CENTS=txn.total_minor if sale else 0))
    sign = -1 if sale else 1  # a sale takes units off the shelf, a return puts them back
    return Rows(header, lines, tenders, gl, [(line.sku, sign * line.quantity) for line in txn.lines])


SEQUENCES = {"S": "SLS", "R": "RTN"}


def write_many(conn: Connection, t: LegacyTables,
               docs: list[tuple[PosSaleV1 | PosReturnV1, str, str | None]]) -> list[str]:
    """Write documents (txn, doc type 'S'/'R', original doc no); see `documents`."""
    doc_nos, statements, _ = documents(conn, t, docs)
    run_together(conn, statements)
    return doc_nos


Move = tuple[str, str, str, int]  # (doc_no, store, sku, units added)


def documents(conn: Connection, t: LegacyTables, docs: list[tuple[PosSaleV1 | PosReturnV1, str, str | None]]) \
        -> tuple[list[str], Statements, list[Move]]:
    """Take the documents' numbers and return them with the statements that write the
    documents, for the caller to run (`run_together`, with statements of its own in the
    same round trip), and the stock moves of SKUs the store holds no stock row for:
    those are recorded in RB_UNKNOWN_SKU (services/erp/unknown_sku.py), never invented
    as rows. One statement per table, not per document, so many postings cost little
    more than one. Every row is checked before anything is written; stock rows are
    moved once per store and SKU, in key order (two writers then never wait on each
    other in a cycle)."""
    now = _stamp()
    numbers = {kind: iter(next_doc_nos(conn, t, SEQUENCES[kind], kind, count))
               for kind in SEQUENCES if (count := sum(1 for _, k, _ in docs if k == kind))}
    rows = [rows_for(txn, kind, next(numbers[kind]), orig, now) for txn, kind, orig in docs]
    for r in rows:
        check_row(t.header, r.header)
        for line in r.lines:
            check_row(t.lines, line)
    moves: dict[tuple[str, str], int] = {}
    for (txn, _, _), r in zip(docs, rows):
        for sku, delta in r.stock_moves:
            moves[(txn.store_id, sku)] = moves.get((txn.store_id, sku), 0) + delta
    known = known_stock(conn, t, list(moves))
    unknown = [(r.header["DOC_NO"], txn.store_id, sku, delta) for (txn, _, _), r in zip(docs, rows)
               for sku, delta in r.stock_moves if (txn.store_id, sku) not in known]
    insert = t.sql.insert
    return [r.header["DOC_NO"] for r in rows], [
        (insert[t.header.name], [r.header for r in rows]),
        (insert[t.lines.name], [line for r in rows for line in r.lines]),
        (insert[t.tenders.name], [tender for r in rows for tender in r.tenders]),
        (insert[t.gl.name], [gl for r in rows for gl in r.gl]),
        (t.sql.move_stock[conn.dialect.name], [{"STORE_NO": store, "SKU": sku, "ON_HAND": moves[(store, sku)],
                                                "UPD_TS": now} for store, sku in sorted(known)]),
        (unknown_sku.INSERT, unknown_sku.rows(unknown, now))], unknown


def known_stock(conn: Connection, t: LegacyTables, keys: list[tuple[str, str]]) -> set[tuple[str, str]]:
    """Those of (store, SKU) that have a stock row, in one statement."""
    if not keys:
        return set()
    c = t.stock.c
    return {tuple(row) for row in conn.execute(
        select(c.STORE_NO, c.SKU).where(pairs_in(c.STORE_NO, c.SKU, keys))).all()}


def post_sale(conn: Connection, t: LegacyTables, sale: PosSaleV1) -> str:
    return write_many(conn, t, [(sale, "S", None)])[0]


def post_return(conn: Connection, t: LegacyTables, ret: PosReturnV1) -> str:
    return write_many(conn, t, [(ret, "R", original_of(conn, t, ret))])[0]


def original_of(conn: Connection, t: LegacyTables, ret: PosReturnV1) -> str | None:
    """The document of the sale a return refers to (None: not referenced or not posted)."""
    return ret.original and find_document(conn, t, ret.original.store_id, "S", ret.original.pos_txn_id)


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
