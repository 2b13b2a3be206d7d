"""The Resequencer of ordered handlers (bus/resequence.py), driven as the consumer drives
it: `add` on delivery, `done` when a message is settled, the window's timer by hand. The
same behaviour against a real broker and the real forwarder: tests/integration/test_resequence.py."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from bus.consumer import Delivery
from bus.resequence import TIMEOUTS, Resequencer, position

pytestmark = pytest.mark.unit

QUEUE = "unit-resequence"


class Handler:
    """Runs what the resequencer hands out, one store message at a time, like the consumer."""

    def __init__(self, window: float = 10.0):
        self.ran: list[str] = []
        self.windows: list = []  # (seconds, fn) armed
        self.seq = Resequencer(QUEUE, window, self.run, lambda s, fn: self.windows.append((s, fn)))

    def run(self, delivery):
        self.ran.append(delivery.event.id)

    def deliver(self, name: str, seq: int | None, store: str = "S001", type: str = "pos.sale.v1"):
        event = SimpleNamespace(id=name, type=type, correlationid=None)
        ready = self.seq.add(Delivery(None, None, event, key=store, seq=seq))
        if ready is not None:
            self.run(ready)

    def finish(self, store: str = "S001"):
        following = self.seq.done(store)
        if following is not None:
            self.run(following)

    def finish_all(self, store: str = "S001"):
        while self.seq._chains.get(store) and self.seq._chains[store].running is not None:
            self.finish(store)

    def expire(self):
        _, fn = self.windows.pop(0)
        fn()


def timeouts() -> float:
    return TIMEOUTS.labels(QUEUE)._value.get()


def test_a_message_whose_predecessor_was_not_seen_waits_for_it_and_they_run_in_store_order():
    h = Handler()
    for n in (1, 2):
        h.deliver(f"m{n}", n)
        h.finish()
    # the forwarder's round after a partial nack: 4, 5 got in ahead of the resent 3, 4, 5
    h.deliver("m4", 4)
    h.deliver("m5", 5)
    assert h.ran == ["m1", "m2"] and len(h.windows) == 1
    h.deliver("m3", 3)
    h.deliver("m4-again", 4)
    h.deliver("m5-again", 5)
    h.finish_all()
    assert h.ran == ["m1", "m2", "m3", "m4", "m5", "m4-again", "m5-again"]
    before = timeouts()
    h.expire()  # the window armed for 3 ends after 3 came: nothing happens
    assert timeouts() == before and h.ran[-1] == "m5-again"


def test_after_the_window_the_store_goes_on_with_its_lowest_waiting_message_and_a_late_one_still_runs():
    h = Handler(window=2.0)
    h.deliver("m1", 1)
    h.finish()
    h.deliver("m4", 4)
    h.deliver("m3", 3)  # 2 is lost or parked
    assert h.ran == ["m1"] and h.windows[0][0] == 2.0
    before = timeouts()
    h.expire()
    assert timeouts() == before + 1
    h.finish_all()
    assert h.ran == ["m1", "m3", "m4"]  # in store order, 2 skipped
    h.deliver("m2", 2)  # turns up late (a DLQ replay): handled, never held
    assert h.ran == ["m1", "m3", "m4", "m2"] and h.windows == []


def test_messages_without_a_position_or_at_or_below_the_last_one_are_never_held():
    h = Handler()
    h.deliver("m5", 5)  # the first since start is not held: the process knows nothing before it
    h.finish()
    h.deliver("m7", 7)
    assert h.ran == ["m5"]  # held: 6 not seen
    h.deliver("legacy", None)  # an older agent's message has no position
    h.deliver("m5-again", 5)  # a redelivery
    assert h.ran == ["m5", "legacy"]
    h.finish()
    assert h.ran == ["m5", "legacy", "m5-again"]
    h.finish()
    assert h.ran == ["m5", "legacy", "m5-again"]  # 7 still waits for 6
    h.deliver("m6", 6)
    h.finish_all()
    assert h.ran == ["m5", "legacy", "m5-again", "m6", "m7"]


def test_stores_and_message_types_keep_positions_of_their_own():
    h = Handler()
    h.deliver("a1", 1, store="S001")
    h.deliver("b9", 9, store="S002")  # another store runs beside it
    h.finish("S001")
    h.finish("S002")
    h.deliver("a-ret1", 1, store="S001", type="pos.return.v1")  # returns count from 1 on their own
    h.finish("S001")
    h.deliver("a2", 2, store="S001")
    assert h.ran == ["a1", "b9", "a-ret1", "a2"] and h.windows == []


def test_a_window_of_zero_never_holds():
    h = Handler(window=0)
    h.deliver("m1", 1)
    h.finish()
    h.deliver("m3", 3)
    assert h.ran == ["m1", "m3"] and h.windows == []


@pytest.mark.parametrize("value, seq", [(7, 7), ("7", 7), (b"7", 7), (True, None), ("x", None), (None, None)])
def test_the_position_header_is_read_as_a_number_or_ignored(value, seq):
    assert position({} if value is None else {"x-retailbus-store-seq": value}) == seq
