"""One broker user per component, allowed only what its code does on the broker.

`retailbus broker users` reads `RETAILBUS.services` and `RETAILBUS.stores`,
loads each service class and walks its entrypoints and dependencies (without
starting anything): a `reliable_handler` reads its queue and publishes failed
messages to its own retry queues and DLQ through `retailbus.failed` (topic
permission: those queue names only); an `EventPublisher` writes its
`<service>.events`; a nameko `@rpc` the `nameko-rpc` exchange and
`rpc-<service>`; and so on (`_describers`). The result is one configure, write
and read regex per user, plus topic permissions on every topic exchange it
touches: the routing keys it may publish and bind. `RETAILBUS.broker.access`
adds permissions for extensions this module cannot read.

Topology is declared here, not by the components: `declare_topology` creates
every exchange, queue and binding the walk found, as the bus's own user
(`retailbus broker users` and `retailbus up` run it). So no component user has
configure on an exchange (which would let it delete one others use) or write
on the default exchange (which reaches every queue); components only check
passively that what they use exists (bus/topology.py). That includes nameko's
RPC exchange `nameko-rpc`, which nameko would declare itself (bus/nameko_rpc.py);
nameko still declares its queues, so an RPC server has configure on
`rpc-<service>` and a caller on its own reply queues, on no exchange.

Per store there are two users: `store-<S>` (routing/broker_user.py) may only
publish `pos.*` and its control totals to `store_agent.events`, with its own
`user_id` (consumers park a message whose store is not its sender's,
bus/identity.py); the agent's container (`agent-<S>`) reads its route-table
and stock queues and asks the ERP over RPC for stock and shadow comparisons,
and the loyalty service for its tills' redemptions, only. No user has a tag (so none is an administrator).

Their passwords and how they reach the broker: services/broker/credentials.py.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from nameko.containers import ServiceContainer
from nameko.extensions import iter_extensions
from nameko.rpc import Rpc, get_rpc_exchange

from routing import broker_user
from bus import partitions, topology
from bus.settings import RetailbusSettings

CREDENTIALS_DIR = Path("var/broker_users")
ANY = ".*"
UUID = "[0-9a-f-]+"


@dataclass
class Access:
    """What a component does on the broker: regex fragments per permission, per
    topic exchange the routing keys it publishes (`topic_write`) and binds
    (`topic_read`), and what the privileged setup declares for it (`declares`:
    ("exchange", name, type), ("handler", exchange, type, key, queue, delays, ordered) and
    ("partitioned", exchange, key, queue, partitions, delays))."""

    configure: set[str] = field(default_factory=set)
    write: set[str] = field(default_factory=set)
    read: set[str] = field(default_factory=set)
    topic_write: dict[str, set[str]] = field(default_factory=dict)
    topic_read: dict[str, set[str]] = field(default_factory=dict)
    declares: set[tuple] = field(default_factory=set)

    def update(self, other: Access) -> Access:
        self.configure |= other.configure
        self.write |= other.write
        self.read |= other.read
        self.declares |= other.declares
        for mine, theirs in ((self.topic_write, other.topic_write), (self.topic_read, other.topic_read)):
            for exchange, keys in theirs.items():
                mine.setdefault(exchange, set()).update(keys)
        return self

    def permissions(self) -> tuple[str, str, str]:
        return alternation(self.configure), alternation(self.write), alternation(self.read)

    def topic_permissions(self) -> dict[str, tuple[str, str]]:
        """Exchange -> (write, read) routing-key regexes; `^$` when it does neither."""
        exchanges = sorted(set(self.topic_write) | set(self.topic_read))
        return {x: (alternation(self.topic_write.get(x, set())), alternation(self.topic_read.get(x, set())))
                for x in exchanges}


def alternation(fragments: set[str]) -> str:
    """One anchored regex for all fragments; `^$` (nothing) when there are none."""
    if not fragments:
        return "^$"
    if ANY in fragments:
        return ANY
    return "^(?:" + "|".join(sorted(fragments)) + ")$"


def lit(name: str) -> str:
    return re.escape(name)


# ---------------------------------------------------------------------- what each extension needs
def _handler_queues(exchange: str, exchange_type: str, keys: list[str], queue: str,
                    delays: list[float], ordered: bool = False) -> Access:
    """Consuming the queue, and moving a failed message to its own retry queues or DLQ
    through `retailbus.failed`; the setup step declares the queues and bindings."""
    failed = topology.FAILED_EXCHANGE
    return Access(write={lit(failed)}, read={lit(queue)},
                  # its retry queues and DLQ (and those of its partitions: `<queue>.<part>.…`)
                  topic_write={failed: {lit(queue) + r"(?:\.[^.]+)?\.(?:retry\.\d+ms|dlq)"}},
                  declares={("handler", exchange, exchange_type, key, queue, tuple(delays), ordered)
                            for key in keys})


def _retry_delays(service: str, method: str, config: dict) -> tuple[list[float], bool | None]:
    """The handler's retry delays and `ordered` override, as its `setup` reads them."""
    from bus import retry
    from bus.settings import retailbus_settings

    settings = retailbus_settings(config)
    override = settings.handlers.get(f"{service}.{method}")
    return list(retry.policy_for(settings, f"{service}.{method}").delays), override and override.ordered


def _reliable_handler(ext, service: str, config: dict) -> Access:
    exchange = ext._exchange or topology.events_exchange(ext.source_service)
    queue = (ext._queue.format(**config) if ext._queue else
             topology.handler_queue(ext.source_service, ext.event_type, service, ext.method_name))
    delays, ordered = _retry_delays(service, ext.method_name, config)
    parts = _partitions(service, ext.method_name, config)
    if parts > 1:  # its K queues by store (bus/partitions.py) instead of the one
        access = _handler_queues(exchange, ext.exchange_type, [], queue, delays, True)
        access.read = {lit(q) for q in partitions.partition_queues(queue, parts)}
        access.declares = {("partitioned", exchange, ext.event_type, queue, parts, tuple(delays))}
        return access
    return _handler_queues(exchange, ext.exchange_type, [ext.event_type.format(**config)], queue, delays,
                           ext.ordered if ordered is None else ordered)


def _partitions(service: str, method: str, config: dict) -> int:
    from bus.settings import retailbus_settings

    override = retailbus_settings(config).handlers.get(f"{service}.{method}")
    return override.partitions if override else 1


def _batch_file_consumer(ext, service: str, config: dict) -> Access:
    exchange = topology.events_exchange(ext.source_service)
    queue = topology.handler_queue(ext.source_service, "batch", service, ext.method_name)
    return _handler_queues(exchange, "topic", list(ext.event_types), queue, [])


def _own_events(ext, service: str, config: dict) -> Access:
    """Publishes to its exchange; `EventPublisher(exchange=…)` to another."""
    exchange = getattr(ext, "_exchange", None) or topology.events_exchange(service)
    return Access(write={lit(exchange)}, topic_write={exchange: {ANY}},
                  declares={("exchange", exchange, topology.EVENTS_EXCHANGE_TYPE)})


def _rpc_server(ext, service: str, config: dict) -> Access:
    """nameko's `@rpc`: queue `rpc-<service>` bound `<service>.*`; replies go back
    through the RPC exchange with the caller's reply key (a UUID)."""
    exchange, queue = get_rpc_exchange(config).name, f"rpc-{service}"
    return Access(configure={lit(queue)}, write={lit(exchange), lit(queue)},
                  read={lit(exchange), lit(queue)}, topic_write={exchange: {UUID}},
                  topic_read={exchange: {lit(f"{service}.*")}}, declares={("exchange", exchange, "topic")})


def rpc_client(config: dict, target: str, methods: tuple[str, ...]) -> Access:
    """A standalone `ClusterRpcProxy` calling `methods` of `target`: its own reply queue
    bound with a UUID key, calls published as `<target>.<method>` (those methods only:
    a store-side user must not reach, say, `erp.post_sale`)."""
    exchange, reply = get_rpc_exchange(config).name, r"rpc\.reply-standalone_rpc_proxy-" + UUID
    return Access(configure={reply}, write={lit(exchange), reply},
                  read={lit(exchange), reply}, topic_write={exchange: {lit(f"{target}.{m}") for m in methods}},
                  topic_read={exchange: {UUID}}, declares={("exchange", exchange, "topic")})


def _store_stock(ext, service: str, config: dict) -> Access:
    """The stock feed (its own queue on `erp.events`, which it binds) and the ERP stock RPC."""
    from routing.stock_cache import FEED_TYPES, stock_queue

    queue, exchange = stock_queue(config["STORE_ID"]), topology.events_exchange("erp")
    feed = Access(write={lit(queue)}, read={lit(queue), lit(exchange)},
                  topic_read={exchange: {lit(k) for k in FEED_TYPES}},
                  declares={("exchange", exchange, topology.EVENTS_EXCHANGE_TYPE), ("queue", queue)})
    return feed.update(rpc_client(config, "erp", ("stock_level",)))


def _shadow(ext, service: str, config: dict) -> Access:
    return rpc_client(config, "erp", ("shadow_compare",))


def _till_loyalty(ext, service: str, config: dict) -> Access:
    """A store agent authorises its tills' redemptions at the loyalty service, and settles them."""
    from routing.loyalty_rpc import METHODS, SERVICE

    return rpc_client(config, SERVICE, METHODS)


def _route_broadcast(ext, service: str, config: dict) -> Access:
    """The route guard applies a rolled-back table: a publish to the fanout exchange."""
    from routing.control import ROUTES_EXCHANGE

    return Access(write={lit(ROUTES_EXCHANGE)}, declares={("exchange", ROUTES_EXCHANGE, "fanout")})


def _journal(ext, service: str, config: dict) -> Access:
    """Every process sends its hops to `journal.events`, declaring the journal's queue first."""
    from bus.journal import EXCHANGE, HOPS_TYPE, QUEUE

    declared = _handler_queues(EXCHANGE, "topic", [HOPS_TYPE], QUEUE, []).declares
    return Access(write={lit(EXCHANGE)}, topic_write={EXCHANGE: {lit(HOPS_TYPE)}}, declares=declared)


def _dead_letters(ext, service: str, config: dict) -> Access:
    """The dlq service reads (never acks) every handler's `<queue>.dlq`."""
    from services.dlq.store import handler_queues
    from bus.settings import retailbus_settings

    queues = handler_queues(config, retailbus_settings(config))
    return Access(read={lit(topology.dead_letter_queue(q)) for q in queues})


def _command_handler(ext, service: str, config: dict) -> Access:
    """A reliable handler on `<service>.commands` that answers on `<service>.events`."""
    events = topology.events_exchange(service)
    return _reliable_handler(ext, service, config).update(Access(
        write={lit(events)}, topic_write={events: {ANY}},
        declares={("exchange", events, topology.EVENTS_EXCHANGE_TYPE)}))


def _process_manager(ext, service: str, config: dict) -> Access:
    """A process (bus/process) sends its steps' commands to `<target>.commands` (any command
    type: a step's command is built at run time) and opens cases on its own `<service>.events`."""
    from contracts.cases import CaseOpenedV1

    commands = {topology.commands_exchange(target) for target in ext.definition.targets()}
    events = topology.events_exchange(service)
    return Access(write={lit(x) for x in commands | {events}},
                  topic_write={**{x: {ANY} for x in commands}, events: {lit(CaseOpenedV1.TYPE)}},
                  declares={("exchange", x, topology.EVENTS_EXCHANGE_TYPE) for x in commands | {events}})


def _store_outbox(ext, service: str, config: dict) -> Access:
    return Access()  # its forwarder publishes as the store's own user (routing/broker_user.py)


def _describers() -> dict[type, Callable[..., Access]]:
    from legacy_wrappers.filedrop.outbound import BatchFileConsumer
    from routing.store_agent import StoreOutbox, StoreStock
    from routing.guard import GuardWatch
    from routing.shadow import ShadowComparer
    from routing.till_loyalty import TillRedemption
    from bus.consumer import ReliableHandler
    from bus.extensions import EventPublisher
    from bus.journal import Journal
    from bus.process import ProcessManager
    from bus.process.commands import CommandHandler
    from services.dlq.service import DeadLetters
    from services.erp.outbox import Outbox

    return {CommandHandler: _command_handler,  # before ReliableHandler: the first class that matches describes
            ReliableHandler: _reliable_handler, BatchFileConsumer: _batch_file_consumer,
            EventPublisher: _own_events, Outbox: _own_events, Rpc: _rpc_server,
            StoreStock: _store_stock, ShadowComparer: _shadow, GuardWatch: _route_broadcast,
            StoreOutbox: _store_outbox, Journal: _journal, DeadLetters: _dead_letters,
            TillRedemption: _till_loyalty, ProcessManager: _process_manager}


def _uses_broker(ext) -> bool:
    """An extension we have no description for that holds a broker connection."""
    from nameko.messaging import QueueConsumer
    from nameko.rpc import ReplyListener
    from bus.queue_consumer import ReliableConsumer
    from bus.extensions import BusConnection

    return any(isinstance(sub, (BusConnection, ReliableConsumer, QueueConsumer, ReplyListener))
               for sub in iter_extensions(ext))


# ---------------------------------------------------------------------- components
@dataclass
class Component:
    name: str       # as `retailbus up` names it: erp, store-agent-S001, store-S001
    user: str
    credentials: Path
    access: Access
    unknown: list[str] = field(default_factory=list)


def service_class(module: str):
    """The nameko service class of `module` (what `nameko run module` runs)."""
    from nameko.cli.run import import_service

    classes = import_service(module)
    if len(classes) != 1:
        raise ValueError(f"{module}: expected one service class, found {len(classes)}")
    return classes[0]


def derive(cls, config: dict) -> tuple[Access, list[str]]:
    """(access, extensions we could not describe) of service class `cls` under `config`."""
    container = ServiceContainer(cls, {"AMQP_URI": "", **config})  # built, never started
    describers, access, unknown = _describers(), Access(), []
    for ext in sorted([*container.entrypoints, *container.dependencies], key=repr):
        described = False
        for part in (ext, *iter_extensions(ext)):  # e.g. the Journal inside every reliable_handler
            describe = next((f for t, f in describers.items() if isinstance(part, t)), None)
            if describe is not None:
                access.update(describe(part, container.service_name, config))
                described = True
        if not described and _uses_broker(ext):
            unknown.append(f"{type(ext).__module__}.{type(ext).__name__}")
    return access, unknown


def _override(access: Access, settings: RetailbusSettings, name: str) -> Access:
    extra = settings.broker.access.get(name)
    if extra is not None:
        access.configure.update(extra.configure)
        access.write.update(extra.write)
        access.read.update(extra.read)
    return access


def identity(settings: RetailbusSettings, name: str) -> tuple[str, Path]:
    """(user, credentials file) of the component `retailbus up` calls `name`."""
    user = f"agent-{name.removeprefix('store-agent-')}" if name.startswith("store-agent-") else f"svc-{name}"
    return user, settings.path(CREDENTIALS_DIR) / f"{user}.json"


def components(settings: RetailbusSettings, config: dict) -> list[Component]:
    """Every component of the config with what it may do on the broker."""
    found = []
    for name, service in settings.services.items():
        access, unknown = derive(service_class(service.module), config)
        found.append(Component(name, *identity(settings, name), _override(access, settings, name), unknown))
    agent_cls = service_class("routing.store_agent") if settings.stores else None
    for store in settings.stores:
        name = f"store-agent-{store.id}"
        access, unknown = derive(agent_cls, {**config, "STORE_ID": store.id})
        found.append(Component(name, *identity(settings, name), _override(access, settings, name), unknown))
        found.append(Component(  # the same rights as `retailbus agent broker-user` gives
            broker_user.store_user(store.id), broker_user.store_user(store.id),
            broker_user.credentials_path(settings.outbox_path(store)),
            Access(write={lit(broker_user.EXCHANGE)}, topic_write={broker_user.EXCHANGE: {broker_user.TOPIC_WRITE}},
                   declares={("exchange", broker_user.EXCHANGE, topology.EVENTS_EXCHANGE_TYPE)})))
    return found


def declare_topology(uri: str, found: list[Component], queue_type: str, connect_timeout: float = 10.0) -> int:
    """Declare, as the bus's own (privileged) user at `uri`, every exchange, queue and
    binding the components use; returns how many declarations ran."""
    from bus.publisher import connect

    declares = sorted({d for c in found for d in c.access.declares}, key=repr)
    conn = connect(uri, connect_timeout)
    try:
        channel = conn.channel()
        for kind, *args in declares:
            if kind == "exchange":
                topology.declare_exchange(channel, args[0], args[1])
            elif kind == "queue":
                topology.declare_queue(channel, args[0], queue_type)
            elif kind == "partitioned":
                exchange, key, queue, parts, delays = args
                partitions.declare(channel, exchange, key, queue, parts, list(delays), queue_type)
            else:
                exchange, exchange_type, key, queue, delays, ordered = args
                topology.declare_handler_queues(channel, exchange, key, queue, list(delays), exchange_type,
                                                single_active=ordered, queue_type=queue_type)
    finally:
        conn.collect()
    return len(declares)
