"""The loyalty service's batch of posted sales (worker_factory, a real SQLite database, a
platform that fails for one card): each sale gets its own result, the one whose platform
call failed its error (retried alone) and no rows, a repeat of a sale in the same batch
DUPLICATE, and the accrual announced under the sale's key."""
from __future__ import annotations

from datetime import date, datetime, timezone

import pytest
from nameko.testing.services import worker_factory
from sqlalchemy import select

from bus.consumer import DUPLICATE
from contracts.envelope import CloudEvent
from contracts.erp import ErpSalePostedV1
from legacy_wrappers import inbox
from legacy_wrappers.legacy_db import LegacyDb, engine_for
from services.loyalty.platform import LoyaltyUnavailableError
from services.loyalty.rules import LoyaltyConfig
from services.loyalty.service import LoyaltyService
from services.loyalty.tables import ACCRUALS, metadata

pytestmark = pytest.mark.unit


class Platform:
    def __init__(self):
        self.booked = []

    def member(self, card):
        return {"tier": "GOLD" if card == "G" else "BASE"}

    def book(self, card, kind, points, reference, store, key):
        if card == "DOWN":
            raise LoyaltyUnavailableError("loyalty_platform: answered 503")
        self.booked.append((key, points))
        return {}


class Events:
    def __init__(self):
        self.announced = []

    def publish_many(self, events):
        self.announced += [e.idempotencykey for e in events]
        return [None] * len(events)


class Rules:
    config = LoyaltyConfig.model_validate({"accrual": {"mode": "api"},
                                           "earning": {"tier_multipliers": {"GOLD": 2.0}}})


def posted(txn: str, card: str, total: int) -> tuple[ErpSalePostedV1, CloudEvent]:
    doc = ErpSalePostedV1(store_id="S001", pos_txn_id=txn, doc_no=f"D{txn}", business_day=date(2026, 12, 7),
                          posted_at=datetime.now(timezone.utc), currency="EUR", total_minor=total, loyalty_card=card,
                          lines=[{"sku": "100001", "quantity": 1, "line_total_minor": total}])
    return doc, CloudEvent.new(doc.TYPE, "erp", doc, idempotencykey=f"{doc.TYPE}:D{txn}")


def test_each_sale_of_a_batch_settles_on_its_own(tmp_path):
    engine = engine_for(f"sqlite:///{tmp_path / 'loyalty.db'}")
    metadata.create_all(engine)
    inbox.ensure_inbox(engine)
    db = LegacyDb(engine, {})
    service = worker_factory(LoyaltyService, db=db, platform=Platform(), rules=Rules(), events=Events())
    one, down, gold = posted("T1", "B", 1999), posted("T2", "DOWN", 5000), posted("T3", "G", 1000)
    results = service.on_sale_posted([one, down, gold, one])
    db.end(success=True)
    assert results[0] == 19 and results[2] == 20 and results[3] is DUPLICATE
    assert isinstance(results[1], LoyaltyUnavailableError)
    with engine.connect() as conn:
        assert sorted(conn.execute(select(ACCRUALS.c.POS_TXN_ID, ACCRUALS.c.POINTS))) == [("T1", 19), ("T3", 20)]
        assert sorted(r[0] for r in conn.execute(select(inbox.INBOX.c.IDEM_KEY))) == \
            ["erp.sale_posted.v1:DT1", "erp.sale_posted.v1:DT3"]
    # announced per booking, under the sale's key: a repeat is the same event to its consumers
    assert sorted(service.events.announced) == ["accrued:S001:T1", "accrued:S001:T1", "accrued:S001:T3"]
    assert sorted(service.platform.booked) == [("earn:S001:T1", 19), ("earn:S001:T1", 19), ("earn:S001:T3", 20)]
    engine.dispose()
