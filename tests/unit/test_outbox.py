"""routing/outbox.py: the store's durable outbox (real SQLite file in tmp_path)."""
from __future__ import annotations

import sqlite3

import eventlet
import pytest

from contracts.envelope import CloudEvent
from routing.outbox import SCHEMA, EventIdReusedError, Outbox, OutboxConflict, OutboxUnavailable

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
    second = event(1, key="same")  # the POS retried: same content, a new envelope
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


def test_mark_sent_marks_exactly_the_seqs_given_across_gaps(outbox):
    for n in range(12):
        outbox.accept(event(n))
    seqs = [e.seq for e in outbox.unsent(12)]
    outbox.mark_sent(seqs[:3] + seqs[4:6] + seqs[8:])  # runs split by rows not to be marked
    assert [e.seq for e in outbox.unsent(12)] == [seqs[3], seqs[6], seqs[7]]


def test_duplicate_of_a_sent_event_is_still_recognised(outbox):
    ev = event(1)
    outbox.accept(ev)
    outbox.mark_sent([outbox.unsent(1)[0].seq])
    again = outbox.accept(event(1, key=ev.idempotencykey))
    assert again == type(again)(ev.id, duplicate=True)
    assert outbox.unsent(10) == []


def test_stats_depth_and_oldest_age(outbox):
    assert outbox.stats() == {"outbox_depth": 0, "oldest_unsent_seconds": 0.0}
    outbox.accept(event(1))
    with sqlite3.connect(str(outbox.path)) as db:  # pretend it was accepted 10 s ago
        db.execute("UPDATE outbox SET accepted_at = accepted_at - 10")
    outbox.accept(event(2))
    stats = outbox.stats()
    assert stats["outbox_depth"] == 2
    assert 10 <= stats["oldest_unsent_seconds"] < 70  # the older one's age (generous: a loaded machine)
    outbox.mark_sent([e.seq for e in outbox.unsent(10)])
    assert outbox.stats() == {"outbox_depth": 0, "oldest_unsent_seconds": 0.0}


def test_stats_age_follows_the_oldest_unsent(outbox):
    outbox.accept(event(1))
    with sqlite3.connect(str(outbox.path)) as db:  # pretend it was accepted 100 s ago
        db.execute("UPDATE outbox SET accepted_at = accepted_at - 100")
    outbox.accept(event(2))
    assert outbox.stats()["oldest_unsent_seconds"] >= 100
    outbox.mark_sent([outbox.unsent(1)[0].seq])
    assert outbox.stats()["oldest_unsent_seconds"] < 60  # now the second one's, not 100 s


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


def test_same_key_with_different_content_is_a_conflict_and_no_row(outbox):
    first = event(1, key="same")
    outbox.accept(first)
    with pytest.raises(OutboxConflict) as caught:
        outbox.accept(event(2, key="same"))
    assert caught.value.first_event_id == first.id and "same" in str(caught.value)
    assert count(outbox.path) == 1
    assert CloudEvent.from_json(outbox.unsent(10)[0].body).data["n"] == 1


def test_concurrent_accepts_share_one_transaction(outbox):
    """Group commit: 200 callers at once need far fewer than 200 fsyncs."""
    events = [event(n) for n in range(200)]
    pool = eventlet.GreenPool(200)
    results = list(pool.imap(outbox.accept, events))
    assert all(not r.duplicate for r in results)
    assert count(outbox.path) == 200
    assert sum(outbox.group_sizes) == 200 and max(outbox.group_sizes) > 1
    assert len(outbox.group_sizes) < 50
    # each caller got its own answer
    assert [r.event_id for r in results] == [e.id for e in events]


def test_a_conflict_in_a_group_fails_only_its_caller(outbox):
    outbox.accept(event(1, key="k1"))
    pool = eventlet.GreenPool(10)
    threads = [pool.spawn(outbox.accept, ev) for ev in (event(2), event(99, key="k1"), event(3))]
    assert threads[0].wait().duplicate is False and threads[2].wait().duplicate is False
    with pytest.raises(OutboxConflict):
        threads[1].wait()
    assert count(outbox.path) == 3


def test_a_reused_event_id_in_a_group_fails_only_its_caller(outbox):
    """A POS reusing a CloudEvent id for a new transaction used to raise IntegrityError inside
    the shared transaction and roll back every other till's sale in the group (503 to all)."""
    first = outbox.accept(event(1))
    reused = CloudEvent.new("test.thing.v1", "store/S001/pos/07", {"n": 2}, idempotencykey="key-2",
                            id=first.event_id)
    pool = eventlet.GreenPool(10)
    with eventlet.Timeout(30):
        threads = [pool.spawn(outbox.accept, ev) for ev in (event(3), reused, event(4))]
        assert threads[0].wait().duplicate is False and threads[2].wait().duplicate is False
        with pytest.raises(EventIdReusedError, match=first.event_id):
            threads[1].wait()
    assert outbox.group_sizes[-1] == 3  # they did share one transaction
    assert [CloudEvent.from_json(e.body).data["n"] for e in outbox.unsent(10)] == [1, 3, 4]


def test_a_reused_event_id_within_one_group_fails_only_the_second(outbox):
    one = event(1)
    two = CloudEvent.new("test.thing.v1", "store/S001/pos/07", {"n": 2}, idempotencykey="key-2", id=one.id)
    pool = eventlet.GreenPool(10)
    with eventlet.Timeout(30):
        threads = [pool.spawn(outbox.accept, ev) for ev in (one, two, event(3))]
        assert threads[0].wait().event_id == one.id and not threads[2].wait().duplicate
        with pytest.raises(EventIdReusedError):
            threads[1].wait()
    assert [CloudEvent.from_json(e.body).data["n"] for e in outbox.unsent(10)] == [1, 3]


def test_the_committer_survives_any_exception_and_nobody_waits_forever(outbox):
    """An exception other than sqlite3.Error used to kill the committer with its group
    waiting, and leave the transaction open so that every later commit failed."""
    pool = eventlet.GreenPool(10)
    with eventlet.Timeout(30):  # the old committer left these callers waiting for ever
        threads = [pool.spawn(outbox.accept, event(1)),
                   pool.spawn(outbox.record_accepted, "pos.sale.v1", None),  # a bug: no data at all
                   pool.spawn(outbox.accept, event(2))]
        assert not threads[0].wait().duplicate and not threads[2].wait().duplicate
        with pytest.raises(AttributeError):
            threads[1].wait()
        assert outbox.accept(event(3)).duplicate is False  # and the next group commits
    assert count(outbox.path) == 3


def test_stream_seq_counts_per_type_without_gaps(outbox):
    for n in range(3):
        outbox.accept(event(n))
        outbox.accept(CloudEvent.new("test.other.v1", "store/S001/pos/07", {"n": n},
                                     idempotencykey=f"other-{n}"))
    outbox.accept(event(0))  # a duplicate takes no number
    by_type = {}
    for entry in outbox.unsent(10):
        by_type.setdefault(entry.type, []).append(entry.stream_seq)
    assert by_type == {"test.thing.v1": [1, 2, 3], "test.other.v1": [1, 2, 3]}


def test_compaction_removes_only_old_sent_rows(tmp_path):
    box = Outbox(tmp_path / "outbox.db", retention_days=2)
    try:
        for n in range(4):
            box.accept(event(n))
        entries = box.unsent(10)
        box.mark_sent([entries[0].seq, entries[1].seq])
        with sqlite3.connect(str(box.path)) as db:  # row 0 was sent 3 days ago, row 2 accepted then
            db.execute("UPDATE outbox SET sent_at = sent_at - 3 * 86400 WHERE seq = ?", (entries[0].seq,))
            db.execute("UPDATE outbox SET accepted_at = accepted_at - 3 * 86400 WHERE seq = ?", (entries[2].seq,))
        assert box.compact() == 1
        assert count(box.path) == 3
        assert [e.seq for e in box.unsent(10)] == [entries[2].seq, entries[3].seq]  # unsent never go
        assert box.accept(event(0)).duplicate is False  # a compacted key is forgotten
    finally:
        box.close()


def test_an_outbox_of_the_first_release_is_migrated(tmp_path):
    path = tmp_path / "outbox.db"
    with sqlite3.connect(str(path)) as db:
        db.executescript(SCHEMA)
        db.execute("INSERT INTO outbox (event_id, idem_key, type, body, accepted_at) "
                   "VALUES ('e1', 'old-key', 'test.thing.v1', x'7b7d', 1.0)")
    box = Outbox(path)
    try:
        [old] = box.unsent(10)
        assert old.event_id == "e1" and old.stream_seq is None
        ev = event(5, key="old-key")
        assert box.accept(ev) == type(box.accept(ev))("e1", duplicate=True)  # no hash: a retry
        box.accept(event(6))
        assert box.unsent(10)[-1].stream_seq == 1
    finally:
        box.close()
