"""legacy_db.pairs_in: a batch's look-up of (a, b) pairs searches the index on (a, b). SQLite
scans the table for a list of row values; the ERP's duplicate check (SLS_HDR), its stock check
(STK_LVL), its return links and the inbox's prune did so once per batch, a cost that grew with
every sale ever posted (issue 25)."""
from __future__ import annotations

import pytest
import sqlalchemy as sa

from legacy_wrappers import inbox
from legacy_wrappers.legacy_db import pairs_in
from services.erp import ledger, return_links
from tests.unit.test_ledger import make_db

pytestmark = pytest.mark.unit


def plans_of(engine, run) -> list[list[str]]:
    """The query plan of each statement `run(conn)` executes on `engine`."""
    statements = []
    listener = lambda conn, cursor, sql, params, *_: statements.append((sql, params))  # noqa: E731
    sa.event.listen(engine, "before_cursor_execute", listener)
    with engine.connect() as conn:
        run(conn)
    sa.event.remove(engine, "before_cursor_execute", listener)
    with engine.connect() as conn:
        return [[row[-1] for row in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}", params)]
                for sql, params in statements if sql.lstrip().upper().startswith(("SELECT", "DELETE"))]


def searched(plan: list[str], table: str) -> bool:
    return any(step.startswith(f"SEARCH {table} USING") for step in plan) and \
        not any(step.startswith(f"SCAN {table}") for step in plan)


def test_the_pairs_asked_for_and_only_those_are_found(tmp_path):
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'p.db'}")
    md = sa.MetaData()
    table = sa.Table("T", md, sa.Column("A", sa.String, primary_key=True), sa.Column("B", sa.String, primary_key=True))
    md.create_all(engine)
    with engine.begin() as conn:
        conn.execute(table.insert(), [{"A": f"S{a}", "B": f"T{b}"} for a in range(20) for b in range(50)])
    asked = [("S1", "T1"), ("S1", "T2"), ("S7", "T1"), ("S7", "T99"), ("S99", "T1")]
    with engine.connect() as conn:
        found = set(map(tuple, conn.execute(sa.select(table).where(pairs_in(table.c.A, table.c.B, asked)))))
        assert conn.execute(sa.select(table).where(pairs_in(table.c.A, table.c.B, []))).all() == []
    assert found == {("S1", "T1"), ("S1", "T2"), ("S7", "T1")}
    plans = plans_of(engine, lambda conn: conn.execute(sa.select(table).where(pairs_in(table.c.A, table.c.B, asked))))
    assert searched(plans[0], "T"), plans


def test_the_erps_batch_look_ups_search_their_indexes(tmp_path):
    engine, t = make_db(tmp_path / "erp.db")
    return_links.metadata.create_all(engine)
    inbox.metadata.create_all(engine)
    keys = [("S001", "S", f"S001-07-{n:06d}") for n in range(40)] + [("S002", "S", "S002-01-000001")]
    plans = plans_of(engine, lambda conn: ledger.existing_documents(conn, t, keys))
    assert plans and all(searched(p, "SLS_HDR") for p in plans), plans
    plans = plans_of(engine, lambda conn: ledger.known_stock(conn, t, [("S001", "100001"), ("S002", "100002")]))
    assert plans and all(searched(p, "STK_LVL") for p in plans), plans
    plans = plans_of(engine, lambda conn: return_links.link(conn, t.header, {("S001", "S001-07-000001"): "S00000001"}))
    assert plans and searched(plans[0], return_links.TABLE.name), plans
    plans = plans_of(engine, lambda conn: conn.execute(sa.delete(inbox.INBOX).where(
        pairs_in(inbox.INBOX.c.CONSUMER, inbox.INBOX.c.IDEM_KEY, [("erp", "k1"), ("erp", "k2")]))))
    assert plans and searched(plans[0], "RB_INBOX"), plans
    engine.dispose()
