"""Retention of process instances on SQLite and PostgreSQL (bus/process/store.py
`prune_completed`, run by the manager's `prune`): a completed instance last changed before
`process_days` goes with its history, in batches, oldest first, counted; a younger completed
one stays, and a running, compensating or failed one stays whatever its age."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import func, inspect, select, update

from bus.process import store
from bus.process.manager import prune
from bus.settings import RetentionSettings
from tests.integration.test_process_store import process_db  # noqa: F401  (the fixture: SQLite, PostgreSQL)

pytestmark = pytest.mark.integration

NOW = datetime.now(timezone.utc)


def pruned(what: str) -> float:
    return REGISTRY.get_sample_value("retailbus_pruned_total", {"what": what}) or 0.0


def instance(engine, key: str, state: str, days_old: float) -> str:
    """An instance of `state` last changed `days_old` days ago, with two history rows."""
    inst = store.Instance(f"P-{key}", "returns", key, state, 0, 0, 0, {}, [{"status": "done"}], None, "t", "")
    with store.transaction(engine) as conn:
        assert store.insert_new(conn, inst)
        inst.note(None, "started")
        inst.note("one", "sent")
        store.write(conn, store.save(conn, inst), [])
        conn.execute(update(store.INSTANCES).where(store.INSTANCES.c.PROCESS_ID == inst.process_id)
                     .values(UPDATED_AT=(NOW - timedelta(days=days_old)).isoformat()))
    return inst.process_id


def left(engine) -> tuple[set[str], dict[str, int]]:
    """The instances left, and their history rows per instance."""
    with engine.connect() as conn:
        ids = set(conn.execute(select(store.INSTANCES.c.PROCESS_ID)).scalars())
        h = store.HISTORY.c
        history = dict(conn.execute(select(h.PROCESS_ID, func.count()).group_by(h.PROCESS_ID)).all())
    return ids, history


def test_completed_instances_past_their_age_go_with_their_history_the_others_stay(process_db):
    _, engine = process_db
    kept = {instance(engine, "young-done", "completed", 29),
            *(instance(engine, f"old-{state}", state, 400) for state in ("running", "compensating", "failed"))}
    gone = [instance(engine, f"old-done-{n}", "completed", 31 + n) for n in range(5)]
    # the cut-off from the same clock as the rows (a suite reaching this test minutes later must not move it)
    assert store.prune_completed(engine, NOW - timedelta(days=30), 2) == 2
    ids, history = left(engine)
    assert ids == kept | set(gone[:3])  # the two oldest went first
    assert set(history) == ids and all(n == 2 for n in history.values())  # their history with them, no other
    assert store.prune_completed(engine, NOW - timedelta(days=30), 10) == 3
    assert store.prune_completed(engine, NOW - timedelta(days=30), 10) == 0
    ids, history = left(engine)
    assert ids == kept and set(history) == kept


def test_the_managers_pass_prunes_past_process_days_in_batches_and_counts_them(process_db):
    _, engine = process_db
    young = instance(engine, "young", "completed", 0.5)
    failed = instance(engine, "failed", "failed", 3)
    for n in range(5):
        instance(engine, f"old-{n}", "completed", 2 + n / 100)
    before = pruned("process_instances")
    settings = RetentionSettings(process_days=1, batch=2, max_batches=2)
    assert prune(engine, settings)["process_instances"] == 4  # two batches of two: the fifth waits
    assert pruned("process_instances") == before + 4
    assert prune(engine, settings)["process_instances"] == 1
    assert left(engine)[0] == {young, failed}


def test_a_database_made_before_the_retention_index_gains_it(process_db):
    _, engine = process_db
    with engine.begin() as conn:
        conn.exec_driver_sql('DROP INDEX "IX_RB_PROCESS_DONE"')
    store.create(engine)
    assert "IX_RB_PROCESS_DONE" in {i["name"] for i in inspect(engine).get_indexes("RB_PROCESS")}
