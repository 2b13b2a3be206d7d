"""The process engine's store on SQLite and PostgreSQL: starts of one key racing make one
instance; two transitions of one instance racing: the one that commits first wins, the other
raises ConcurrentUpdate (its message is retried); and the returns service runs its instances on
PostgreSQL end to end."""
from __future__ import annotations

import time
from typing import ClassVar

import eventlet
import pytest
from pydantic import BaseModel, ConfigDict
from sqlalchemy import create_engine, text

from contracts.envelope import CloudEvent
from bus.process import store
from bus.process.definition import ProcessDefinition, Step
from bus.process.engine import REPLY_SUFFIX, Effects, Engine
from tests.integration.returns_estate import ReturnsEstate, expected, workload
from tests.integration.support import wait_for

pytestmark = pytest.mark.integration


class Started(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    TYPE: ClassVar[str] = "test.started.v1"
    ref: str


DEFINITION = ProcessDefinition("race", Started, lambda m: m.ref, (
    Step("one", "erp", command=lambda ctx: Started(ref="one"), reply=Started),
    Step("two", "erp", command=lambda ctx: Started(ref="two"), reply=Started)))


@pytest.fixture(params=["sqlite", "postgresql"])
def process_db(request, tmp_path):
    if request.param == "sqlite":
        dsn = f"sqlite:///{tmp_path / 'process.db'}"
    else:
        base = request.getfixturevalue("postgres")
        name = f"process_{abs(hash(request.node.nodeid)) % 10**9}"
        admin = create_engine(base, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))  # our own generated name
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        admin.dispose()
        dsn = base.rsplit("/", 1)[0] + "/" + name
    engine = store.open_engine(dsn)
    store.create(engine)
    yield dsn, engine
    engine.dispose()


def _event(key: str, corr: str | None = None) -> CloudEvent:
    return CloudEvent.new(Started.TYPE, "t", {"ref": "x"}, idempotencykey=key, correlationid=corr)


def test_starts_of_one_key_racing_make_one_instance(process_db):
    dsn, engine = process_db
    process = Engine(DEFINITION, "tests", {"one": (60, 1), "two": (60, 1)})

    def start(n: int):
        fx = Effects()
        with store.transaction(engine) as conn:
            found = process.start(conn, _event(f"start-{n}"), Started(ref="K"), fx)
            store.write(conn, fx.history, fx.outbox)
            eventlet.sleep(0.05)  # hold the transaction open while the others try
            return found

    pool = eventlet.GreenPool(10)
    started = [pid for pid in pool.imap(start, range(10)) if pid]
    assert len(started) == 1
    with engine.connect() as conn:
        assert conn.execute(text('SELECT count(*) FROM "RB_PROCESS"')).scalar() == 1
        assert conn.execute(text('SELECT count(*) FROM "RB_PROCESS_OUTBOX"')).scalar() == 1  # one command


def test_a_transition_on_a_stale_version_is_refused(process_db):
    dsn, engine = process_db
    process = Engine(DEFINITION, "tests", {"one": (60, 1), "two": (60, 1)})
    with store.transaction(engine) as conn:
        pid = process.start(conn, _event("s"), Started(ref="K2"), Effects())
    with engine.connect() as conn:
        stale = store.load(conn, "race", pid)
        key = stale.steps[0]["key"]
    with store.transaction(engine) as conn:  # the reply, handled by one process
        assert process.handle(conn, _event(key + REPLY_SUFFIX, pid), Started(ref="one"), Effects()) == "done"
    with pytest.raises(store.ConcurrentUpdate):  # another, which had read the instance before
        with store.transaction(engine) as conn:
            stale.note(None, "stale")
            store.save(conn, stale)
    with engine.connect() as conn:
        assert store.load(conn, "race", pid).version == 2


@pytest.mark.timeout(400)
def test_the_returns_service_with_its_instances_on_postgresql(amqp_uri, tmp_path, postgres):
    name = f"returns_{int(time.time())}"
    admin = create_engine(postgres, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))  # our own generated name
    admin.dispose()
    estate = ReturnsEstate(tmp_path, amqp_uri, returns_db=postgres.rsplit("/", 1)[0] + "/" + name)
    try:
        estate.start("erp", "loyalty", "crm", "returns")
        sales = workload("PG", 20, 5, seed=5)
        for card in sorted({s.txn.loyalty_card for s in sales}):
            estate.enrol(card)
        estate.publish([s.txn for s in sales])
        assert wait_for(lambda: len(estate.loyalty("SELECT DISTINCT POS_TXN_ID FROM LOY_ACCRUAL WHERE POS_TXN_ID "
                                                   "LIKE 'PG-S%'")) == 20, 120), estate.log("loyalty")
        estate.publish([r for s in sales for r in s.returns])
        assert estate.settled(40, 120, prefix="PG-R"), estate.log("returns")
        assert estate.instances("PG-R") == {"completed": 40}
        _, _, balance = expected(estate.earning, sales)
        for card, points in balance.items():
            assert estate.platform.call("GET", f"/members/{card}")[1]["balance"] == points, card
    finally:
        estate.close()
