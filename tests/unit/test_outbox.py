"""routing/outbox.py: the store's durable outbox (real SQLite file in tmp_path)."""
from __future__ import annotations

import sqlite3
import time

import pytest

from contracts.envelope import CloudEvent
from routing.outbox import Outbox, OutboxUnavailable

pytestmark = pytest.mark.unit


def event(n: int, key: str | None = None, filler: str = "") -> CloudEvent:
    return CloudEvent.new("test.thing.v1", "store/S001/pos/07", {"n": n, "filler": filler},
                          idempotencykey=key or f"key-{n}")


def count(path) -> int:
    with sqlite3.connect(str(path)) as db:
        return db.execute("SELECT count(*) FROM outbox").fetchone()[0]


@pytest.fixture
def outbox(tmp_path):
    box = Outbox(tmp_path / "store" / "outbox.db")
    yield box
    try:
        box.close()
    except sqlite3.ProgrammingError:
        pass


def test_creates_folder_and_wal_file(tmp_path):
    path = tmp_path / "a" / "b" / "outbox.db"
    box = Outbox(path)
    try:
        assert path.exists()
        assert box._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        box.close()


def test_accept_commits_the_event(outbox):
    ev = event(1)
    accepted = outbox.accept(ev)
    assert accepted.event_id == ev.id and accepted.duplicate is False
    assert count(outbox.path) == 1  # visible to another connection: committed
    [entry] = outbox.unsent(10)
    assert entry.event_id == ev.id and entry.type == "test.thing.v1"
    assert CloudEvent.from_json(entry.body) == ev


def test_duplicate_key_returns_first_event_and_adds_no_row(outbox):
    first = event(1, key="same")
    second = event(2, key="same")
    assert outbox.accept(first).duplicate is False
    again = outbox.accept(second)
    assert again.event_id == first.id and again.event_id != second.id
    assert again.duplicate is True
    assert count(outbox.path) == 1
    [entry] = outbox.unsent(10)
    assert CloudEvent.from_json(entry.body).data["n"] == 1


def test_unsent_in_acceptance_order_with_limit(outbox):
    events = [event(n) for n in range(5)]
    for ev in events:
        outbox.accept(ev)
    entries = outbox.unsent(3)
    assert [e.event_id for e in entries] == [ev.id for ev in events[:3]]
    seqs = [e.seq for e in outbox.unsent(10)]
    assert seqs == sorted(seqs) and len(seqs) == 5


def test_mark_sent_removes_from_unsent_but_keeps_rows(outbox):
    events = [event(n) for n in range(4)]
    for ev in events:
        outbox.accept(ev)
    entries = outbox.unsent(10)
    outbox.mark_sent([entries[0].seq, entries[1].seq])
    assert [e.event_id for e in outbox.unsent(10)] == [events[2].id, events[3].id]
    assert count(outbox.path) == 4  # kept for reconciliation and replay
    outbox.mark_sent([])  # no-op
    assert len(outbox.unsent(10)) == 2


def test_duplicate_of_a_sent_event_is_still_recognised(outbox):
    ev = event(1)
    outbox.accept(ev)
    outbox.mark_sent([outbox.unsent(1)[0].seq])
    again = outbox.accept(event(9, key=ev.idempotencykey))
    assert again == type(again)(ev.id, duplicate=True)
    assert outbox.unsent(10) == []


def test_stats_depth_and_oldest_age(outbox):
    assert outbox.stats() == {"outbox_depth": 0, "oldest_unsent_seconds": 0.0}
    outbox.accept(event(1))
    time.sleep(0.05)
    outbox.accept(event(2))
    stats = outbox.stats()
    assert stats["outbox_depth"] == 2
    assert 0.04 <= stats["oldest_unsent_seconds"] < 5
    outbox.mark_sent([e.seq for e in outbox.unsent(10)])
    assert outbox.stats() == {"outbox_depth": 0, "oldest_unsent_seconds": 0.0}


def test_stats_age_follows_the_oldest_unsent(outbox):
    outbox.accept(event(1))
    with sqlite3.connect(str(outbox.path)) as db:  # pretend it was accepted 100 s ago
        db.execute("UPDATE outbox SET accepted_at = accepted_at - 100")
    outbox.accept(event(2))
    assert outbox.stats()["oldest_unsent_seconds"] >= 100
    outbox.mark_sent([outbox.unsent(1)[0].seq])
    assert outbox.stats()["oldest_unsent_seconds"] < 5


def test_full_disk_is_outbox_unavailable_and_writes_nothing(outbox):
    for n in range(3):
        outbox.accept(event(n))
    pages = outbox._db.execute("PRAGMA page_count").fetchone()[0]
    outbox._db.execute(f"PRAGMA max_page_count={pages}")
    with pytest.raises(OutboxUnavailable, match="cannot commit"):
        outbox.accept(event(99, filler="x" * 200_000))
    assert count(outbox.path) == 3
    assert len(outbox.unsent(10)) == 3
    # room again: the outbox keeps working on the same connection
    outbox._db.execute("PRAGMA max_page_count=1073741823")
    assert outbox.accept(event(99)).duplicate is False
    assert count(outbox.path) == 4


def test_kill_like_reopen_keeps_unsent_rows_in_order(tmp_path):
    path = tmp_path / "outbox.db"
    box = Outbox(path)
    events = [event(n) for n in range(5)]
    for ev in events:
        box.accept(ev)
    box.mark_sent([box.unsent(1)[0].seq])
    box._db.close()  # no orderly shutdown: nothing flushed beyond what accept committed
    reopened = Outbox(path)
    try:
        assert [e.event_id for e in reopened.unsent(10)] == [ev.id for ev in events[1:]]
        assert reopened.accept(event(1)).duplicate is True  # keys survive too
        new = event(42)
        reopened.accept(new)
        assert reopened.unsent(10)[-1].event_id == new.id
    finally:
        reopened.close()


def test_accept_after_close_is_outbox_unavailable(tmp_path):
    box = Outbox(tmp_path / "outbox.db")
    box.close()
    with pytest.raises(OutboxUnavailable):
        box.accept(event(1))
