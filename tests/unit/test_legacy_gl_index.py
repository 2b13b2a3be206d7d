"""Reconciliation's loyalty side joins a day's sales to their GL postings on GL_PST.DOC_NO
(services/reconcile/loyalty_sources.py): the legacy schema indexes it, and a database made
before the index gains it, so SQLite searches the postings of each sale instead of scanning
the whole table once per sale (bench/README.md has the figures)."""
from __future__ import annotations

from datetime import date

import pytest
from sqlalchemy import func, insert, inspect, select

from demo.legacy_erp import schema
from services.reconcile.loyalty_sources import GL_PST, LOYALTY_ACCOUNT, SLS_HDR, erp_loyalty_tenders

pytestmark = pytest.mark.unit


def plan(engine) -> str:
    """SQLite's plan of erp_loyalty_tenders' query."""
    h, g = SLS_HDR.c, GL_PST.c
    query = (select(h.POS_TXN_ID, func.sum(g.DR_CENTS)).join_from(SLS_HDR, GL_PST, g.DOC_NO == h.DOC_NO)
             .where(h.STORE_NO == "S001", h.TXN_DATE == "20261205", h.DOC_TYPE == "S", h.CHANNEL == "RBUS",
                    g.ACCOUNT == LOYALTY_ACCOUNT, g.DR_CENTS > 0).group_by(h.POS_TXN_ID))
    with engine.connect() as conn:
        sql = str(query.compile(engine, compile_kwargs={"literal_binds": True}))
        return " | ".join(row[-1] for row in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + sql))


def test_an_older_database_gains_the_index_and_the_join_searches_by_it(tmp_path):
    engine = schema.engine_for(f"sqlite:///{tmp_path / 'legacy.db'}")
    schema.create_schema(engine)
    with engine.begin() as conn:  # as a database made before the index was
        conn.exec_driver_sql('DROP INDEX "IX_GL_PST_DOC"')
        conn.execute(insert(schema.SLS_HDR), [dict(
            DOC_NO=f"S{n:09d}", DOC_TYPE="S", STORE_NO="S001", TERM_NO="01", POS_TXN_ID=f"T{n}",
            TXN_DATE="20261205", TOTAL_CENTS=100, CURRENCY="EUR", CHANNEL="RBUS", CREATED_TS="x") for n in range(3)])
        conn.execute(insert(schema.GL_PST), [dict(DOC_NO=f"S{n // 2:09d}", ACCOUNT=("1300", "4000")[n % 2],
                                                  DR_CENTS=10 + n, CR_CENTS=0, POST_DATE="20261205")
                                             for n in range(6)])
    assert "SCAN GL_PST" in plan(engine)
    schema.create_schema(engine)
    assert "IX_GL_PST_DOC" in {i["name"] for i in inspect(engine).get_indexes("GL_PST")}
    assert "SEARCH GL_PST USING INDEX IX_GL_PST_DOC" in plan(engine) and "SCAN GL_PST" not in plan(engine)
    assert erp_loyalty_tenders(engine, "S001", date(2026, 12, 5)) == {"T0": 10, "T1": 12, "T2": 14}
    engine.dispose()
