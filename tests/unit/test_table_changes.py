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

OVERLAP, INTERVAL = 0.4, 0.05
ITEMS = sa.Table("ITEMS", sa.MetaData(), sa.Column("K", sa.String(8), primary_key=True),
                 sa.Column("V", sa.Integer), sa.Column("UPD_TS", sa.String(32)))
captured: list[tuple] = []


class ItemsService:
    name = "items"

    @tc.table_changes("ITEMS", key=("K",), interval=INTERVAL, overlap=OVERLAP)
    def on_items(self, changes):
        captured.extend((c.row["K"], c.row["V"]) for c in changes)


def stamp(seconds_ago: float = 0.0) -> str:
    return (datetime.utcnow() - timedelta(seconds=seconds_ago)).isoformat(timespec="microseconds")


def wait_for(predicate, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_rescans_find_a_late_commit_then_pause_until_the_watermark_moves(tmp_path, monkeypatch):
    rescans = []
    rescan = tc.TableChanges._rescan
    monkeypatch.setattr(tc.TableChanges, "_rescan", lambda self, low: (rescans.append(low), rescan(self, low)))
    captured.clear()
    engine = engine_for(f"sqlite:///{tmp_path / 'legacy.db'}")
    ITEMS.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(ITEMS.insert(), [{"K": f"k{i}", "V": i, "UPD_TS": stamp()} for i in range(5)])
    container = ServiceContainer(ItemsService, {"LEGACY_DB_URI": str(engine.url)})
    container.start()
    try:
        wait_for(lambda: len(captured) == 5)
        with engine.begin() as conn:  # committed late: stamped before the watermark's rows
            conn.execute(ITEMS.insert(), {"K": "late", "V": 99, "UPD_TS": stamp(OVERLAP / 4)})
        wait_for(lambda: ("late", 99) in captured)
        time.sleep(OVERLAP + 4 * INTERVAL)  # settled, and one rescan after that
        settled = len(rescans)
        time.sleep(10 * INTERVAL)
        assert len(rescans) == settled  # a quiet table is not re-read every interval
        with engine.begin() as conn:
            conn.execute(ITEMS.update().where(ITEMS.c.K == "k1").values(V=11, UPD_TS=stamp()))
        wait_for(lambda: ("k1", 11) in captured)
        wait_for(lambda: len(rescans) > settled)  # the watermark moved: rescans resume
    finally:
        container.stop()
        engine.dispose()
    assert captured.count(("late", 99)) == 1
