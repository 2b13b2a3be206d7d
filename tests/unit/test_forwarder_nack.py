"""The forwarder after a partial nack (a real outbox file; the broker's answers played
by a stand-in publisher, since a broker nacks one publish of a pipelined batch only
under overload): only the confirmed prefix is marked sent, and the next round sends
again from the first unconfirmed message, in store order, with its store sequence."""
from __future__ import annotations

import pytest

from bus.constants import H_STORE_SEQ
from bus.publisher import NackedError
from contracts.envelope import CloudEvent
from routing.forwarder import OutboxForwarder
from routing.legacy_payload import sale_from_legacy
from routing.outbox import Outbox
from tests.unit.test_store_agent import legacy_sale

pytestmark = pytest.mark.unit


class Broker:
    """Confirms everything except the publishes listed in `nack` (by store sequence), once each."""

    def __init__(self, nack: set[int]):
        self.nack = set(nack)
        self.rounds: list[list[int]] = []

    def _one(self, message):
        seq = message.headers[H_STORE_SEQ]
        self.rounds[-1].append(seq)
        if seq in self.nack:
            self.nack.discard(seq)
            return NackedError("the broker refused the message (nack)")
        return None

    def publish(self, message):
        self.rounds.append([])
        error = self._one(message)
        if error is not None:
            raise error

    def publish_many(self, messages):
        return [self._one(m) for m in messages]


@pytest.fixture
def outbox(tmp_path):
    box = Outbox(tmp_path / "outbox.db")
    for n in range(1, 7):
        sale = sale_from_legacy(legacy_sale(f"S001-07-{n:06d}"))
        box.accept(CloudEvent.new("pos.sale.v1", "store/S001/pos/07", sale, subject=sale.pos_txn_id,
                                  idempotencykey=f"pos.sale.v1:S001:{sale.pos_txn_id}"))
    yield box
    box.close()


def test_after_a_partial_nack_the_next_round_resends_from_the_first_unconfirmed_in_store_order(outbox):
    forwarder = OutboxForwarder()
    forwarder.outbox, forwarder.store_id, forwarder.user_id = outbox, "S001", None
    forwarder.publisher = broker = Broker(nack={3})  # 3 refused, 4..6 confirmed after it
    with pytest.raises(NackedError):
        forwarder._forward(outbox.unsent(100))
    assert [e.stream_seq for e in outbox.unsent(100)] == [3, 4, 5, 6]  # only the prefix 1, 2 is sent
    forwarder._forward(outbox.unsent(100))
    assert broker.rounds == [[1, 2, 3, 4, 5, 6], [3, 4, 5, 6]]  # each round in store order, from 3
    assert outbox.unsent(100) == []
