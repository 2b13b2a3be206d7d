"""table_changes on a real SQLite file in a real nameko container (no broker needed):
the overlap rescan finds a late commit, then pauses once the watermark has settled."""
from __future__ import annotations

import time
from datetime import datetime, timedelta

import pytest
import sqlalchemy as sa
from nameko.containers import ServiceContainer

from legacy_wrappers import table_changes as tc
from legacy_wrappers.legacy_db import engine_for

pytestmark = pytest.mark.unit

OVERLAP, INTERVAL = 1.0, 0.05
T0 = datetime(2026, 11, 27, 10, 15)  # every first row's stamp: the watermark after the first batch
ITEMS = sa.Table("ITEMS", sa.MetaData(), sa.Column("K", sa.String(8), primary_key=True),
                 sa.Column("V", sa.Integer), sa.Column("UPD_TS", sa.String(32)))
captured: list[tuple] = []
late_commit: list = []  # the engine the first worker commits a late row with, once


class ItemsService:
    name = "items"

    @tc.table_changes("ITEMS", key=("K",), interval=INTERVAL, overlap=OVERLAP)
    def on_items(self, changes):
        captured.extend((c.row["K"], c.row["V"]) for c in changes)
        if late_commit:  # a legacy transaction stamped before the watermark commits only now
            with late_commit.pop().begin() as conn:
                conn.execute(ITEMS.insert(), {"K": "late", "V": 99, "UPD_TS": stamp(T0, -OVERLAP / 2)})


def stamp(at: datetime, seconds: float = 0.0) -> str:
    return (at + timedelta(seconds=seconds)).isoformat(timespec="microseconds")


def wait_for(predicate, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_rescans_find_a_late_commit_then_pause_until_the_watermark_moves(tmp_path, monkeypatch):
    """The late row commits while the first batch is being handled, stamped half the
    overlap before the watermark that batch sets: only a rescan can find it, whatever
    the machine's load. Then, the watermark settled, polls go on without rescans."""
    rescans, polls, found = [], [], []
    rescan, poll_once, handle = tc.TableChanges._rescan, tc.TableChanges.poll_once, tc.TableChanges._handle
    monkeypatch.setattr(tc.TableChanges, "_rescan", lambda self, low: (rescans.append(low), rescan(self, low)))
    monkeypatch.setattr(tc.TableChanges, "poll_once", lambda self: (polls.append(1), poll_once(self))[1])
    monkeypatch.setattr(tc.TableChanges, "_handle", lambda self, rows, kind: (
        found.extend((kind, r["K"]) for r in rows), handle(self, rows, kind))[1])
    captured.clear()
    engine = engine_for(f"sqlite:///{tmp_path / 'legacy.db'}")
    ITEMS.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(ITEMS.insert(), [{"K": f"k{i}", "V": i, "UPD_TS": stamp(T0)} for i in range(5)])
    late_commit[:] = [engine]
    container = ServiceContainer(ItemsService, {"LEGACY_DB_URI": str(engine.url)})
    container.start()
    capture = next(iter(container.entrypoints))
    try:
        wait_for(lambda: ("late", 99) in captured)
        assert ("late", "late") in found and ("new", "late") not in found, found  # found by a rescan
        assert capture.watermark == (stamp(T0), "k4")
        wait_for(lambda: capture._last_rescan > capture._settles_at)  # settled: a rescan after it
        settled, polled = len(rescans), len(polls)
        wait_for(lambda: len(polls) >= polled + 20)
        assert len(rescans) == settled  # a quiet table is not re-read every interval
        with engine.begin() as conn:
            conn.execute(ITEMS.update().where(ITEMS.c.K == "k1").values(V=11, UPD_TS=stamp(T0, 1)))
        wait_for(lambda: ("k1", 11) in captured)
        wait_for(lambda: len(rescans) > settled)  # the watermark moved: rescans resume
    finally:
        container.stop()
        engine.dispose()
    assert captured.count(("late", 99)) == 1
