"""The erp's click-and-collect command handlers (services/erp/order_commands.py) as nameko workers
(worker_factory) on a real SQLite legacy database: each command's reply, the business "no"
as a reply, a repeat answering what was done, and a contradiction refused for good."""
from __future__ import annotations

from datetime import date, datetime, timedelta, timezone
from types import SimpleNamespace

import pytest
import sqlalchemy as sa
from nameko.testing.services import worker_factory

from bus.process import StepRefused
from contracts.envelope import CloudEvent
from contracts.order_process import (ErpCommitOrderV1, ErpFulfilOrderV1, ErpReleaseStockV1, ErpReserveStockV1,
                                     ErpReverseOrderV1)
from demo.legacy_erp.schema import create_schema, engine_for, seed_demo_data
from legacy_wrappers.legacy_db import LegacyDb
from services.erp import ledger, orders
from services.erp.service import ErpService
from tests.unit.test_erp_orders import order

pytestmark = pytest.mark.unit

DAY = date(2026, 12, 8)


class Hops:
    def __init__(self):
        self.added = []

    def add(self, hop, outcome, **fields):
        self.added.append((hop, outcome, fields["subject"]))


@pytest.fixture
def erp(tmp_path):
    engine = engine_for(f"sqlite:///{tmp_path / 'erp.db'}")
    create_schema(engine)
    with engine.begin() as conn:
        seed_demo_data(conn)
        conn.execute(sa.text("UPDATE STK_LVL SET ON_HAND = 3 WHERE SKU = '100001' AND STORE_NO = 'S001'"))
    from services.erp.outbox import metadata as outbox_tables
    outbox_tables.create_all(engine)
    md = sa.MetaData()
    md.reflect(engine, only=(*ledger.LEGACY_TABLES, *orders.TABLES))
    added = []
    service = worker_factory(ErpService, db=None, hops=Hops(), outbox=SimpleNamespace(added=lambda: added.append(1)))

    def run(method, command):
        """One worker: its own transaction, committed on success as LegacyDatabase does."""
        service.db = LegacyDb(engine, dict(md.tables))
        event = CloudEvent.new(command.TYPE, "retailbus/orders", command, correlationid="P-1",
                               idempotencykey=f"cmd:{command.TYPE}")
        try:
            result = getattr(service, method)(command, event)
            service.db.end(success=True)
            return result
        except BaseException:
            service.db.end(success=False)
            raise
    yield SimpleNamespace(run=run, service=service, engine=engine, relayed=added)
    engine.dispose()


def reserve(order_id, quantity):
    return ErpReserveStockV1(order_id=order_id, store_id="S001", lines=[{"sku": "100001", "quantity": quantity}],
                             expires_at=datetime.now(timezone.utc) + timedelta(days=3))


def test_reserve_commit_fulfil_and_the_business_no(erp):
    reply = erp.run("on_reserve_stock", reserve("W-1", 2))
    assert reply.TYPE == "inventory.reserved.v1" and [(x.on_hand, x.reserved) for x in reply.lines] == [(3, 2)]
    assert erp.run("on_reserve_stock", reserve("W-1", 2)).lines == reply.lines  # sent again: the same answer
    short = erp.run("on_reserve_stock", reserve("W-2", 2))
    assert short.TYPE == "inventory.unavailable.v1" and [(s.wanted, s.available) for s in short.shortages] == [(2, 1)]

    placed = order("W-1", lines=(("100001", 2, 1000),), points=0, card=None)
    committed = erp.run("on_commit_order", ErpCommitOrderV1(order=placed))
    assert (committed.doc_no, committed.total_minor) == ("O00000001", 2000)
    fulfilled = erp.run("on_fulfil_order", ErpFulfilOrderV1(order_id="W-1", store_id="S001", business_day=DAY))
    assert fulfilled.revenue_doc_no == "O00000002" and erp.relayed == [1]  # the stock left: the caches are told
    again = erp.run("on_fulfil_order", ErpFulfilOrderV1(order_id="W-1", store_id="S001", business_day=DAY))
    assert again.revenue_doc_no == "O00000002" and erp.relayed == [1]
    with erp.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT ON_HAND FROM STK_LVL WHERE STORE_NO = 'S001' AND SKU = '100001'")
                            ).scalar() == 1
        [(event_type, body)] = conn.execute(sa.text("SELECT TYPE, BODY FROM RB_OUTBOX")).all()
    assert event_type == "inventory.released.v1" and '"reason":"collected"' in body.replace(" ", "")
    with pytest.raises(StepRefused) as refused:  # collected: its commitment cannot be reversed
        erp.run("on_reverse_order", ErpReverseOrderV1(order_id="W-1", store_id="S001", business_day=DAY))
    assert refused.value.code == "order_collected"
    assert [h[0] for h in erp.service.hops.added] == ["stock_reserved", "stock_reserved", "stock_unavailable",
                                                      "order_committed", "revenue_recognised", "revenue_recognised"]


def test_release_and_reverse_give_everything_back_once(erp):
    erp.run("on_reserve_stock", reserve("W-3", 3))
    erp.run("on_commit_order", ErpCommitOrderV1(order=order("W-3", lines=(("100001", 3, 500),), points=200)))
    released = erp.run("on_release_stock", ErpReleaseStockV1(order_id="W-3", store_id="S001"))
    assert [(x.quantity, x.reserved) for x in released.lines] == [(3, 0)]
    assert erp.run("on_release_stock", ErpReleaseStockV1(order_id="W-3", store_id="S001")).lines == released.lines
    reversed_ = erp.run("on_reverse_order", ErpReverseOrderV1(order_id="W-3", store_id="S001", business_day=DAY))
    assert reversed_.doc_no == "O00000002"
    with erp.engine.connect() as conn:
        nets = dict(conn.execute(sa.text("SELECT ACCOUNT, SUM(DR_CENTS - CR_CENTS) FROM GL_PST GROUP BY ACCOUNT")).all())
    assert set(nets.values()) == {0}  # the commitment and its reversal net to nothing
    with pytest.raises(StepRefused) as refused:
        erp.run("on_fulfil_order", ErpFulfilOrderV1(order_id="W-3", store_id="S001", business_day=DAY))
    assert refused.value.code == "order_cancelled"
    with pytest.raises(StepRefused):
        erp.run("on_release_stock", ErpReleaseStockV1(order_id="W-never", store_id="S001"))
