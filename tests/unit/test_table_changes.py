"""table_changes on a real SQLite file in a real nameko container (no broker needed):
the overlap rescan finds a late commit, then pauses once the watermark has settled."""
from __future__ import annotations

import logging
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


# -- failures: retried with backoff, the rescan too, logged once -------------------------

state: dict = {}


class FlakyService:
    """Fails every batch while state["fail"], and every batch holding the row `late`
    while state["fail_late"]; records when it was called. The first batch commits the
    late row, as ItemsService does, when given the engine in state["late_commit"]."""

    name = "flaky_items"

    @tc.table_changes("ITEMS", key=("K",), batch=5, interval=INTERVAL, overlap=OVERLAP, max_backoff=1.0)
    def on_items(self, changes):
        state["calls"].append(time.monotonic())
        late = any(c.row["K"] == "late" for c in changes)
        if state["fail"] or (state["fail_late"] and late):
            if late:
                state["late_failures"].append(time.monotonic())
            raise ConnectionRefusedError("the broker is down")
        captured.extend((c.row["K"], c.row["V"]) for c in changes)
        if state["late_commit"]:
            with state["late_commit"].pop().begin() as conn:
                conn.execute(ITEMS.insert(), {"K": "late", "V": 99, "UPD_TS": stamp(T0, -OVERLAP / 2)})


@pytest.fixture
def flaky(tmp_path):
    state.update(fail=False, fail_late=False, calls=[], late_failures=[], late_commit=[])
    captured.clear()
    engine = engine_for(f"sqlite:///{tmp_path / 'legacy.db'}")
    ITEMS.metadata.create_all(engine)
    container = ServiceContainer(FlakyService, {"LEGACY_DB_URI": str(engine.url)})
    yield engine, container
    if container.started:
        container.stop()
    engine.dispose()


def test_a_failed_settling_rescan_is_rescanned_until_the_late_row_is_handed_on(flaky):
    engine, container = flaky
    with engine.begin() as conn:
        conn.execute(ITEMS.insert(), [{"K": f"k{i}", "V": i, "UPD_TS": stamp(T0)} for i in range(3)])
    state["fail_late"], state["late_commit"] = True, [engine]
    container.start()
    capture = next(e for e in container.entrypoints if isinstance(e, tc.TableChanges))
    wait_for(lambda: len(captured) == 3)
    # the rescan after the watermark settled (the last one before rescans pause) failed too
    wait_for(lambda: any(t > capture._settles_at for t in state["late_failures"]))
    state["fail_late"] = False
    wait_for(lambda: ("late", 99) in captured)
    assert captured.count(("late", 99)) == 1


def test_a_failing_batch_backs_off_and_the_failing_is_logged_once(flaky, caplog):
    engine, container = flaky
    caplog.set_level(logging.INFO)
    state["fail"] = True
    with engine.begin() as conn:  # a full batch
        conn.execute(ITEMS.insert(), [{"K": f"k{i}", "V": i, "UPD_TS": stamp(T0)} for i in range(5)])
    container.start()
    wait_for(lambda: len(state["calls"]) >= 6)
    calls = state["calls"]
    # the waits double from `interval`: the 5th is 1.0 s (max_backoff) where a tight loop waited nothing
    assert calls[5] - calls[4] >= 8 * INTERVAL, [round(b - a, 3) for a, b in zip(calls, calls[1:])]
    tracebacks = [r for r in caplog.records if r.name == "nameko.containers" and r.levelno >= logging.ERROR]
    failing = [r for r in caplog.records if r.name == tc.__name__ and r.levelno >= logging.WARNING]
    assert len(tracebacks) == 1 and tracebacks[0].exc_info  # the first failure, in full
    assert len(failing) == 1 and "is failing" in failing[0].getMessage()
    assert "the broker is down" in failing[0].getMessage()
    assert tc.FAILING.labels("ITEMS")._value.get() == 1

    state["fail"] = False
    wait_for(lambda: len(captured) == 5)
    wait_for(lambda: any("works again" in r.getMessage() for r in caplog.records))
    assert tc.FAILING.labels("ITEMS")._value.get() == 0
    assert sorted(captured) == [(f"k{i}", i) for i in range(5)]
