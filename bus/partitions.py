"""Posting scale-out that keeps each store's order: an ordered handler's queue split
into K queues by store.

One process consuming one queue posts every store's sales, so posting cannot grow
by adding processes. With `RETAILBUS.handlers["<service>.<method>"].partitions: K`
the handler's events reach a consistent-hash exchange (RabbitMQ's
rabbitmq_consistent_hash_exchange plugin, which ships with the broker) that hashes
the `x-retailbus-store` header, so all of a store's messages land in the same one
of K queues, in the order they were published. Each partition queue has a single
active consumer, its own retry ladder and DLQ, and is bound with the same weight,
so stores spread evenly.

Which process posts which partition: a process started as instance i of N
(`RETAILBUS_INSTANCE=i/N`, set by `retailbus up`) subscribes at once to the
partitions p with p % N == i, and `standby_after` seconds later to all the others
as a standby. RabbitMQ makes the first subscriber of a single-active-consumer queue
the active one, so the owners start posting in parallel; when a process dies its
unacked messages are requeued in order and a standby takes its partitions over at
once (the inbox makes a redelivered sale post once). A process without an instance
stands by for every partition from the start (alone, it posts them all).

A partition does not move back when its owner comes back: RabbitMQ 3.10 switches
the active consumer only when the active one goes away, and handing a partition
over while it holds unacked messages could post a store's later sale before an
earlier one. Restarting the process that holds two partitions rebalances them.
"""
from __future__ import annotations

import os

from contracts.errors import RetailbusError
from bus import topology

EXCHANGE_TYPE = "x-consistent-hash"
HASH_HEADER = "x-retailbus-store"  # bus.constants.H_STORE: the forwarder sets it on every message
WEIGHT = "100"  # points per queue on the hash ring: evens out a few dozen stores over K queues
ENV_INSTANCE = "RETAILBUS_INSTANCE"


class InstanceError(RetailbusError):
    """RETAILBUS_INSTANCE is not of the form i/N with 0 <= i < N."""


def partition_exchange(queue: str) -> str:
    """The consistent-hash exchange that feeds the partitions of `queue`."""
    return f"{queue}.by_store"


def partition_queue(queue: str, partition: int) -> str:
    return f"{queue}.p{partition}"


def partition_queues(queue: str, partitions: int) -> list[str]:
    """The queues a handler consumes: the queue itself, or its K partitions."""
    return [queue] if partitions <= 1 else [partition_queue(queue, p) for p in range(partitions)]


def instance(environ=os.environ) -> tuple[int, int] | None:
    """(i, N) from RETAILBUS_INSTANCE=i/N, or None when the process is not one of N."""
    value = environ.get(ENV_INSTANCE)
    if not value:
        return None
    try:
        i, n = (int(part) for part in value.split("/"))
    except ValueError:
        raise InstanceError(f"{ENV_INSTANCE}: expected i/N (e.g. 0/2), got {value!r}") from None
    if not 0 <= i < n:
        raise InstanceError(f"{ENV_INSTANCE}: expected 0 <= i < N, got {value!r}")
    return i, n


def owned(partitions: int, me: tuple[int, int] | None) -> tuple[list[int], list[int]]:
    """(partitions this process subscribes to at once, those it stands by for later)."""
    if me is None:
        return [], list(range(partitions))
    i, n = me
    mine = [p for p in range(partitions) if p % n == i]
    return mine, [p for p in range(partitions) if p % n != i]


def declare(channel, exchange: str, routing_key: str, queue: str, partitions: int, delays: list[float],
            queue_type: str = "classic") -> None:
    """The consistent-hash exchange bound to `exchange` for `routing_key`, and each
    partition queue as a single-active-consumer handler queue bound to it.

    The hash exchange is declared (with its header) before the handler queues'
    declarations declare it again without: RabbitMQ compares only an exchange's
    type and flags on a repeated declaration, so the header it was created with stays."""
    by_store = partition_exchange(queue)
    topology.declare_exchange(channel, exchange)

    def declare_by_store(ch):
        ch.exchange_declare(by_store, EXCHANGE_TYPE, durable=True, auto_delete=False,
                            arguments={"hash-header": HASH_HEADER})
        ch.exchange_bind(by_store, exchange, routing_key)
    # as topology's own declarations: a user that may not configure checks it exists instead
    topology._declare_or_verify(channel, declare_by_store, exchanges=[by_store])
    for name in partition_queues(queue, partitions):
        topology.declare_handler_queues(channel, by_store, WEIGHT, name, delays,
                                        exchange_type=EXCHANGE_TYPE, single_active=True,
                                        queue_type=queue_type)
