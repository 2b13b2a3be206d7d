"""bus/nameko_rpc.py replaces nameko's `get_rpc_exchange` so that nameko never declares
`nameko-rpc` (the bus's setup step does). These tests fail when an upgrade of nameko stops
taking its RPC exchange from that function, so the break shows in CI, not as a component
user refused at start (the permissions themselves: tests/integration/test_broker_users.py)."""
from __future__ import annotations

import nameko.rpc
import pytest
from nameko.containers import ServiceContainer
from nameko.rpc import ReplyListener, RpcConsumer, RpcProxy, rpc
from nameko.testing.utils import get_extension

import bus.extensions  # noqa: F401  (installs it, as every service and agent process does)
from bus.nameko_rpc import BusDeclaredExchange, rpc_exchange

pytestmark = pytest.mark.unit


class Pricing:
    name = "pricing"
    erp = RpcProxy("erp")

    @rpc
    def price(self, sku):
        return 1


def test_nameko_takes_its_rpc_exchange_from_the_bus():
    assert nameko.rpc.get_rpc_exchange is rpc_exchange
    exchange = nameko.rpc.get_rpc_exchange({"rpc_exchange": "custom-rpc"})
    assert isinstance(exchange, BusDeclaredExchange)
    assert (exchange.name, exchange.type, exchange.durable) == ("custom-rpc", "topic", True)
    assert nameko.rpc.get_rpc_exchange({}).name == "nameko-rpc"


def test_an_rpc_server_and_an_rpc_caller_bind_their_queues_to_the_bus_declared_exchange():
    container = ServiceContainer(Pricing, {"AMQP_URI": "amqp://u:p@127.0.0.1:1/retailbus"})  # never started
    for kind in (RpcConsumer, ReplyListener):
        extension = get_extension(container, kind)
        extension.setup()  # builds its kombu queue (registering with the queue consumer does no I/O)
        assert isinstance(extension.queue.exchange, BusDeclaredExchange), kind.__name__
        assert extension.queue.exchange.name == "nameko-rpc"
