"""Names and declarations of everything retailbus creates on the broker.

Events follow nameko's conventions (exchange `<service>.events`, routing key =
message type, queue `evt-<source>-<type>--<service>.<method>`), so a plain
nameko `event_handler` can still listen in. Each handler queue has its retry
queues (TTL, then dead-lettered back to the handler queue) and a parking
queue `<queue>.dlq`. Every queue is durable.
"""
from __future__ import annotations

EVENTS_EXCHANGE_TYPE = "topic"


def events_exchange(service: str) -> str:
    return f"{service}.events"


def handler_queue(source_service: str, event_type: str, service: str, method: str) -> str:
    return f"evt-{source_service}-{event_type}--{service}.{method}"


def retry_queue(queue: str, attempt: int) -> str:
    return f"{queue}.retry.{attempt}"


def dead_letter_queue(queue: str) -> str:
    return f"{queue}.dlq"


def declare_exchange(channel, name: str, kind: str = EVENTS_EXCHANGE_TYPE) -> None:
    channel.exchange_declare(name, kind, durable=True, auto_delete=False)


def declare_handler_queues(channel, exchange: str, routing_key: str, queue: str,
                           delays: list[float], exchange_type: str = EVENTS_EXCHANGE_TYPE,
                           single_active: bool = False) -> None:
    """The handler queue bound to its exchange, its retry ladder and its DLQ.
    `single_active`: one consumer at a time (order-keeping handlers)."""
    declare_exchange(channel, exchange, exchange_type)
    channel.queue_declare(queue, durable=True, auto_delete=False,
                          arguments={"x-single-active-consumer": True} if single_active else None)
    channel.queue_bind(queue, exchange, routing_key)
    for attempt, delay in enumerate(delays, start=1):
        channel.queue_declare(
            retry_queue(queue, attempt), durable=True, auto_delete=False,
            arguments={
                "x-message-ttl": int(delay * 1000),
                "x-dead-letter-exchange": "",
                "x-dead-letter-routing-key": queue,
            },
        )
    channel.queue_declare(dead_letter_queue(queue), durable=True, auto_delete=False)
