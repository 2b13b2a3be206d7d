"""A store's daily loyalty settlement (`loyalty.settlement.v1`) as a legacy GL document.

The loyalty platform owes its members the points it issued: a liability. Each
settlement becomes one document of GL_PST rows dated by the business day:
the points issued less those reversed, valued, are an expense and a liability
(Dr 6100, Cr 2400; the other way round when returns took back more than was
issued); the points redeemed are the liability paid out, which clears what the
day's sales debited to the loyalty tender account (Dr 2400, Cr 1300). The net
credit to 2400 is the settlement's `liability_minor`; debits equal credits.

Its document number comes from DOC_SEQ like every posting's, from a sequence
`LOY` added when missing (a row, not a schema change), and RB_LOY_SETTLEMENT
(ours, beside the legacy tables) says which store, day and sequence it settles,
since GL_PST has no column for them: `retailbus reconcile` reads both.
"""
from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import BigInteger, Column, Integer, MetaData, String, Table, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from contracts.loyalty import LoyaltySettlementV1
from services.erp import ledger

EXPENSE_ACCOUNT = "6100"    # loyalty points expense
LIABILITY_ACCOUNT = "2400"  # loyalty points liability
SEQUENCE, PREFIX = "LOY", "L"

metadata = MetaData()
SETTLEMENTS = Table(
    "RB_LOY_SETTLEMENT", metadata,
    Column("STORE_NO", String(8), primary_key=True),
    Column("BUSINESS_DAY", String(8), primary_key=True),   # YYYYMMDD, as GL_PST.POST_DATE
    Column("SEQ", Integer, primary_key=True),
    Column("DOC_NO", String(12), nullable=False),
    Column("POINTS_ISSUED", BigInteger, nullable=False),
    Column("POINTS_REDEEMED", BigInteger, nullable=False),
    Column("POINTS_REVERSED", BigInteger, nullable=False),
    Column("LIABILITY_CENTS", BigInteger, nullable=False),
    Column("CURRENCY", String(3), nullable=False),
    Column("POSTED_TS", String(26), nullable=False),
)


def gl_rows(s: LoyaltySettlementV1, doc_no: str) -> list[dict]:
    """The settlement's GL_PST rows (none for an amount of zero)."""
    post_date = s.business_day.strftime("%Y%m%d")
    issued = (s.points_issued - s.points_reversed) * s.point_value_minor
    redeemed = s.points_redeemed * s.point_value_minor

    def row(account: str, dr: int, cr: int) -> dict:
        return dict(DOC_NO=doc_no, ACCOUNT=account, POST_DATE=post_date, DR_CENTS=dr, CR_CENTS=cr)
    rows = []
    if issued:
        rows += [row(EXPENSE_ACCOUNT, max(issued, 0), max(-issued, 0)),
                 row(LIABILITY_ACCOUNT, max(-issued, 0), max(issued, 0))]
    if redeemed:
        rows += [row(LIABILITY_ACCOUNT, redeemed, 0), row(ledger.TENDER_ACCOUNTS["loyalty"], 0, redeemed)]
    return rows


def post(conn: Connection, t: ledger.LegacyTables, s: LoyaltySettlementV1) -> str:
    """Write the settlement's document in the caller's transaction (with its inbox key); its number."""
    insert = (postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert)(t.doc_seq)
    conn.execute(insert.values(SEQ_NAME=SEQUENCE, NEXT_NO=1).on_conflict_do_nothing())
    [doc_no] = ledger.next_doc_nos(conn, t, SEQUENCE, PREFIX, 1)
    rows = gl_rows(s, doc_no)
    if rows:
        conn.execute(t.gl.insert(), rows)
    conn.execute(SETTLEMENTS.insert().values(
        STORE_NO=s.store_id, BUSINESS_DAY=s.business_day.strftime("%Y%m%d"), SEQ=s.sequence, DOC_NO=doc_no,
        POINTS_ISSUED=s.points_issued, POINTS_REDEEMED=s.points_redeemed, POINTS_REVERSED=s.points_reversed,
        LIABILITY_CENTS=s.liability_minor, CURRENCY=s.currency,
        POSTED_TS=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")))
    return doc_no


def settled(conn: Connection, store: str, post_date: str) -> list[dict]:
    """RB_LOY_SETTLEMENT rows of a store and day (YYYYMMDD)."""
    c = SETTLEMENTS.c
    return [dict(r) for r in conn.execute(select(SETTLEMENTS).where(c.STORE_NO == store, c.BUSINESS_DAY == post_date)
                                          .order_by(c.SEQ)).mappings()]
