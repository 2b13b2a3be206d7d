"""Pooled PostgreSQL connections the server dropped: replaced before use when idle, and
recognised as a disconnect (the pool refreshed) when they die in steady use."""
import pytest
import sqlalchemy as sa
from sqlalchemy.exc import DBAPIError

from legacy_wrappers import legacy_db

pytestmark = pytest.mark.integration

BACKEND = "SELECT pg_backend_pid()"


def terminate(dsn: str, pid: int) -> None:
    admin = sa.create_engine(dsn, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            assert conn.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid}).scalar()
    finally:
        admin.dispose()


@pytest.fixture
def engine(postgres):
    engine = legacy_db.engine_for(postgres)
    yield engine
    engine.dispose()


def test_an_idle_connection_the_server_dropped_is_replaced_before_use(engine, postgres, monkeypatch):
    with engine.connect() as conn:
        first = conn.exec_driver_sql(BACKEND).scalar()
    terminate(postgres, first)
    monkeypatch.setattr(legacy_db, "PING_IDLE_SECONDS", 0.0)  # idle long enough to be pinged
    with engine.connect() as conn:
        assert conn.exec_driver_sql(BACKEND).scalar() != first  # no error: a new connection


def test_a_connection_dropped_in_steady_use_fails_once_and_the_pool_recovers(engine, postgres):
    with engine.connect() as conn:
        first = conn.exec_driver_sql(BACKEND).scalar()
    terminate(postgres, first)
    with engine.connect() as conn, pytest.raises(DBAPIError) as failed:  # checked out again at once: no ping
        conn.exec_driver_sql(BACKEND)
    assert failed.value.connection_invalidated
    with engine.connect() as conn:
        assert conn.exec_driver_sql(BACKEND).scalar() != first
