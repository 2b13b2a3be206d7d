"""Each store agent publishes as its own broker user, allowed nothing but
publishing `pos.*` messages (and its `store.control_totals.v1`/`v2`, and its
click-and-collect reports `fulfilment.picked|collected|task_withdrawn.v1`) to
`store_agent.events`; with AMQP `user_id`
set to that user (the broker checks it), a consumer can trust which store
sent a message, and parks one that names another store (bus/identity.py;
`x-retailbus-original-user-id` keeps the sender on parked ones).

`retailbus agent broker-user --store S001` creates the user `store-S001`
on the managed broker with a generated password kept in
`var/stores/S001/broker_user.json` (mode 0600, never in git); the agent's
forwarder then connects with it. Without that file it uses the bus URI.
"""
from __future__ import annotations

import json
import os
import re
import secrets
from pathlib import Path

from bus import identity, topology
from bus.broker_uri import with_user
from bus.publisher import connect

EXCHANGE = "store_agent.events"
# its sales and returns, its control totals, what its associates report on click-and-collect tasks
TOPIC_WRITE = r"^(?:pos\..+|store\.control_totals\.v[12]|fulfilment\.(?:picked|collected|task_withdrawn)\.v1)$"


def store_user(store_id: str) -> str:
    return identity.store_user(store_id)


def permissions() -> dict:
    """configure (none: the exchange is declared by the setup step, and a store must not
    be able to delete it), write, read; topic write."""
    only = f"^{re.escape(EXCHANGE)}$"
    return dict(configure="^$", write=only, read="^$", topic_exchange=EXCHANGE, topic_write=TOPIC_WRITE)


def credentials_path(outbox_path: Path) -> Path:
    return outbox_path.parent / "broker_user.json"


def provision(broker, store_id: str, path: Path) -> str:
    """Create (or re-key) the store's user on `broker`; returns its user name."""
    user, password = store_user(store_id), secrets.token_urlsafe(24)
    broker.ensure_user(user, password, **permissions())
    conn = connect(broker.uri(), 10.0)  # the exchange, declared by the privileged user it may not be
    try:
        topology.declare_exchange(conn.channel(), EXCHANGE)
    finally:
        conn.collect()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"user": user, "password": password}, f)
    return user


def store_uri(bus_uri: str, path: Path) -> str:
    """The bus URI with the store's own user on every node, once it has been provisioned
    (a cluster URI names each node: failing over must not log in as anyone else)."""
    try:
        creds = json.loads(path.read_text())
    except FileNotFoundError:
        return bus_uri
    return with_user(bus_uri, creds["user"], creds["password"])
