"""The loyalty service's own tables (its database, LOYALTY_DB_URI), beside its inbox.

The platform holds the balances; these hold what the bus needs to act on later
without asking it: which hold pays for which till transaction (captured when the
ERP posts that sale), what each line of a sale earned (a return takes back what
its lines earned, never more), the exceptions ops must see, and the daily
settlements (recorded before they are sent, so a restart neither misses nor
repeats one).
"""
from __future__ import annotations

from sqlalchemy import Column, Index, Integer, MetaData, String, Table, UniqueConstraint

metadata = MetaData()

HOLDS = Table(
    "LOY_HOLD", metadata,
    Column("HOLD_ID", String(64), primary_key=True),
    Column("CARD", String(40), nullable=False),
    Column("STORE_ID", String(16), nullable=False),
    Column("POS_TXN_ID", String(64), nullable=False, index=True),
    Column("POINTS", Integer, nullable=False),
    Column("STATUS", String(16), nullable=False),      # held | captured | released
    Column("OFFLINE", Integer, nullable=False, default=0),
    Column("EXPIRES_AT", String(40), nullable=False),
    Column("UPDATED_AT", String(40), nullable=False),
)

ACCRUALS = Table(
    "LOY_ACCRUAL", metadata,
    Column("STORE_ID", String(16), primary_key=True),
    Column("POS_TXN_ID", String(64), primary_key=True),
    Column("LINE_NO", Integer, primary_key=True),
    Column("CARD", String(40), nullable=False),
    Column("BUSINESS_DAY", String(10), nullable=False, index=True),
    Column("SKU", String(40), nullable=False),
    Column("QUANTITY", Integer, nullable=False),
    Column("LINE_TOTAL_MINOR", Integer, nullable=False),
    Column("POINTS", Integer, nullable=False),
)
CARDLESS = ACCRUALS.c.CARD == ""  # a sale without a loyalty card: pruned (services/loyalty/retention.py)
CARDLESS_INDEX = Index("IX_LOY_ACCRUAL_CARDLESS", ACCRUALS.c.BUSINESS_DAY, sqlite_where=CARDLESS,
                       postgresql_where=CARDLESS)  # only those rows: retention never walks the carded ones

REVERSALS = Table(
    "LOY_REVERSAL", metadata,
    Column("STORE_ID", String(16), primary_key=True),
    Column("RETURN_TXN_ID", String(64), primary_key=True),
    Column("ORIGINAL_TXN_ID", String(64), nullable=False, index=True),
    Column("CARD", String(40), nullable=False),
    Column("BUSINESS_DAY", String(10), nullable=False),
    Column("POINTS", Integer, nullable=False),            # accrued points taken back
    Column("REFUNDED", Integer, nullable=False),          # redeemed points given back
)

EXCEPTIONS = Table(
    "LOY_EXCEPTION", metadata,
    Column("KIND", String(32), primary_key=True),          # over_redemption | shadow_mismatch | reversal_refused
    Column("STORE_ID", String(16), primary_key=True),
    Column("POS_TXN_ID", String(64), primary_key=True),
    Column("CARD", String(40), nullable=False),
    Column("DETAIL", String(2000), nullable=False),
    Column("CREATED_AT", String(40), nullable=False),
    UniqueConstraint("KIND", "STORE_ID", "POS_TXN_ID"),
)

SETTLEMENTS = Table(
    "LOY_SETTLEMENT", metadata,                            # what was settled per store and day, and when sent
    Column("STORE_ID", String(16), primary_key=True),
    Column("BUSINESS_DAY", String(10), primary_key=True),
    Column("SEQUENCE", Integer, primary_key=True),         # 1: the day; 2..: supplements for late postings
    Column("POINTS_ISSUED", Integer, nullable=False),
    Column("POINTS_REDEEMED", Integer, nullable=False),
    Column("POINTS_REVERSED", Integer, nullable=False),
    Column("POINT_VALUE_MINOR", Integer, nullable=False),
    Column("CURRENCY", String(3), nullable=False),
    Column("CREATED_AT", String(40), nullable=False),
    Column("PUBLISHED_AT", String(40)),                    # NULL until the broker confirmed it to a queue
)
