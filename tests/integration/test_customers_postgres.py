"""The customer hub's store on PostgreSQL (the default is SQLite): the unit scenarios of
tests/unit/test_customer_mastering.py on a real PostgreSQL database, and two transactions
mastering one new customer at once making one golden record, not two (the mastering lock)."""
from __future__ import annotations

import threading

import pytest
from sqlalchemy import create_engine, text

import tests.unit.test_customer_mastering as scenarios

pytestmark = pytest.mark.integration


@pytest.fixture
def dsn(postgres, request):
    name = f"customers_{abs(hash(request.node.nodeid)) % 10**9}"
    engine = create_engine(postgres, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))  # our own generated name
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    finally:
        engine.dispose()
    return postgres.rsplit("/", 1)[0] + "/" + name


@pytest.mark.timeout(300)
def test_the_hubs_scenarios_hold_on_postgresql(dsn):
    for scenario in (scenarios.test_a_file_row_makes_a_golden_record_and_the_erp_an_account,
                     scenarios.test_a_systems_own_change_coming_back_is_no_change,
                     scenarios.test_one_person_with_two_cards_is_merged_once_and_every_system_learns_the_survivor,
                     scenarios.test_an_uncertain_match_opens_one_case_and_merges_nothing,
                     scenarios.test_a_withdrawn_consent_is_not_granted_again_by_an_older_row):
        hub = scenarios.Hub(dsn)
        with hub.engine.begin() as conn:  # each scenario on empty tables
            conn.execute(text('TRUNCATE "CUS_GOLDEN", "CUS_RECORD", "CUS_KEY", "CUS_HISTORY", "CUS_CASE", "CUS_SEQ", '
                              '"RB_INBOX", "RB_OUTBOX"'))
        scenario(hub)
        hub.engine.dispose()


@pytest.mark.timeout(120)
def test_two_transactions_mastering_one_new_customer_make_one_golden_record(dsn):
    hub = scenarios.Hub(dsn)
    barrier = threading.Barrier(2)
    errors = []

    def master(record_id: str, origin: str):
        try:
            with hub.engine.begin() as conn:
                barrier.wait(10)  # both transactions open before either masters
                statement = scenarios.said(origin, record_id, 1, name="Ada", email="ada@x.org",
                                           **({"loyalty_card": record_id} if origin == "loyalty" else {}))
                scenarios.hub.master(conn, scenarios.CONFIG, [(statement, "01J0TEST")])
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=master, args=args) for args in (("C1", "crm_file"), ("L1", "loyalty"))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    assert hub.golden_id("crm:C1") == hub.golden_id("loyalty:L1")
    assert hub.rows('SELECT count(*) FROM "CUS_GOLDEN"') == [(1,)]
    hub.engine.dispose()
