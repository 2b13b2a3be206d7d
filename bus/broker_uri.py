"""Where the bus is: the broker URI every component connects with.

`RETAILBUS_AMQP_URI` wins, then a non-empty `AMQP_URI` in bus.yaml, then the managed
local node or cluster (`retailbus broker start`). The managed broker's whereabouts
(its folder, ports and the credentials file it writes) are settings, so any process
can find it without importing the code that runs it (`services/broker/`).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

from contracts.errors import RetailbusError

AMQP_URI_ENV = "RETAILBUS_AMQP_URI"
CREDENTIALS_FILE = "credentials.json"


class BrokerError(RetailbusError, RuntimeError):
    """Raised when the managed broker cannot do what was asked (or cannot be found); the message says why."""


@dataclass(frozen=True)
class Credentials:
    user: str
    password: str = ""

    def __repr__(self) -> str:  # never leak the password through a repr or a log line
        return f"Credentials(user={self.user!r}, password='***')"

    __str__ = __repr__


def load_credentials(path: Path) -> Credentials | None:
    """The credentials a managed node wrote at its first start; None before that."""
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise BrokerError(f"{path}: unreadable credentials file ({exc.__class__.__name__})") from None
    try:
        return Credentials(user=str(raw["user"]), password=str(raw["password"]))
    except (KeyError, TypeError):
        raise BrokerError(f"{path}: expected keys 'user' and 'password'") from None


def node_credentials(home: Path) -> Credentials:
    """The credentials of the managed node living in `home`; BrokerError before its first start."""
    path = Path(home) / CREDENTIALS_FILE
    creds = load_credentials(path)
    if creds is None:
        raise BrokerError(f"no broker credentials in {path}: "
                          "run `retailbus broker start` first (or set RETAILBUS_AMQP_URI)")
    return creds


def node_uri(home: Path, port: int, vhost: str, show_password: bool = True) -> str:
    """The URI of the managed node living in `home` and listening on `port`."""
    creds = node_credentials(home)
    pw = quote(creds.password, safe="") if show_password else "***"
    return f"amqp://{quote(creds.user, safe='')}:{pw}@127.0.0.1:{port}/{quote(vhost, safe='')}"


def cluster_home(settings) -> Path:
    """`var/broker` → `var/broker-cluster`: beside the single node, never inside it."""
    home = settings.path(settings.broker.home)
    return home.with_name(home.name + "-cluster")


def cluster_node_home(home: Path, number: int) -> Path:
    """Where cluster node `number` (from 1) keeps its state."""
    return Path(home) / f"node{number}"


def managed_uri(settings, show_password: bool = True) -> str:
    """The managed node's URI, or every cluster node's joined by `;` (kombu's failover form).
    Cluster node i lives in `cluster_home/node<i>` on the configured port + i - 1."""
    b = settings.broker
    if b.nodes > 1:
        home = cluster_home(settings).absolute()
        return ";".join(node_uri(cluster_node_home(home, i + 1), b.port + i, b.vhost, show_password)
                        for i in range(b.nodes))
    return node_uri(settings.path(b.home).absolute(), b.port, b.vhost, show_password)


def mask_uri(uri: str) -> str:
    """The URI with its password replaced by ***; each node's in a cluster URI (`;`)."""
    if ";" in uri:
        return ";".join(mask_uri(node) for node in uri.split(";"))
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def with_user(uri: str, user: str, password: str) -> str:
    """`uri` logging in as `user` on EVERY node of a cluster URI (`;`): a component
    that fails over must still be itself, never whoever the first node named."""
    nodes = []
    for node in uri.split(";"):
        parts = urlsplit(node.strip())
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{host}" + (
            f":{parts.port}" if parts.port else "")
        nodes.append(urlunsplit(parts._replace(netloc=netloc)))
    return ";".join(nodes)


def resolve_amqp_uri(config: dict, settings) -> str:
    """Where the bus is: RETAILBUS_AMQP_URI, else a non-empty AMQP_URI in bus.yaml,
    else the managed local broker or cluster (RETAILBUS.broker.nodes)."""
    env = os.environ.get(AMQP_URI_ENV, "").strip()
    if env:
        return env
    configured = str((config or {}).get("AMQP_URI") or "").strip()
    if configured:
        return configured
    return managed_uri(settings)
