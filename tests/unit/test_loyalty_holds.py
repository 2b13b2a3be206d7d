"""accrual.holds_of: a batch of posted sales finds its holds by the POS id's index, so its
cost does not grow with every hold ever taken (LOY_HOLD never shrinks: issue 25)."""
from __future__ import annotations

import pytest
from sqlalchemy import create_engine, event

from services.loyalty import accrual
from services.loyalty.tables import HOLDS, metadata

pytestmark = pytest.mark.unit


def hold(hold_id: str, store: str, pos: str, status: str = "held", offline: int = 0) -> dict:
    return dict(HOLD_ID=hold_id, CARD="LC1", STORE_ID=store, POS_TXN_ID=pos, POINTS=100, STATUS=status,
                OFFLINE=offline, EXPIRES_AT="2030-01-01T00:00:00+00:00", UPDATED_AT="2026-12-07T10:00:00+00:00")


@pytest.fixture
def engine(tmp_path):
    engine = create_engine(f"sqlite:///{tmp_path / 'loyalty.db'}")
    metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(HOLDS.insert(), [hold(f"old{n}", "S001", f"OLD-{n}", status="captured") for n in range(2000)])
        conn.execute(HOLDS.insert(), [hold("h1", "S001", "T-1"), hold("h2", "S001", "T-1", status="released"),
                                      hold("h3", "S002", "T-1"), hold("h4", "S001", "T-2", "captured", offline=1)])
    yield engine
    engine.dispose()


def test_each_sale_gets_its_own_stores_holds_and_whether_it_redeemed_offline(engine):
    found = accrual.holds_of(engine, [("S001", "T-1"), ("S001", "T-2"), ("S003", "T-9")])
    assert {k: ([h["HOLD_ID"] for h in held], offline) for k, (held, offline) in found.items()} == {
        ("S001", "T-1"): (["h1"], False),   # h3: the same POS id at another store; h2: released
        ("S001", "T-2"): ([], True),
        ("S003", "T-9"): ([], False)}


def test_the_look_up_searches_the_index_and_never_scans_the_holds(engine):
    statements = []
    event.listen(engine, "before_cursor_execute",
                 lambda conn, cursor, sql, params, *_: statements.append((sql, params)))
    accrual.holds_of(engine, [("S001", f"T-{n}") for n in range(50)])
    (sql, params), = [s for s in statements if "LOY_HOLD" in s[0]]
    with engine.connect() as conn:
        plan = [row[-1] for row in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}", params)]
    assert not any(step.startswith("SCAN LOY_HOLD") for step in plan), plan
    assert any("USING INDEX" in step for step in plan), plan
