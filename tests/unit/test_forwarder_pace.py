"""While tills sell, a backlog drains at half pace (routing/forwarder.py, `_pace`): each
round is followed by a pause as long as it took; with no sale lately, rounds follow
each other at once. A real outbox file; the broker played by a stand-in that takes a
known time per round."""
from __future__ import annotations

import time

import eventlet
import pytest
from eventlet.event import Event

from contracts.envelope import CloudEvent
from routing import forwarder as forwarder_module
from routing.forwarder import OutboxForwarder
from routing.legacy_payload import sale_from_legacy
from routing.outbox import Outbox
from tests.unit.test_store_agent import legacy_sale

pytestmark = pytest.mark.unit

ROUND_SECONDS = 0.02


class SlowBroker:
    """Confirms everything, each group after ROUND_SECONDS; `done` once `total` were published."""

    def __init__(self, total: int):
        self.total, self.published, self.done = total, 0, Event()

    def publish(self, message):
        self.publish_many([message])

    def publish_many(self, messages):
        eventlet.sleep(ROUND_SECONDS)
        self.published += len(messages)
        if self.published >= self.total and not self.done.ready():
            self.done.send(True)
        return [None] * len(messages)

    def close(self):
        pass


def drain(tmp_path, monkeypatch, tills_selling: bool) -> list[float]:
    """The pauses the forwarder took while draining 12 sales, 3 a round."""
    monkeypatch.setattr(forwarder_module, "BATCH", 3)
    box = Outbox(tmp_path / "outbox.db")
    for n in range(12):
        sale = sale_from_legacy(legacy_sale(f"S001-07-{n:06d}"))
        box.accept(CloudEvent.new("pos.sale.v1", "store/S001/pos/07", sale, subject=sale.pos_txn_id,
                                  idempotencykey=f"pos.sale.v1:S001:{sale.pos_txn_id}"))
    if not tills_selling:
        box.last_accept = time.monotonic() - forwarder_module.TILLS_ACTIVE_SECONDS - 1
    forwarder = OutboxForwarder()
    forwarder.outbox, forwarder.store_id, forwarder.user_id = box, "S001", None
    forwarder.publisher = broker = SlowBroker(12)
    pauses: list[float] = []
    forwarder._pace = pauses.append
    forwarder._running = True
    runner = eventlet.spawn(forwarder._run)
    try:
        assert broker.done.wait(timeout=30), "the backlog was not forwarded"
    finally:
        forwarder._running = False
        forwarder.stop()
        runner.wait()
        box.close()
    return pauses


def test_while_tills_sell_each_round_is_followed_by_a_pause_as_long_as_it_took(tmp_path, monkeypatch):
    pauses = drain(tmp_path, monkeypatch, tills_selling=True)
    assert len(pauses) >= 3  # 12 sales in rounds of 3
    assert all(p >= ROUND_SECONDS for p in pauses), pauses


def test_with_no_sale_lately_a_backlog_drains_without_pauses(tmp_path, monkeypatch):
    assert drain(tmp_path, monkeypatch, tills_selling=False) == []
