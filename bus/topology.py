"""Names and declarations of everything retailbus creates on the broker.

Events follow nameko's conventions (exchange `<service>.events`, routing key =
message type, queue `evt-<source>-<type>--<service>.<method>`), so a plain
nameko `event_handler` can still listen in. Each handler queue has its retry
queues (TTL, then dead-lettered back to the handler queue) and a parking
queue `<queue>.dlq`. Every queue is durable.

`queue_type` (RETAILBUS.queue_type) is `classic` or `quorum`: quorum queues are
replicated on a cluster, and their retry queues dead-letter back at-least-once
(RabbitMQ keeps an expired message until the handler queue confirmed it, which
needs `x-overflow: reject-publish`). A queue cannot change type: declaring an
existing queue with another type fails with an error naming the queue.
"""
from __future__ import annotations

import amqp
from contracts.errors import RetailbusError

EVENTS_EXCHANGE_TYPE = "topic"
QUEUE_TYPES = ("classic", "quorum")


class QueueTypeMismatchError(RetailbusError):
    """A queue exists on the broker with other arguments (e.g. classic, configured quorum)."""


def events_exchange(service: str) -> str:
    return f"{service}.events"


def handler_queue(source_service: str, event_type: str, service: str, method: str) -> str:
    return f"evt-{source_service}-{event_type}--{service}.{method}"


def retry_queue(queue: str, delay: float) -> str:
    """Named by its delay (the queue's TTL), not by the attempt: ops may change a
    handler's schedule in bus.yaml, and a queue's TTL cannot change once declared.
    A retry queue left over from an old schedule still leads back to the handler."""
    return f"{queue}.retry.{round(delay * 1000)}ms"


def dead_letter_queue(queue: str) -> str:
    return f"{queue}.dlq"


def declare_exchange(channel, name: str, kind: str = EVENTS_EXCHANGE_TYPE) -> None:
    channel.exchange_declare(name, kind, durable=True, auto_delete=False)


def queue_arguments(queue_type: str = "classic", **arguments) -> dict | None:
    """x-arguments of a queue of `queue_type`; a quorum queue that dead-letters
    does so at-least-once."""
    if queue_type not in QUEUE_TYPES:
        raise ValueError(f"queue_type must be one of {', '.join(QUEUE_TYPES)}, got {queue_type!r}")
    args = dict(arguments)
    if queue_type == "quorum":
        args["x-queue-type"] = "quorum"
        if "x-dead-letter-exchange" in args:
            args.update({"x-dead-letter-strategy": "at-least-once", "x-overflow": "reject-publish"})
    return args or None


def declare_queue(channel, name: str, queue_type: str = "classic", **arguments) -> None:
    """A durable queue of `queue_type`. A queue of that name declared with other
    arguments raises QueueTypeMismatchError (the channel is closed by the broker)."""
    try:
        channel.queue_declare(name, durable=True, auto_delete=False,
                              arguments=queue_arguments(queue_type, **arguments))
    except amqp.exceptions.PreconditionFailed as exc:
        raise QueueTypeMismatchError(
            f"queue {name!r} exists with other arguments than a {queue_type} queue needs "
            f"({exc.reply_text}); a queue cannot change type: drain and delete it, "
            f"or set RETAILBUS.queue_type to what it is") from None


def declare_handler_queues(channel, exchange: str, routing_key: str, queue: str,
                           delays: list[float], exchange_type: str = EVENTS_EXCHANGE_TYPE,
                           single_active: bool = False, queue_type: str = "classic") -> None:
    """The handler queue bound to its exchange, its retry ladder and its DLQ.
    `single_active`: one consumer at a time (order-keeping handlers)."""
    declare_exchange(channel, exchange, exchange_type)
    declare_queue(channel, queue, queue_type,
                  **({"x-single-active-consumer": True} if single_active else {}))
    channel.queue_bind(queue, exchange, routing_key)
    for delay in sorted(set(delays)):
        declare_queue(channel, retry_queue(queue, delay), queue_type, **{
            "x-message-ttl": round(delay * 1000),
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": queue,
        })
    declare_queue(channel, dead_letter_queue(queue), queue_type)
