"""The journal's emitting side: hop records, the bounded buffer, worker-bound hops."""
from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from contracts.envelope import CloudEvent
from contracts.journal import JournalHopsV1
from bus import journal
from bus.constants import EFFECT_ERRORS

pytestmark = pytest.mark.unit


@pytest.fixture
def buffer():
    """The process buffer, active with room for 3 hops, restored afterwards."""
    saved = journal.BUFFER.hops, journal.BUFFER.limit
    journal.BUFFER.hops, journal.BUFFER.limit = journal.deque(), 3
    yield journal.BUFFER
    journal.BUFFER.hops, journal.BUFFER.limit = saved


def dropped() -> float:
    return journal.DROPPED._value.get()


def test_a_process_without_a_journal_records_nothing():
    saved = journal.BUFFER.limit
    journal.BUFFER.limit = 0
    try:
        before = len(journal.BUFFER.hops)
        journal.record("consumed", id="X")
        assert len(journal.BUFFER.hops) == before
    finally:
        journal.BUFFER.limit = saved


def test_record_keeps_only_what_is_given(buffer):
    journal.record("posted", id="E1", correlationid="C1", subject="S001-1", detail={"doc_no": "S0001"}, at=12.5)
    journal.record("written", items=[{"key": "k", "row": 2, "refs": ["C1"]}])
    journal.record("read", file_rows={"sha256": "ab" * 32, "runs": [(2, 3)], "names": ["C2", "Zoë \"Q\""]})
    first, second, third = buffer.hops
    assert first == {"hop": "posted", "outcome": "ok", "time": 12.5, "id": "E1", "correlationid": "C1",
                     "subject": "S001-1", "detail": {"doc_no": "S0001"}}
    assert second["items"] == [{"key": "k", "row": 2, "refs": ["C1"]}] and "id" not in second
    # what a flush sends is a valid journal.hops.v1 event
    sent = journal.hops_event(list(buffer.hops), "erp")
    assert sent.to_json() == CloudEvent.to_json(sent)  # orjson writes what pydantic would, byte for byte
    event = CloudEvent.from_json(sent.to_json())
    assert event.type == "journal.hops.v1" and event.source == "journal/erp"
    assert isinstance(event.payload(), JournalHopsV1) and event.payload().hops[1].items[0].row == 2
    assert [i.refs for i in event.payload().hops[2].all_items()] == [["C2"], ['Zoë "Q"']]


def test_a_full_buffer_drops_and_counts_instead_of_growing(buffer):
    before = dropped()
    for n in range(5):
        journal.record("consumed", id=f"E{n}")
    assert [h["id"] for h in buffer.hops] == ["E0", "E1", "E2"]
    assert dropped() == before + 2


def test_consumer_hops_skip_the_journals_own_messages(buffer):
    sale = CloudEvent.model_construct(id="E9", correlationid="E9", type="pos.sale.v1", subject="S001-1")
    journal.handled(sale, "q", "ok", 0.5)
    journal.handled(journal.hops_event([{"hop": "x", "outcome": "ok", "time": 1.0}], "erp"), "q", "ok", 0.1)
    journal.failed({"message_id": "M1", "type": "pos.sale.v1"}, "q", "dead_lettered", "q.dlq", 4,
                   ValueError("bad SKU"))
    journal.failed({"message_id": "M2", "type": journal.HOPS_TYPE}, "q", "retried", "q.retry.1", 1, ValueError())
    consumed, parked = buffer.hops
    assert consumed["hop"] == "consumed" and consumed["id"] == sale.id and consumed["subject"] == "S001-1"
    assert consumed["detail"] == {"queue": "q", "seconds": 0.5} and consumed["time"] < time.time() - 0.5
    assert parked["hop"] == "dead_lettered" and parked["outcome"] == "failed" and parked["id"] == "M1"
    assert parked["detail"] == {"queue": "q", "to": "q.dlq", "attempt": 4, "error": "ValueError: bad SKU"}


class Worker(SimpleNamespace):
    __eq__, __hash__ = object.__eq__, object.__hash__  # like nameko's WorkerContext: by identity


def worker(**attrs):
    return Worker(data={"event_id": "E1", "correlation_id": "C1"}, **attrs)


def test_worker_hops_count_only_when_the_worker_and_its_commit_succeeded(buffer):
    provider = journal.JournalHops()
    provider.setup()
    ok, raised, uncommitted = worker(), worker(), worker(**{EFFECT_ERRORS: [RuntimeError("disk full")]})
    for ctx in (ok, raised, uncommitted):
        provider.get_dependency(ctx).add("posted", subject="S001-1", detail={"doc_no": "S1"})
    provider.worker_result(ok, "S1", None)
    provider.worker_result(raised, None, (ValueError, ValueError("x"), None))
    provider.worker_result(uncommitted, "S1", None)
    for ctx in (ok, raised, uncommitted):
        provider.worker_teardown(ctx)
    [hop] = buffer.hops
    assert (hop["hop"], hop["id"], hop["correlationid"], hop["subject"]) == ("posted", "E1", "C1", "S001-1")
    assert provider.pending == {}
