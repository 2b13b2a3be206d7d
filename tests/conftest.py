"""Session fixtures shared by all tests.

Only tests that request `broker` / `amqp_uri` start RabbitMQ; unit tests never do.
The node is our own (a ManagedBroker in a temporary folder on free ports) and is
stopped by its own stop() at the end of the session, never by process name.
"""
from __future__ import annotations

import warnings

warnings.filterwarnings("ignore", message=r"\s*Eventlet is deprecated")  # nameko 2.14 needs it

import eventlet  # noqa: E402

eventlet.monkey_patch()  # nameko runs services on eventlet; tests host containers in-process

import socket  # noqa: E402

import pytest


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_ports(n: int) -> list[int]:
    """n distinct free ports (held open together, so they differ)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def make_broker(folder):
    """A ManagedBroker in `folder` on three free ports (not started)."""
    from services.broker import ManagedBroker

    port, dist_port, management_port = free_ports(3)
    return ManagedBroker(folder, port=port, dist_port=dist_port, management_port=management_port)


PORT_CLASH = ("already in use", "already_used", "eaddrinuse")


def start_broker(folder, attempts: int = 3):
    """make_broker + start, retrying on new ports when one was taken between our
    check and the node's bind (ports come from the ephemeral range, so can race)."""
    from services.broker import BrokerError

    for attempt in range(attempts):
        b = make_broker(folder)
        try:
            b.start()
            return b
        except BrokerError as exc:
            if attempt == attempts - 1 or not any(s in str(exc).lower() for s in PORT_CLASH):
                raise


@pytest.fixture(scope="session")
def broker(tmp_path_factory):
    """One RabbitMQ node for the whole session, started on first use."""
    b = start_broker(tmp_path_factory.mktemp("broker"))
    try:
        yield b
    finally:
        try:
            b.stop()
        finally:
            if b.is_running():  # stop() raised or timed out: do not leave it behind
                b.kill()


@pytest.fixture(scope="session")
def amqp_uri(broker) -> str:
    return broker.uri()


@pytest.fixture(scope="session")
def postgres():
    """A throwaway PostgreSQL cluster (tests/postgres.py); yields its SQLAlchemy DSN."""
    from tests.postgres import PostgresCluster

    cluster = PostgresCluster().start()
    try:
        yield cluster.dsn()
    finally:
        cluster.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def legacy_dsn(request, tmp_path):
    """An empty legacy database of each kind: a SQLite file, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'legacy_erp.db'}"
    from sqlalchemy import create_engine, text

    base = request.getfixturevalue("postgres")
    name = f"legacy_{len(request.node.name)}_{abs(hash(request.node.nodeid)) % 10**9}"
    engine = create_engine(base, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))  # our own generated name
    finally:
        engine.dispose()
    return base.rsplit("/", 1)[0] + "/" + name
