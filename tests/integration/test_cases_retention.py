"""Retention of business exception cases on SQLite and PostgreSQL (services/cases/store.py
`prune`, run by the service's retention pass): a case resolved before `cases_days` goes with
its history, in batches, oldest first, counted; a case resolved since stays, and an open or
assigned one stays whatever its age. The database itself refuses to delete a case not
resolved, or the history of a case that exists; a database made before retention (whose
trigger refused every DELETE of history) is brought up to these guards when opened."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

import pytest
from nameko.testing.services import worker_factory
from prometheus_client import REGISTRY
from sqlalchemy import func, select, text
from sqlalchemy.exc import DBAPIError

from bus.settings import RetentionSettings
from contracts.cases import CaseOpenedV1
from services.cases import store
from services.cases.service import CasesService

pytestmark = pytest.mark.integration

NOW = datetime.now(timezone.utc)


def pruned(what: str) -> float:
    return REGISTRY.get_sample_value("retailbus_pruned_total", {"what": what}) or 0.0


def case(engine, case_id: str, state: str, days_ago: float) -> str:
    """A case opened `days_ago` + 1 days ago and, by `state`, assigned or resolved `days_ago` days ago."""
    opened, changed = NOW - timedelta(days=days_ago + 1), NOW - timedelta(days=days_ago)
    with engine.begin() as conn:
        assert store.open_case(conn, CaseOpenedV1(case_id=case_id, case_type="return_over_quantity", store_id="S001",
                                                  transaction_id=case_id, summary="3 returned of 2",
                                                  opened_at=opened), opened + timedelta(days=1), "tests", None, opened)
        if state == "assigned":
            store.assign(conn, case_id, "ops", "someone", changed)
        elif state == "resolved":
            store.assign(conn, case_id, "ops", "someone", changed)
            store.resolve(conn, case_id, "refunded by hand", "someone", changed)
    return case_id


def left(engine) -> tuple[set[str], set[str]]:
    """The cases left, and the cases some history is left of."""
    with engine.connect() as conn:
        return (set(conn.execute(select(store.CASES.c.case_id)).scalars()),
                set(conn.execute(select(store.HISTORY.c.case_id).distinct()).scalars()))


@pytest.fixture
def engine(legacy_dsn):
    engine = store.open_engine(legacy_dsn)
    yield engine
    engine.dispose()


def test_resolved_cases_past_their_age_go_with_their_history_open_and_assigned_never(engine):
    kept = {case(engine, "young-resolved", "resolved", 89), case(engine, "old-open", "open", 400),
            case(engine, "old-assigned", "assigned", 400)}
    gone = [case(engine, f"old-resolved-{n}", "resolved", 91 + n) for n in range(5)]
    # the cut-off from the same clock as the rows (a suite reaching this test minutes later must not move it)
    assert store.prune(engine, NOW - timedelta(days=90), 2) == 2
    assert left(engine) == (kept | set(gone[:3]), kept | set(gone[:3]))  # the two oldest, with their history
    assert store.prune(engine, NOW - timedelta(days=90), 10) == 3
    assert store.prune(engine, NOW - timedelta(days=90), 10) == 0
    assert left(engine) == (kept, kept)
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(store.HISTORY)
                            .where(store.HISTORY.c.case_id == "young-resolved")).scalar() == 3  # all of it


def test_the_services_pass_prunes_past_cases_days_in_batches_and_counts_them(engine):
    young, still_open = case(engine, "young", "resolved", 0.5), case(engine, "open", "open", 3)
    for n in range(5):
        case(engine, f"old-{n}", "resolved", 2 + n / 100)
    service = worker_factory(CasesService, book=SimpleNamespace(
        engine=engine, retention=RetentionSettings(cases_days=1, batch=2, max_batches=2)))
    before = pruned("cases")
    assert service.prune()["cases"] == 4  # two batches of two: the fifth waits for the next pass
    assert pruned("cases") == before + 4
    assert service.prune()["cases"] == 1
    assert left(engine)[0] == {young, still_open}


def test_the_database_refuses_to_delete_a_case_not_resolved_or_the_history_of_a_kept_case(engine):
    case(engine, "open", "open", 400)
    case(engine, "resolved", "resolved", 400)
    for statement, refusal in (("DELETE FROM cases WHERE case_id = 'open'", "only a resolved case"),
                               ("DELETE FROM case_history WHERE case_id = 'resolved'", "append-only")):
        with pytest.raises(DBAPIError, match=refusal), engine.begin() as conn:
            conn.execute(text(statement))
    assert left(engine) == ({"open", "resolved"}, {"open", "resolved"})


def test_a_database_made_before_retention_is_given_the_new_guards_when_opened(engine, legacy_dsn):
    with engine.begin() as conn:  # the guards as they were: every DELETE of history refused, no case guarded
        if engine.dialect.name == "sqlite":
            conn.execute(text("DROP TRIGGER case_history_no_delete"))
            conn.execute(text("DROP TRIGGER cases_keep_unresolved"))
            conn.execute(text("CREATE TRIGGER case_history_no_delete BEFORE DELETE ON case_history "
                              "BEGIN SELECT RAISE(ABORT, 'case_history is append-only'); END"))
        else:
            conn.execute(text("DROP TRIGGER cases_keep_unresolved ON cases"))
            conn.execute(text("CREATE OR REPLACE FUNCTION case_history_append_only() RETURNS trigger "
                              "LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'case_history is append-only'; END $$"))
    case(engine, "old", "resolved", 400)
    with pytest.raises(DBAPIError, match="append-only"):
        store.prune(engine, NOW - timedelta(days=90), 10)
    reopened = store.open_engine(legacy_dsn)
    try:
        assert store.prune(reopened, NOW - timedelta(days=90), 10) == 1
        case(reopened, "open", "open", 400)
        with pytest.raises(DBAPIError, match="only a resolved case"), reopened.begin() as conn:
            conn.execute(text("DELETE FROM cases"))
        assert left(reopened) == ({"open"}, {"open"})
    finally:
        reopened.dispose()
