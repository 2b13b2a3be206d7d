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

import pytest  # noqa: E402

from services.broker.node import start_on_free_ports as start_broker  # noqa: E402,F401
from services.broker.setup import free_ports  # noqa: E402


def free_port() -> int:
    return free_ports(1)[0]


def make_broker(folder):
    """A ManagedBroker in `folder` on three free ports (not started)."""
    from services.broker.node import ManagedBroker

    port, dist_port, management_port = free_ports(3)
    return ManagedBroker(folder, port=port, dist_port=dist_port, management_port=management_port)


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


KINDS = ("unit", "integration", "chaos")


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects: `pytest -m unit` must not drop an unmarked test
def pytest_collection_modifyitems(config, items):
    """Every test carries exactly one of the unit/integration/chaos markers, or the run fails
    naming it: the README's `pytest -m unit` and CI's sessions select by these markers."""
    wrong = []
    for item in items:
        kinds = sorted({mark.name for mark in item.iter_markers() if mark.name in KINDS})
        if len(kinds) != 1:
            wrong.append(f"  {item.nodeid}: {', '.join(kinds) or 'no marker'}")
    if wrong:
        raise pytest.UsageError(
            f"{len(wrong)} test(s) need exactly one of the markers {', '.join(KINDS)} "
            f"(usually a module-level pytestmark):\n" + "\n".join(wrong))
