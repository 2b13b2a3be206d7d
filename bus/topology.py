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

Who declares: a component's own broker user may not configure exchanges or
queues (it could delete what others use), so the privileged setup step
(`retailbus broker users`, `retailbus up`) declares every exchange, queue and
binding of the configured components as the bus's own user. A component
declares the same on start; when the broker refuses (ACCESS_REFUSED) it checks
passively that each exchange and queue exists, and names the setup step when
one is missing. Declarations run on a channel of their own, so a refusal never
closes the caller's.

A handler moves a failed message to its retry queue or DLQ through the topic
exchange `retailbus.failed` (routing key = the target queue's name), never
through the default exchange: a user's topic permission there names only its
own queues, and no component needs write on the default exchange, which
reaches every queue.
"""
from __future__ import annotations

import amqp
from contracts.errors import RetailbusError

EVENTS_EXCHANGE_TYPE = "topic"
QUEUE_TYPES = ("classic", "quorum")
FAILED_EXCHANGE = "retailbus.failed"  # failed messages to retry queues and DLQs, key = the queue


class QueueTypeMismatchError(RetailbusError):
    """A queue exists on the broker with other arguments (e.g. classic, configured quorum)."""


class TopologyMissingError(RetailbusError):
    """An exchange or queue a component needs does not exist and its user may not declare it."""


def events_exchange(service: str) -> str:
    return f"{service}.events"


def commands_exchange(service: str) -> str:
    """Where processes send `service` their commands (bus/process): a topic exchange
    keyed by command type, like `<service>.events`, so a command is never mistaken for
    an event others announce."""
    return f"{service}.commands"


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
    _declare_or_verify(channel, lambda ch: ch.exchange_declare(name, kind, durable=True, auto_delete=False),
                       exchanges=[name])


def verify_exchange(channel, name: str, kind: str = EVENTS_EXCHANGE_TYPE) -> None:
    """Check passively that exchange `name` exists and declare it only when it does not:
    for an exchange components use but never declare (nameko's RPC exchange,
    bus/nameko_rpc.py), so a component's user, which may not, sends no declaration."""
    side = channel.connection.channel()
    try:
        side.exchange_declare(name, kind, passive=True)
        return
    except amqp.exceptions.NotFound:
        pass  # the broker closed the side channel; only the bus's own user may create it
    finally:
        if side.is_open:
            side.close()
    declare_exchange(channel, name, kind)


def _declare_or_verify(channel, declare, exchanges=(), queues=()) -> None:
    """`declare(side_channel)`; when the broker refuses it (the user may not configure),
    check passively that `exchanges` and `queues` exist instead."""
    conn = channel.connection
    side = conn.channel()
    try:
        declare(side)
    except amqp.exceptions.AccessRefused as refused:
        side = conn.channel()
        for kind, names in (("exchange", exchanges), ("queue", queues)):
            for name in names:
                try:
                    if kind == "exchange":
                        side.exchange_declare(name, "topic", passive=True)
                    else:
                        side.queue_declare(name, passive=True)
                except amqp.exceptions.NotFound:
                    raise TopologyMissingError(
                        f"{kind} {name!r} does not exist and this user may not declare it "
                        f"({refused.reply_text}); run the privileged setup: `retailbus broker users` "
                        f"or `retailbus up`") from None
    finally:
        if side.is_open:
            side.close()


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
    arguments raises QueueTypeMismatchError."""
    _declare_or_verify(channel, lambda ch: _queue(ch, name, queue_type, arguments), queues=[name])


def _queue(channel, name: str, queue_type: str, arguments: dict) -> None:
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
    """The handler queue bound to its exchange, its retry ladder and its DLQ, each
    reachable through FAILED_EXCHANGE. `single_active`: one consumer at a time
    (order-keeping handlers)."""
    retries = [retry_queue(queue, delay) for delay in sorted(set(delays))]
    dlq = dead_letter_queue(queue)

    def declare(ch):
        ch.exchange_declare(exchange, exchange_type, durable=True, auto_delete=False)
        ch.exchange_declare(FAILED_EXCHANGE, "topic", durable=True, auto_delete=False)
        _queue(ch, queue, queue_type, {"x-single-active-consumer": True} if single_active else {})
        ch.queue_bind(queue, exchange, routing_key)
        for delay, retry in zip(sorted(set(delays)), retries):
            _queue(ch, retry, queue_type, {
                "x-message-ttl": round(delay * 1000),
                "x-dead-letter-exchange": "",
                "x-dead-letter-routing-key": queue,
            })
        _queue(ch, dlq, queue_type, {})
        for target in (*retries, dlq):
            ch.queue_bind(target, FAILED_EXCHANGE, target)

    _declare_or_verify(channel, declare, exchanges=[exchange, FAILED_EXCHANGE], queues=[queue, *retries, dlq])
