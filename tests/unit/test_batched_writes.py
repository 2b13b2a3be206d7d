"""BatchedWrites in a real container on a real SQLite file: concurrent workers' items
share one transaction, each worker gets its own result only once it is committed,
and a bad item fails alone (its error in its place) while the rest of its batch commits."""
from __future__ import annotations

import eventlet
import pytest
import sqlalchemy as sa
from eventlet.event import Event
from nameko.extensions import Entrypoint
from nameko.testing.services import dummy, entrypoint_hook
from nameko.testing.utils import get_extension

from legacy_wrappers.batched_writes import BatchedWrites
from legacy_wrappers.legacy_db import engine_for

pytestmark = pytest.mark.unit

ROWS = sa.Table("ROWS", sa.MetaData(), sa.Column("ID", sa.Integer, primary_key=True),
                sa.Column("NAME", sa.String(8), nullable=False))
BATCHES: list[list[int]] = []


def write_rows(conn, items):
    """One multi-row insert for the batch; an item of 0 is refused (a bad value)."""
    BATCHES.append(list(items))
    if 0 in items:
        raise ValueError("0 cannot be stored")
    conn.execute(ROWS.insert(), [{"ID": i, "NAME": f"n{i}"} for i in items])
    return [f"stored {i}" for i in items]


class Service:
    name = "writes"
    writes = BatchedWrites(write_rows)

    @dummy
    def write(self, item):
        [result] = self.writes([item])
        return result

    @dummy
    def write_many(self, items):
        return self.writes(items)


@pytest.fixture
def container(tmp_path, container_factory):
    dsn = f"sqlite:///{tmp_path / 'rows.db'}"
    engine = engine_for(dsn)
    ROWS.metadata.create_all(engine)
    BATCHES.clear()
    container = container_factory(Service, {"LEGACY_DB_URI": dsn, "AMQP_URI": "amqp://unused", "max_workers": 50})
    container.start()
    yield container, engine
    engine.dispose()


def stored(engine) -> list[int]:
    with engine.connect() as conn:
        return sorted(conn.execute(sa.select(ROWS.c.ID)).scalars())


def write_all(container, items):
    """Each item by its own worker, all at once; the result (or error) of each.
    (entrypoint_hook cannot: its waiter answers with the first worker to finish.)"""
    entrypoint = get_extension(container, Entrypoint, method_name="write")

    def one(item):
        done = Event()

        def handle_result(worker_ctx, result=None, exc_info=None):
            done.send(exc_info[1] if exc_info else result)
            return result, exc_info
        container.spawn_worker(entrypoint, (item,), {}, handle_result=handle_result)
        return done.wait()
    return list(eventlet.GreenPool(50).imap(one, items))


def test_concurrent_workers_share_commits_and_each_gets_its_own_result(container):
    container, engine = container
    results = write_all(container, range(1, 41))
    assert results == [f"stored {i}" for i in range(1, 41)]
    assert stored(engine) == list(range(1, 41))
    assert len(BATCHES) < 40 and max(len(b) for b in BATCHES) > 1  # shared, not one commit each


def test_a_bad_item_fails_alone_and_its_batch_commits(container):
    container, engine = container
    results = write_all(container, [1, 2, 0, 3, 4])
    assert isinstance(results[2], ValueError) and "0 cannot be stored" in str(results[2])
    assert [r for i, r in enumerate(results) if i != 2] == ["stored 1", "stored 2", "stored 3", "stored 4"]
    assert stored(engine) == [1, 2, 3, 4]
    assert [0] in BATCHES  # the failed batch was written again item by item


def test_one_worker_hands_over_many_items_and_gets_each_result_in_place(container):
    container, engine = container
    with entrypoint_hook(container, "write_many") as write_many:
        results = write_many([1, 0, 2])
    assert results[0] == "stored 1" and results[2] == "stored 2"
    assert isinstance(results[1], ValueError) and "0 cannot be stored" in str(results[1])
    assert stored(engine) == [1, 2]
