"""Retention of the returns service's receipt-less counts (RET_RECEIPTLESS, services/returns/
policy.py) on SQLite and PostgreSQL: a row goes once its business day is older than the
policy's period plus the longest a return can still arrive late (`receiptless_days`), in
batches, counted as `returns_receiptless`; a row any return still to be judged counts stays,
so the latest return that can arrive counts what it counted before the pass."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

import pytest
from nameko.testing.services import worker_factory
from prometheus_client import REGISTRY
from sqlalchemy import insert, select

from bus.process import store
from bus.settings import retailbus_settings
from contracts.pos import PosReturnV1
from legacy_wrappers.legacy_db import create_tables, engine_for
from services.returns import policy
from services.returns.service import ReturnsService
from tests.unit.contract_examples import valid_return

pytestmark = pytest.mark.integration

TODAY = datetime.now(timezone.utc).date()
SETTINGS = {"RETAILBUS": {"retention": {"batch": 2, "max_batches": 2}}}
LATE = retailbus_settings(SETTINGS).redelivery_days()  # agent.retention_days + dlq_days + retries
PERIOD = policy.ReturnPolicy().receiptless.period_days


def pruned(what: str) -> float:
    return REGISTRY.get_sample_value("retailbus_pruned_total", {"what": what}) or 0.0


@pytest.fixture
def engine(legacy_dsn):
    engine = engine_for(legacy_dsn)
    create_tables(engine, policy.metadata)
    yield engine
    engine.dispose()


def counted(engine, txn: str, days_old: float, customer: str = "C1", amount: int = 1000) -> None:
    with engine.begin() as conn:
        conn.execute(insert(policy.RECEIPTLESS).values(
            STORE_ID="S001", POS_TXN_ID=txn, CUSTOMER=customer, AMOUNT_MINOR=amount,
            BUSINESS_DAY=(TODAY - timedelta(days=int(days_old))).isoformat()))


def left(engine) -> set[str]:
    with engine.connect() as conn:
        return set(conn.execute(select(policy.RECEIPTLESS.c.POS_TXN_ID)).scalars())


def the_services_pass(engine, config: policy.ReturnsConfig | None = None) -> int:
    service = worker_factory(ReturnsService, config=SETTINGS, policy=SimpleNamespace(config=config or policy.ReturnsConfig()),
                             returns=SimpleNamespace(transaction=lambda: store.transaction(engine)))
    return service.prune()


def test_counts_older_than_any_period_still_judged_go_in_batches_the_others_stay(engine):
    keep = policy.receiptless_days(policy.ReturnPolicy(), LATE)
    assert keep == PERIOD + LATE + 1
    # the latest a return can still be judged: its business day LATE days ago; its period before that
    latest = TODAY - timedelta(days=int(LATE))
    for n in range(PERIOD):
        counted(engine, f"in-period-{n}", LATE + n)
    for n in range(5):
        counted(engine, f"old-{n}", keep + 1 + n)
    before = pruned("returns_receiptless")
    assert the_services_pass(engine) == 4  # two batches of two: the fifth waits
    assert pruned("returns_receiptless") == before + 4
    assert the_services_pass(engine) == 1
    assert the_services_pass(engine) == 0
    assert left(engine) == {f"in-period-{n}" for n in range(PERIOD)}
    late = PosReturnV1.model_validate({**valid_return(pos_txn_id="late", business_day=latest.isoformat(),
                                                      customer_id="C1"), "original": None})
    with engine.begin() as conn:  # the period of the latest return: every row of it still counted
        assert policy.receiptless_in_period(conn, late, PERIOD) == (PERIOD + 1, 1000 * PERIOD + 500)


def test_a_longer_period_in_force_keeps_its_rows(engine):
    counted(engine, "inside-90", 90 + LATE)
    counted(engine, "outside-90", 92 + LATE)
    longer = policy.ReturnsConfig.model_validate({"policy": {"receiptless": {"period_days": 90}}})
    assert the_services_pass(engine, longer) == 1
    assert left(engine) == {"inside-90"}
