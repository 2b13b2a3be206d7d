"""The legacy ERP's database schema: a contract shared with retailbus.

The simulated ERP writes these tables through its HTTP API, and retailbus's
``services/erp`` writes the very same tables directly (SQLAlchemy reflection)
once a route is strangled. Table and column names are therefore frozen,
upper-case, legacy style. Amounts are integer cents, dates are ``YYYYMMDD``
strings and timestamps are ISO UTC strings, as in the ERP this imitates.

There is deliberately no unique constraint on ``SLS_HDR (STORE_NO,
POS_TXN_ID)``: the legacy ERP detects duplicates with a racy SELECT, so
retailbus has to prove its own idempotency rather than lean on the database.

Types stay portable (String/Integer/BigInteger) so the same metadata runs on
SQLite (the embedded default) and PostgreSQL.
"""

from datetime import datetime, timezone

from sqlalchemy import (
    BigInteger,
    Column,
    Engine,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    create_engine,
    event,
    inspect,
    select,
)
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError, IntegrityError

metadata = MetaData()

DOC_SEQ = Table(
    "DOC_SEQ",
    metadata,
    Column("SEQ_NAME", String(8), primary_key=True),
    Column("NEXT_NO", Integer, nullable=False),
)

SLS_HDR = Table(
    "SLS_HDR",
    metadata,
    Column("DOC_NO", String(12), primary_key=True),
    Column("DOC_TYPE", String(1), nullable=False),  # 'S' sale, 'R' return
    Column("STORE_NO", String(8), nullable=False),
    Column("TERM_NO", String(4), nullable=False),
    Column("POS_TXN_ID", String(40), nullable=False),
    Column("TXN_DATE", String(8), nullable=False),  # YYYYMMDD
    Column("TXN_TIME", String(6)),  # HHMMSS
    Column("TOTAL_CENTS", BigInteger, nullable=False),
    Column("CURRENCY", String(3), nullable=False),
    Column("LOYALTY_CARD", String(20)),
    Column("CUST_NO", String(12)),
    Column("ORIG_DOC_NO", String(12)),
    Column("CHANNEL", String(8), nullable=False),  # 'POSAPI' or 'RBUS'
    Column("CREATED_TS", String(26), nullable=False),
    # Lookup index for the duplicate check; NOT unique on purpose (see above).
    Index("IX_SLS_HDR_POS_TXN", "STORE_NO", "POS_TXN_ID"),
)

SLS_LIN = Table(
    "SLS_LIN",
    metadata,
    Column("DOC_NO", String(12), ForeignKey("SLS_HDR.DOC_NO"), primary_key=True),
    Column("LINE_NO", Integer, primary_key=True),
    Column("SKU", String(20), nullable=False),
    Column("QTY", Integer, nullable=False),
    Column("UNIT_PRICE_CENTS", BigInteger, nullable=False),
    Column("DISC_CENTS", BigInteger, nullable=False),
    Column("LINE_CENTS", BigInteger, nullable=False),
)

SLS_TND = Table(
    "SLS_TND",
    metadata,
    Column("DOC_NO", String(12), ForeignKey("SLS_HDR.DOC_NO"), primary_key=True),
    Column("SEQ", Integer, primary_key=True),
    Column("TND_TYPE", String(8), nullable=False),
    Column("AMOUNT_CENTS", BigInteger, nullable=False),
)

STK_LVL = Table(
    "STK_LVL",
    metadata,
    Column("STORE_NO", String(8), primary_key=True),
    Column("SKU", String(20), primary_key=True),
    Column("ON_HAND", Integer, nullable=False),
    Column("UPD_TS", String(26), nullable=False),
)

CUST_MST = Table(
    "CUST_MST",
    metadata,
    Column("CUST_NO", String(12), primary_key=True),
    Column("NAME", String(80), nullable=False),
    Column("EMAIL", String(120)),
    Column("PHONE", String(30)),
    Column("LOYALTY_CARD", String(20)),
    Column("UPD_TS", String(26), nullable=False),
    # Billing and tax (the ERP's own), marketing consents ('Y'/'N') and the customer hub's id
    # (MASTER_ID): added to an older database by create_schema.
    Column("BILL_ADDR", String(200)),
    Column("TAX_ID", String(20)),
    Column("MKT_EMAIL", String(1)),
    Column("MKT_SMS", String(1)),
    Column("DATA_SHARE", String(1)),
    Column("MASTER_ID", String(12)),
)

GL_PST = Table(
    "GL_PST",
    metadata,
    Column("GL_ID", Integer, primary_key=True, autoincrement=True),
    Column("DOC_NO", String(12), nullable=False),
    Column("ACCOUNT", String(10), nullable=False),
    Column("DR_CENTS", BigInteger, nullable=False, server_default="0"),
    Column("CR_CENTS", BigInteger, nullable=False, server_default="0"),
    Column("POST_DATE", String(8), nullable=False),
    # A document's postings: reconcile joins the day's sales to their GL 1300 debits on it
    # (without, SQLite scanned the whole table once per sale of the day).
    Index("IX_GL_PST_DOC", "DOC_NO"),
)

# Click-and-collect orders (ecommerce, picked up in store). A reservation holds
# units of a store's stock for an order until it is collected ('C'), released
# ('R') or past EXPIRES_TS: available = ON_HAND minus the live ('L', unexpired)
# reservations. An order's commitment is a document of its own (DOC_NO) with
# deferred revenue in GL_PST; collection or cancellation writes the second and
# last one (END_DOC_NO): revenue recognised, or the commitment reversed.
STK_RSV = Table(
    "STK_RSV",
    metadata,
    Column("RSV_ID", Integer, primary_key=True, autoincrement=True),
    Column("ORDER_NO", String(40), nullable=False),
    Column("STORE_NO", String(8), nullable=False),
    Column("SKU", String(20), nullable=False),
    Column("QTY", Integer, nullable=False),
    Column("STATUS", String(1), nullable=False),  # 'L' live, 'C' collected, 'R' released
    Column("EXPIRES_TS", String(26), nullable=False),
    Column("CREATED_TS", String(26), nullable=False),
    Column("UPD_TS", String(26), nullable=False),
    Index("IX_STK_RSV_LIVE", "STORE_NO", "SKU", "STATUS"),
    Index("IX_STK_RSV_ORDER", "ORDER_NO"),
)

ORD_HDR = Table(
    "ORD_HDR",
    metadata,
    Column("ORDER_NO", String(40), primary_key=True),
    Column("DOC_NO", String(12), nullable=False),  # the commitment document
    Column("STORE_NO", String(8), nullable=False),  # the pickup store
    Column("ORDER_DATE", String(8), nullable=False),  # YYYYMMDD
    Column("CUST_NO", String(12)),
    Column("LOYALTY_CARD", String(20)),
    Column("TOTAL_CENTS", BigInteger, nullable=False),
    Column("POINTS", Integer, nullable=False),
    Column("POINTS_CENTS", BigInteger, nullable=False),
    Column("PAID_CENTS", BigInteger, nullable=False),
    Column("CURRENCY", String(3), nullable=False),
    Column("PAY_REF", String(64), nullable=False),
    Column("STATUS", String(1), nullable=False),  # 'O' open, 'C' collected, 'X' reversed
    Column("END_DOC_NO", String(12)),  # revenue recognised ('C') or commitment reversed ('X')
    Column("END_DATE", String(8)),
    Column("CREATED_TS", String(26), nullable=False),
    Column("UPD_TS", String(26), nullable=False),
    Index("IX_ORD_HDR_DATE", "ORDER_DATE"),
)

ORD_LIN = Table(
    "ORD_LIN",
    metadata,
    Column("ORDER_NO", String(40), ForeignKey("ORD_HDR.ORDER_NO"), primary_key=True),
    Column("LINE_NO", Integer, primary_key=True),
    Column("SKU", String(20), nullable=False),
    Column("QTY", Integer, nullable=False),
    Column("UNIT_PRICE_CENTS", BigInteger, nullable=False),
    Column("LINE_CENTS", BigInteger, nullable=False),
)

#: Document number sequences and their first number.
SEQUENCES = {"SLS": 1, "RTN": 1, "ORD": 1}

DEMO_STORES = ("S001", "S002")
DEMO_SKUS = tuple(str(n) for n in range(100001, 100021))
DEMO_ON_HAND = 1000
DEMO_CUSTOMERS = (
    ("C00001", "Anna Schmidt", "anna.schmidt@example.com", "+49 30 1234501", "LC0000000001"),
    ("C00002", "Luca Rossi", "luca.rossi@example.com", "+39 06 1234502", "LC0000000002"),
    ("C00003", "Marie Dubois", "marie.dubois@example.com", None, "LC0000000003"),
    ("C00004", "Jan de Vries", None, "+31 20 1234504", None),
    ("C00005", "Sofia Garcia", "sofia.garcia@example.com", "+34 91 1234505", "LC0000000005"),
)


def utc_stamp() -> str:
    """The legacy timestamp format: ISO UTC with microseconds, 26 characters."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")


def engine_for(dsn: str) -> Engine:
    """An engine for ``dsn``; SQLite gets WAL, a long busy timeout and FKs.

    WAL lets readers run beside the single writer, and the 30 s busy timeout
    makes concurrent writers (HTTP threads, retailbus) queue instead of
    failing with "database is locked".
    """
    engine = create_engine(dsn)
    if engine.dialect.name == "sqlite":

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

    return engine


def create_schema(engine: Engine) -> None:
    """Create missing tables, columns, indexes and DOC_SEQ rows; safe to run again and again."""
    metadata.create_all(engine)
    _add_missing_columns(engine, CUST_MST)
    _add_missing_indexes(engine, GL_PST)
    for name, first in SEQUENCES.items():
        # One transaction per row: a concurrent init inserting the same row
        # only costs us an IntegrityError, which means the row exists.
        try:
            with engine.begin() as conn:
                exists = conn.execute(
                    select(DOC_SEQ.c.SEQ_NAME).where(DOC_SEQ.c.SEQ_NAME == name)
                ).first()
                if exists is None:
                    conn.execute(DOC_SEQ.insert().values(SEQ_NAME=name, NEXT_NO=first))
        except IntegrityError:
            pass


def _add_missing_columns(engine: Engine, table: Table) -> None:
    """Nullable columns a table made by an older version lacks (create_all leaves it as it was)."""
    have = {column["name"] for column in inspect(engine).get_columns(table.name)}
    for column in table.columns:
        if column.name not in have:
            kind = column.type.compile(dialect=engine.dialect)
            try:
                with engine.begin() as conn:
                    conn.exec_driver_sql(f'ALTER TABLE "{table.name}" ADD COLUMN "{column.name}" {kind}')
            except DBAPIError:  # another process added it meanwhile
                if column.name not in {c["name"] for c in inspect(engine).get_columns(table.name)}:
                    raise


def _add_missing_indexes(engine: Engine, table: Table) -> None:
    """Indexes a table made by an older version lacks (create_all adds none to a table that exists)."""
    for index in table.indexes:
        try:
            index.create(engine, checkfirst=True)
        except DBAPIError:  # another process created it meanwhile
            if not inspect(engine).has_index(table.name, index.name):
                raise


def seed_demo_data(conn: Connection) -> None:
    """Add demo stock and customers that are missing; never resets existing rows.

    Stock that has already moved keeps its level, so seeding twice is harmless.
    """
    now = utc_stamp()
    have_stock = set(conn.execute(select(STK_LVL.c.STORE_NO, STK_LVL.c.SKU)).tuples())
    stock = [
        {"STORE_NO": store, "SKU": sku, "ON_HAND": DEMO_ON_HAND, "UPD_TS": now}
        for store in DEMO_STORES
        for sku in DEMO_SKUS
        if (store, sku) not in have_stock
    ]
    if stock:
        conn.execute(STK_LVL.insert(), stock)
    have_cust = set(conn.execute(select(CUST_MST.c.CUST_NO)).scalars())
    customers = [
        {"CUST_NO": no, "NAME": name, "EMAIL": email, "PHONE": phone,
         "LOYALTY_CARD": card, "UPD_TS": now}
        for no, name, email, phone, card in DEMO_CUSTOMERS
        if no not in have_cust
    ]
    if customers:
        conn.execute(CUST_MST.insert(), customers)
