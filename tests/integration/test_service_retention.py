"""The retention pass of the services that keep an inbox and an outbox in a database of their
own (the loyalty service: LOYALTY_DB_URI; the orders API: ORDERS_API_DB_URI), SQLite and
PostgreSQL: inbox keys past `inbox_days` and outbox rows sent past `relay_sent_days` go;
younger keys, unsent and recently sent rows stay, and so do their records whatever their
age (the LOY_ rows a late return and the settlements need; the orders)."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

import pytest
from nameko.testing.services import worker_factory
from sqlalchemy import func, insert, select, update

from bus.settings import RetentionSettings
from legacy_wrappers import inbox
from legacy_wrappers.legacy_db import create_tables, engine_for
from services.erp import outbox as erp_outbox
from services.erp.retention import LegacyRetention
from services.loyalty import returns, tables
from services.loyalty.service import LoyaltyService
from services.orders import book
from services.orders.api import OrdersApi

pytestmark = pytest.mark.integration

NOW = datetime.now(timezone.utc)


@pytest.mark.parametrize("service_class", [LoyaltyService, OrdersApi])
def test_the_services_pass_prunes_its_keys_and_sent_rows_and_keeps_its_records(legacy_dsn, service_class):
    engine = engine_for(legacy_dsn)
    for metadata in (tables.metadata, inbox.metadata, erp_outbox.metadata, returns.metadata, book.metadata):
        create_tables(engine, metadata)
    old = (NOW - timedelta(days=400)).isoformat()
    with engine.begin() as conn:
        for key, age in (("old", 46), ("young", 44)):
            assert inbox.claim(conn, "loyalty.on_sale_posted", key, f"id-{key}")
            conn.execute(update(inbox.INBOX).where(inbox.INBOX.c.IDEM_KEY == key)
                         .values(RECEIVED_TS=(NOW - timedelta(days=age)).isoformat()))
        for name, sent in (("old_sent", NOW - timedelta(days=8)), ("young_sent", NOW - timedelta(days=6)),
                           ("unsent", None)):
            conn.execute(insert(erp_outbox.OUTBOX).values(EVENT_ID=name, TYPE="case.opened.v1", BODY="{}",
                                                          CREATED_TS=old, SENT_TS=sent and sent.isoformat()))
        conn.execute(insert(tables.ACCRUALS).values(STORE_ID="S001", POS_TXN_ID="T1", LINE_NO=1, CARD="LC1",
                                                    BUSINESS_DAY="2025-11-01", SKU="100001", QUANTITY=1,
                                                    LINE_TOTAL_MINOR=1000, POINTS=10))
        conn.execute(insert(tables.HOLDS).values(HOLD_ID="H1", CARD="LC1", STORE_ID="S001", POS_TXN_ID="T1",
                                                 POINTS=50, STATUS="captured", OFFLINE=0, EXPIRES_AT=old,
                                                 UPDATED_AT=old))
        conn.execute(insert(book.ORDERS).values(
            ORDER_ID="W1", CLIENT="WEB", CUSTOMER_ID="C1", STORE_ID="S001", CURRENCY="EUR", TOTAL_MINOR=1000, POINTS=0,
            POINTS_MINOR=0, PAID_MINOR=1000, PAYMENT_REF="p", REQUEST_HASH="h", BUSINESS_DAY="2025-11-01",
            STATUS="collected", ACCEPTED_AT=old, CLOSED_AT=old, BODY="{}", UPDATED_AT=old))
    retention = LegacyRetention(config_key="the service's own")
    retention.settings = RetentionSettings()  # the defaults: inbox_days 45, relay_sent_days 7
    retention.engine = engine
    service = worker_factory(service_class, retention=retention, db=SimpleNamespace(engine=engine))
    assert {k: v for k, v in service.prune().items() if k != "loyalty_cardless"} == {"inbox": 1, "relay_sent": 1}
    with engine.connect() as conn:
        assert set(conn.execute(select(inbox.INBOX.c.IDEM_KEY)).scalars()) == {"young"}
        assert set(conn.execute(select(erp_outbox.OUTBOX.c.EVENT_ID)).scalars()) == {"young_sent", "unsent"}
        for table in (tables.ACCRUALS, tables.HOLDS, book.ORDERS):
            assert conn.execute(select(func.count()).select_from(table)).scalar() == 1
    assert {k: v for k, v in service.prune().items() if k != "loyalty_cardless"} == {"inbox": 0, "relay_sent": 0}
    engine.dispose()
