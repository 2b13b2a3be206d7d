"""bus/topology.py: every queue follows RETAILBUS.queue_type; quorum retry
queues dead-letter at-least-once; an existing queue of another type is named."""
from __future__ import annotations

import amqp
import pytest

from bus import topology

pytestmark = pytest.mark.unit

QUEUE = "evt-store_agent-pos.sale.v1--erp.on_pos_sale"


class RecordingChannel:
    """Stands in for an amqp channel: records declarations, refuses `refuse` with
    the broker's PRECONDITION_FAILED."""

    def __init__(self, refuse: str | None = None, configure: bool = True, existing: set[str] = frozenset()):
        self.queues: dict[str, dict | None] = {}
        self.bindings: list[tuple] = []
        self.checked: list[str] = []
        self.refuse = refuse
        self.configure = configure  # False: the user may not declare (ACCESS_REFUSED)
        self.existing = existing
        self.connection = self
        self.is_open = True

    def channel(self):  # the declarations' own channel: here the same recorder
        return self

    def close(self):
        pass

    def _passive(self, name):
        self.checked.append(name)
        if name not in self.existing:
            raise amqp.exceptions.NotFound(reply_text=f"NOT_FOUND - no '{name}'")

    def exchange_declare(self, name, kind, durable=False, auto_delete=False, passive=False):
        if passive:
            return self._passive(name)
        if not self.configure:
            raise amqp.exceptions.AccessRefused(reply_text=f"ACCESS_REFUSED - configure access to '{name}'")
        assert durable and not auto_delete

    def queue_declare(self, name, durable=False, auto_delete=False, arguments=None, passive=False):
        if passive:
            return self._passive(name)
        if not self.configure:
            raise amqp.exceptions.AccessRefused(reply_text=f"ACCESS_REFUSED - configure access to '{name}'")
        assert durable and not auto_delete
        if name == self.refuse:
            raise amqp.exceptions.PreconditionFailed(
                reply_text="PRECONDITION_FAILED - inequivalent arg 'x-queue-type' for queue "
                           f"'{name}' in vhost 'retailbus': received the value 'quorum' of type "
                           "'longstr' but current is none")
        self.queues[name] = arguments

    def queue_bind(self, queue, exchange, routing_key):
        self.bindings.append((queue, exchange, routing_key))


def declare(channel, queue_type, single_active=False):
    topology.declare_handler_queues(channel, "store_agent.events", "pos.sale.v1", QUEUE, [1, 5],
                                    single_active=single_active, queue_type=queue_type)


def test_classic_queues_are_declared_as_before():
    ch = RecordingChannel()
    declare(ch, "classic", single_active=True)
    assert ch.queues == {
        QUEUE: {"x-single-active-consumer": True},
        f"{QUEUE}.retry.1000ms": {"x-message-ttl": 1000, "x-dead-letter-exchange": "",
                             "x-dead-letter-routing-key": QUEUE},
        f"{QUEUE}.retry.5000ms": {"x-message-ttl": 5000, "x-dead-letter-exchange": "",
                             "x-dead-letter-routing-key": QUEUE},
        f"{QUEUE}.dlq": None,
    }
    assert ch.bindings == [(QUEUE, "store_agent.events", "pos.sale.v1"),  # failures come back by name:
                           *[(q, topology.FAILED_EXCHANGE, q) for q in (  # never via the default exchange
                               f"{QUEUE}.retry.1000ms", f"{QUEUE}.retry.5000ms", f"{QUEUE}.dlq")]]


def test_a_user_that_may_not_declare_checks_that_everything_exists():
    everything = {"store_agent.events", topology.FAILED_EXCHANGE, QUEUE,
                  f"{QUEUE}.retry.1000ms", f"{QUEUE}.retry.5000ms", f"{QUEUE}.dlq"}
    ch = RecordingChannel(configure=False, existing=everything)
    declare(ch, "classic")
    assert set(ch.checked) == everything and ch.queues == {} and ch.bindings == []
    ch = RecordingChannel(configure=False, existing=everything - {f"{QUEUE}.dlq"})
    with pytest.raises(topology.TopologyMissingError, match=r"queue '.*\.dlq' does not exist.*retailbus broker users"):
        declare(ch, "classic")


def test_quorum_handler_retry_and_dead_letter_queues():
    ch = RecordingChannel()
    declare(ch, "quorum", single_active=True)
    assert all(args["x-queue-type"] == "quorum" for args in ch.queues.values())
    assert ch.queues[QUEUE] == {"x-queue-type": "quorum", "x-single-active-consumer": True}
    assert ch.queues[f"{QUEUE}.retry.5000ms"] == {
        "x-queue-type": "quorum", "x-message-ttl": 5000,
        "x-dead-letter-exchange": "", "x-dead-letter-routing-key": QUEUE,
        # expired retries go back to the handler queue at-least-once, which needs reject-publish
        "x-dead-letter-strategy": "at-least-once", "x-overflow": "reject-publish",
    }
    assert ch.queues[f"{QUEUE}.dlq"] == {"x-queue-type": "quorum"}


def test_a_queue_of_another_type_is_named_in_the_error():
    ch = RecordingChannel(refuse=f"{QUEUE}.retry.1000ms")
    with pytest.raises(topology.QueueTypeMismatchError) as err:
        declare(ch, "quorum")
    message = str(err.value)
    assert f"queue '{QUEUE}.retry.1000ms'" in message and "quorum" in message
    assert "cannot change type" in message


def test_unknown_queue_type_is_refused():
    with pytest.raises(ValueError, match="classic, quorum"):
        topology.queue_arguments("stream")


def test_declare_queue_passes_extra_arguments():
    ch = RecordingChannel()
    topology.declare_queue(ch, "stock.S001", "quorum")
    topology.declare_queue(ch, "plain")
    assert ch.queues == {"stock.S001": {"x-queue-type": "quorum"}, "plain": None}
