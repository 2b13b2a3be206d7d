"""Retention (bus/retention.py and each store's prune): real SQLite files and real
folders; rows and files past their age go, younger ones and unfinished ones never,
in batches, counted in retailbus_pruned_total{what}; the settings refuse an inbox or
ledger retention shorter than a message can come back."""
from __future__ import annotations

import os
import sqlite3
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import insert, select, update

from contracts.envelope import CloudEvent
from contracts.journal import JournalHopsV1
from legacy_wrappers import inbox
from legacy_wrappers.filedrop.ledger import Ledger
from legacy_wrappers.filedrop.retention import prune_archive, prune_outbound
from legacy_wrappers.legacy_db import engine_for
from routing.outbox import Outbox
from bus.retention import before, in_batches
from bus.settings import ConfigError, RetailbusSettings, retailbus_settings
from services.erp import outbox as erp_outbox
from services.journal import store as journal

pytestmark = pytest.mark.unit

NOW = datetime.now(timezone.utc)


def pruned(what: str) -> float:
    return REGISTRY.get_sample_value("retailbus_pruned_total", {"what": what}) or 0.0


# -- the settings: keys outlive redeliveries ---------------------------------------------

def test_an_inbox_retention_inside_the_redelivery_horizon_is_refused_naming_why():
    with pytest.raises(ConfigError) as info:
        retailbus_settings({"RETAILBUS": {"agent": {"retention_days": 30}, "retention": {"inbox_days": 20}}})
    assert "retention.inbox_days: 20 days is shorter than a message can be redelivered: 37" in str(info.value)
    assert "agent.retention_days 30 + retention.dlq_days 7" in str(info.value)


def test_the_horizon_grows_with_a_handlers_retry_schedule_and_covers_the_ledger_too():
    base = {"agent": {"retention_days": 3}, "retention": {"dlq_days": 0, "inbox_days": 3.001, "ledger_days": 3.001}}
    assert RetailbusSettings.model_validate(base).redelivery_days() == pytest.approx(3 + 36 / 86400)
    slow = {**base, "handlers": {"erp.on_pos_sale": {"attempts": 50, "delays": [3600]}}}  # 49 hours of retries
    with pytest.raises(ValueError, match="retention.inbox_days: 3.001 days is shorter"):
        RetailbusSettings.model_validate(slow)
    with pytest.raises(ValueError, match="retention.ledger_days: 1 days is shorter"):
        RetailbusSettings.model_validate({"retention": {"ledger_days": 1}})
    with pytest.raises(ValueError, match="move_to: required"):
        RetailbusSettings.model_validate({"retention": {"files_action": "move"}})


def test_in_batches_stops_at_a_short_batch_or_the_pass_limit_and_counts():
    before_count, calls = pruned("test_rows"), []
    assert in_batches("test_rows", lambda n: calls.append(n) or n, batch=10, max_batches=3) == 30
    assert len(calls) == 3 and pruned("test_rows") == before_count + 30
    left = iter([10, 4, 10])
    assert in_batches("test_rows", lambda n: next(left), batch=10, max_batches=9) == 14


def test_a_kind_is_exported_at_zero_from_its_first_pass_so_a_dashboard_shows_it():
    assert REGISTRY.get_sample_value("retailbus_pruned_total", {"what": "test_nothing_yet"}) is None
    assert in_batches("test_nothing_yet", lambda n: 0, batch=10, max_batches=3) == 0
    assert REGISTRY.get_sample_value("retailbus_pruned_total", {"what": "test_nothing_yet"}) == 0.0


# -- inbox keys -----------------------------------------------------------------------------

def claim_at(engine, key: str, received: datetime):
    inbox.ensure_inbox(engine)
    with engine.begin() as conn:
        assert inbox.claim(conn, "erp.on_pos_sale", key, f"id-{key}")
        conn.execute(update(inbox.INBOX).where(inbox.INBOX.c.IDEM_KEY == key)
                     .values(RECEIVED_TS=received.isoformat()))


def keys(engine) -> set[str]:
    with engine.connect() as conn:
        return set(conn.execute(select(inbox.INBOX.c.IDEM_KEY)).scalars())


def test_an_inbox_key_inside_the_redelivery_horizon_is_never_pruned(tmp_path):
    """With the shortest inbox retention the settings accept, a key a minute short of the
    horizon stays (its message may still come back), one a minute past it goes."""
    settings = RetailbusSettings.model_validate({"retention": {"inbox_days": 37.001}})
    horizon = timedelta(days=settings.redelivery_days())
    engine = engine_for(f"sqlite:///{tmp_path / 'legacy.db'}")
    claim_at(engine, "inside", NOW - horizon + timedelta(minutes=1))
    claim_at(engine, "past", NOW - horizon - timedelta(days=0.001, minutes=1))
    claim_at(engine, "fresh", NOW)
    # the cut-off from the same clock as the keys (NOW is taken at import: the suite may reach
    # this test many minutes later, which moved a cut-off from the real clock past "inside")
    assert inbox.prune(engine, before(settings.retention.inbox_days, NOW), 100) == 1
    assert keys(engine) == {"inside", "fresh"}


def test_inbox_keys_go_in_batches_oldest_first(tmp_path):
    engine = engine_for(f"sqlite:///{tmp_path / 'legacy.db'}")
    for n in range(7):
        claim_at(engine, f"old-{n}", NOW - timedelta(days=50, minutes=n))
    claim_at(engine, "young", NOW - timedelta(days=1))
    assert inbox.prune(engine, before(45), 3) == 3
    assert keys(engine) == {"old-0", "old-1", "old-2", "old-3", "young"}  # the three oldest went
    assert in_batches("inbox", lambda n: inbox.prune(engine, before(45), n), 3, 10) == 4
    assert keys(engine) == {"young"}


# -- the erp's sent relay rows -------------------------------------------------------------

def test_sent_relay_rows_go_past_their_age_unsent_ones_never(tmp_path):
    engine = engine_for(f"sqlite:///{tmp_path / 'legacy.db'}")
    erp_outbox.metadata.create_all(engine)
    rows = {"old_sent": (NOW - timedelta(days=8)).isoformat(), "young_sent": NOW.isoformat(), "old_unsent": None}
    with engine.begin() as conn:
        for name, sent in rows.items():
            conn.execute(insert(erp_outbox.OUTBOX).values(EVENT_ID=name, TYPE="t.v1", BODY="{}", SENT_TS=sent,
                                                          CREATED_TS=(NOW - timedelta(days=9)).isoformat()))
    assert erp_outbox.prune_sent(engine, before(7), 100) == 1
    with engine.connect() as conn:
        assert set(conn.execute(select(erp_outbox.OUTBOX.c.EVENT_ID)).scalars()) == {"young_sent", "old_unsent"}


# -- the journal ----------------------------------------------------------------------------

def hops(engine, times: list[float]):
    batch = JournalHopsV1.model_validate({"hops": [
        {"id": f"m{n}", "hop": "written", "outcome": "ok", "time": t, "items": [{"key": f"k{n}", "row": 1}]}
        for n, t in enumerate(times)]})
    with engine.begin() as conn:
        journal.write(conn, batch, "files")


def test_journal_hops_and_their_refs_go_past_their_age(tmp_path):
    engine = journal.open_engine(f"sqlite:///{tmp_path / 'journal.db'}")
    now = time.time()
    hops(engine, [now - 9 * 86400, now - 8 * 86400, now - 60])
    assert journal.prune(engine, before(7).timestamp(), 100) == 2
    with engine.connect() as conn:
        assert [r.id for r in conn.execute(select(journal.HOPS))] == ["m2"]
        assert [r.ref for r in conn.execute(select(journal.REFS))] == ["k2"]


def test_journal_over_its_size_cap_loses_its_oldest_hops_whatever_their_age(tmp_path):
    engine = journal.open_engine(f"sqlite:///{tmp_path / 'journal.db'}")
    hops(engine, [time.time()] * 2000)
    full = journal.used_bytes(engine)
    assert journal.prune(engine, None, 1500) == 1500
    assert journal.used_bytes(engine) < full
    with engine.connect() as conn:
        assert [r.id for r in conn.execute(select(journal.HOPS.c.id).order_by(journal.HOPS.c.pk))][0] == "m1500"


# -- the file-drop ledger -------------------------------------------------------------------

def test_ledger_forgets_old_written_files_keys_never_pending_or_young_ones(tmp_path):
    ledger = Ledger(tmp_path / "filedrops.db")
    ledger.out_pending("points", "OLD.dat", [f"old-{n}" for n in range(5)])
    ledger.out_written("points", "OLD.dat")
    ledger.out_pending("points", "PENDING.dat", ["pending-1"])
    ledger.begin("customers", "a" * 64, "c.csv", 10, 0)  # in progress
    ledger.finish("customers", "b" * 64, "d.csv", "done")
    db = sqlite3.connect(tmp_path / "filedrops.db")
    old = (NOW - timedelta(days=50)).isoformat()
    for table in ("FD_OUT_FILE", "FD_FILE"):
        db.execute(f'UPDATE "{table}" SET "UPDATED_TS" = ?', (old,))
    db.commit()
    ledger.out_pending("points", "YOUNG.dat", ["young-1"])
    ledger.out_written("points", "YOUNG.dat")
    cutoff = before(45).isoformat()
    assert ledger.prune(cutoff, 3) == 4  # one done file record, three keys of OLD.dat (its record stays)
    assert ledger.prune(cutoff, 3) == 3  # two keys more, then OLD.dat's record
    assert ledger.prune(cutoff, 3) == 0
    assert ledger.written_keys("points", ["old-0", "old-4", "pending-1", "young-1"]) == {"pending-1", "young-1"}
    assert ledger.out_pending_files("points") == ["PENDING.dat"]
    assert ledger.file("customers", "a" * 64)["STATE"] == "in_progress" and ledger.file("customers", "b" * 64) is None
    ledger.close()


# -- files: handed-over outbound files, the inbound archive -----------------------------------

def aged(path: Path, days: float, text: str = "x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    when = time.time() - days * 86400
    os.utime(path, (when, when))
    return path


def test_handed_over_outbound_files_go_past_their_age_with_their_markers(tmp_path):
    out = tmp_path / "loyalty_out"
    old, young, unmarked = aged(out / "POINTS_1.dat", 31), aged(out / "POINTS_2.dat", 1), aged(out / "POINTS_3.dat", 31)
    aged(out / "POINTS_1.dat.done", 31)
    aged(out / "POINTS_2.dat.done", 1)
    gone = []
    assert prune_outbound(out, "POINTS", ".dat", ".done", time.time() - 30 * 86400, 10,
                          lambda p: gone.append(p.name) or p.unlink()) == 1
    assert gone == ["POINTS_1.dat", "POINTS_1.dat.done"] and not old.exists()
    assert young.exists() and unmarked.exists()  # not handed over yet: never


def test_archive_days_past_their_age_go_and_emptied_folders_with_them(tmp_path):
    drop = tmp_path / "customers"
    today = NOW.date()
    for days in (40, 35, 0):
        day = (today - timedelta(days=days)).isoformat()
        for n in range(3):
            aged(drop / "archive" / day / f"c{n}.csv", days)
    moved = tmp_path / "moved"

    def retire(path: Path):
        (moved / path.parent.name).mkdir(parents=True, exist_ok=True)
        path.rename(moved / path.parent.name / path.name)
    assert prune_archive(drop, (NOW - timedelta(days=30)).date(), 4, retire) == 4
    assert prune_archive(drop, (NOW - timedelta(days=30)).date(), 4, retire) == 2
    assert sorted(p.name for p in (drop / "archive").iterdir()) == [today.isoformat()]
    assert len(list(moved.rglob("*.csv"))) == 6


# -- the store's outbox: batches of sent rows, the WAL when idle ------------------------------

def test_store_outbox_compacts_in_batches_oldest_sent_first_never_unsent(tmp_path):
    box = Outbox(tmp_path / "outbox.db", retention_days=1)
    try:
        for n in range(10):
            box.accept(CloudEvent.new("test.thing.v1", "x", {"n": n}, idempotencykey=f"k{n}"))
        box.mark_sent(list(range(1, 8)))  # 8, 9, 10 stay unsent
        later = time.time() + 2 * 86400
        assert box.compact(now=later, limit=4) == 4
        assert box.compact(now=later, limit=4) == 3
        assert box.compact(now=later, limit=4) == 0
        assert box.compact(now=time.time(), limit=4) == 0
        assert [e.seq for e in box.unsent(100)] == [8, 9, 10]
    finally:
        box.close()


def test_an_idle_outbox_checkpoint_truncates_its_wal(tmp_path):
    box = Outbox(tmp_path / "outbox.db")
    try:
        for n in range(200):
            box.accept(CloudEvent.new("test.thing.v1", "x", {"n": n, "pad": "p" * 2000}, idempotencykey=f"k{n}"))
        wal = tmp_path / "outbox.db-wal"
        box.checkpoint()
        assert wal.stat().st_size > 100_000  # a passive checkpoint keeps the file's size
        box.checkpoint(truncate=True)
        assert wal.stat().st_size == 0
        assert len(box.unsent(1000)) == 200
    finally:
        box.close()
