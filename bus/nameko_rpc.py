"""nameko's RPC exchange (`nameko-rpc`) as the bus declares it: by the privileged setup
step, never by a component.

nameko declares its RPC exchange itself, through kombu, wherever it declares an RPC
queue (an `@rpc` service's `rpc-<service>`, every caller's reply queue). Declaring needs
configure permission on the exchange, and configure includes `exchange.delete`: any
component with RPC could delete the exchange every RPC call of the bus goes through.
So `retailbus broker users` / `retailbus up` declare it as the bus's own user
(services/broker/users.py, `declare_topology`), and components get no configure on it.

This is one of our few touches of nameko internals (bus/wire.py holds the py-amqp
ones): every nameko RPC extension, the standalone proxies included, gets its exchange
from `nameko.rpc.get_rpc_exchange`, looked up in that module at call time, so replacing
that one function (`install`, run when the `bus` package is imported) covers them all;
tests/unit/test_nameko_rpc.py fails when an upgrade of nameko changes that. The
exchange it returns never declares itself: kombu's declaration checks passively that it
exists, and creates it only when it does not (the bus's own user may: a service run
alone against a fresh broker, as the tests do), once per process and broker. A
component whose user may not create it fails with TopologyMissingError naming the
setup step, instead of sending a declaration the broker refuses.
"""
from __future__ import annotations

import nameko.rpc
from kombu import Exchange

from bus import topology

_nameko_rpc_exchange = nameko.rpc.get_rpc_exchange
_verified: set[tuple[str, str, str]] = set()  # (broker host, vhost, exchange) this process checked


class BusDeclaredExchange(Exchange):
    """A kombu exchange that only checks it exists (see the module's docstring)."""

    def declare(self, nowait=False, passive=None, channel=None):
        channel = channel or self.channel
        conn = channel.connection
        where = (str(conn.host), str(conn.virtual_host), self.name)
        if where not in _verified:
            topology.verify_exchange(channel, self.name, self.type)
            _verified.add(where)


def rpc_exchange(config: dict) -> BusDeclaredExchange:
    """nameko's RPC exchange for `config` (its name, type and durability), declared by the bus."""
    exchange = _nameko_rpc_exchange(config)
    return BusDeclaredExchange(exchange.name, exchange.type, durable=exchange.durable)


def install() -> None:
    nameko.rpc.get_rpc_exchange = rpc_exchange
