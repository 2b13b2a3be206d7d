"""Two orders racing for the last units (services/erp/reservations.py) on SQLite and PostgreSQL:
while one reservation's transaction is open, the other waits for it (the write lock on SQLite,
the stock rows' lock on PostgreSQL) and then finds the stock taken: never both."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa
from eventlet import patcher

from demo.legacy_erp.schema import create_schema, engine_for as legacy_engine, seed_demo_data
from legacy_wrappers.legacy_db import engine_for
from services.erp import reservations

pytestmark = pytest.mark.integration

real_threading = patcher.original("threading")  # a blocking database call must not stop the test's hub


@pytest.mark.timeout(120)
def test_a_reservation_waits_for_the_one_in_flight_and_never_oversells(legacy_dsn):
    setup = legacy_engine(legacy_dsn)
    create_schema(setup)
    with setup.begin() as conn:
        seed_demo_data(conn)
        conn.execute(sa.text("UPDATE \"STK_LVL\" SET \"ON_HAND\" = 3 WHERE \"STORE_NO\" = 'S001' AND \"SKU\" = '100001'"))
    setup.dispose()
    first, second = engine_for(legacy_dsn), engine_for(legacy_dsn)  # two connections, as two erp processes
    md = sa.MetaData()
    md.reflect(first, only=("STK_LVL", "STK_RSV"))
    stock, rsv = md.tables["STK_LVL"], md.tables["STK_RSV"]
    now = datetime.now(timezone.utc)
    until = now + timedelta(hours=1)
    outcome = {}

    def race():
        with second.begin() as conn:
            outcome["second"] = reservations.reserve(conn, stock, rsv, "W-2", "S001", [("100001", 2)], until, now)

    try:
        with first.begin() as conn:
            assert reservations.reserve(conn, stock, rsv, "W-1", "S001", [("100001", 2)], until, now).levels
            racer = real_threading.Thread(target=race)
            racer.start()
            racer.join(1.5)
            assert racer.is_alive(), "the second reservation did not wait for the first"
        racer.join(60)
        assert outcome["second"].shortages == [("100001", 2, 1)] and not outcome["second"].levels
        with first.connect() as conn:
            assert conn.execute(sa.select(sa.func.sum(rsv.c.QTY))).scalar() == 2
    finally:
        first.dispose()
        second.dispose()
