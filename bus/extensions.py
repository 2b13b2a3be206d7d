"""nameko glue for the messaging core: one publisher per container, and the
`EventPublisher` dependency that services use to emit CloudEvents. Every process
that runs a service or a store agent imports it, so it is where nameko's RPC is
handed the exchange the bus declares (bus/nameko_rpc.py)."""
from __future__ import annotations

import gc
import logging

import amqp
from nameko.extensions import DependencyProvider, SharedExtension

from contracts.envelope import CloudEvent
from bus import nameko_rpc, topology
from bus.broker_uri import resolve_amqp_uri
from bus.publisher import ConfirmingPublisher, OutgoingMessage, connect
from bus.settings import RetailbusSettings, retailbus_settings

log = logging.getLogger(__name__)

nameko_rpc.install()

# nameko leaves every worker's context in a reference cycle, so a service running
# thousands of workers a second feeds the cyclic collector constantly; at CPython's
# default first-generation threshold (700 allocations) collections took ~25 % of the
# erp's CPU in bench_erp (1.63 -> 1.1-1.35 ms a sale at 50,000). The cycles are
# still collected, only in larger, rarer passes. Only ever raised.
# What the process holds by the time its first container is set up (modules, contract
# models, SQLAlchemy metadata: most of the heap) is frozen once, so the older
# generations' passes no longer walk it: another ~5-10 % of the erp's CPU a sale.
GC_FIRST_GENERATION = 50_000
_frozen = False


def relax_gc() -> None:
    global _frozen
    first, *older = gc.get_threshold()
    gc.set_threshold(max(first, GC_FIRST_GENERATION), *older)
    if not _frozen:
        _frozen = True
        gc.collect()  # garbage frozen now would never be freed
        gc.freeze()


def container_settings(config: dict) -> tuple[str, RetailbusSettings]:
    """The broker URI and the RETAILBUS settings a service container runs with."""
    settings = retailbus_settings(config)
    return resolve_amqp_uri(config, settings), settings


class BusConnection(SharedExtension):
    """The container's confirming publisher; declares the exchanges it publishes to."""

    def __init__(self):
        self.exchanges: set[str] = set()
        self.publisher: ConfirmingPublisher | None = None

    def setup(self):
        relax_gc()  # every bus service has this extension
        self.uri, self.settings = container_settings(self.container.config)
        pub = self.settings.publisher
        self.publisher = ConfirmingPublisher(
            self.uri, window=pub.window, window_bytes=pub.window_bytes, confirm_timeout=pub.confirm_timeout,
            connect_timeout=pub.connect_timeout, on_connect=self._declare_exchanges,
        )

    def register_exchange(self, name: str):
        self.exchanges.add(name)

    def _declare_exchanges(self, channel: amqp.Channel):
        for name in sorted(self.exchanges):
            topology.declare_exchange(channel, name)

    def open_channel(self) -> amqp.Connection:
        """A separate short-lived connection for blocking calls (declarations)."""
        return connect(self.uri, self.settings.publisher.connect_timeout)

    def stop(self):
        self.publisher.close()

    def kill(self):
        self.publisher.close()


def event_message(event: CloudEvent, exchange: str, routing_key: str | None = None,
                  user_id: str | None = None) -> OutgoingMessage:
    return OutgoingMessage(
        exchange=exchange,
        routing_key=routing_key or event.type,
        body=event.to_json(),
        message_id=event.id,
        correlation_id=event.correlationid,
        type=event.type,
        user_id=user_id,
    )


class EventPublisher(DependencyProvider):
    """`self.events.publish(event)` returns once the broker has confirmed the event.

    Events go to `<service>.events` with the event type as routing key, like
    nameko's EventDispatcher, but persistent, mandatory and confirmed.
    """

    bus = BusConnection()

    def __init__(self, exchange: str | None = None):
        self._exchange = exchange

    def setup(self):
        self.exchange = self._exchange or topology.events_exchange(self.container.service_name)
        self.bus.register_exchange(self.exchange)

    def get_dependency(self, worker_ctx):
        return _Publish(self.bus.publisher, self.exchange)


class _Publish:
    def __init__(self, publisher: ConfirmingPublisher, exchange: str):
        self._publisher = publisher
        self.exchange = exchange

    def publish(self, event: CloudEvent, routing_key: str | None = None) -> None:
        self._publisher.publish(event_message(event, self.exchange, routing_key))

    def publish_message(self, message: OutgoingMessage) -> None:
        """An event already written by `event_message(event, self.exchange)`: lets a caller
        drop a large event's data before the confirm wait (the files service's chunks)."""
        self._publisher.publish(message)

    def publish_many(self, events: list[CloudEvent]) -> list[Exception | None]:
        return self._publisher.publish_many([event_message(e, self.exchange) for e in events])
