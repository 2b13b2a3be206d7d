"""The loyalty service's click-and-collect commands (services/loyalty/order_commands.py) as nameko
workers (worker_factory, a real SQLite database, a platform double): a refusal is a reply naming its
reason, an unreachable platform is retried until the command's `answer_by` and then refused as
`unavailable`, and a collected order earns once, as a sale of the pickup store."""
from __future__ import annotations

from datetime import date, datetime, timedelta, timezone

import pytest
from nameko.testing.services import worker_factory
from sqlalchemy import select

from bus.process import StepRefused
from contracts.envelope import CloudEvent
from contracts.order_process import (LoyaltyAccrueOrderV1, LoyaltyCapturePointsV1, LoyaltyHoldPointsV1,
                                     LoyaltyReleasePointsV1)
from legacy_wrappers.legacy_db import LegacyDb, engine_for
from services.loyalty.platform import InsufficientPointsError, LoyaltyRefusedError, LoyaltyUnavailableError
from services.loyalty.rules import LoyaltyConfig
from services.loyalty.service import LoyaltyService
from services.loyalty.tables import ACCRUALS, HOLDS, metadata

pytestmark = pytest.mark.unit


class Platform:
    def __init__(self):
        self.down, self.calls = False, []

    def hold(self, card, points, reference, store, ttl, key):
        self.calls.append(("hold", key, ttl))
        if self.down:
            raise LoyaltyUnavailableError("loyalty_platform: answered 503")
        if points > 1000:
            raise InsufficientPointsError(422, "insufficient_points", f"{card} has 1000")
        return {"hold_id": "H-" + reference.split("/")[1], "card": card, "points": points,
                "expires_at": "2026-12-11T10:00:00+00:00"}

    def capture(self, hold_id):
        if hold_id.endswith("gone"):
            raise LoyaltyRefusedError(409, "hold_expired", f"hold_id: {hold_id} is expired")
        self.calls.append(("capture", hold_id))
        return {}

    def release(self, hold_id):
        self.calls.append(("release", hold_id))
        return {}

    def member(self, card):
        return {"tier": "BASE"}

    def book(self, card, kind, points, reference, store, key):
        self.calls.append(("book", key, points))
        return {}


class Rules:
    config = LoyaltyConfig.model_validate({"accrual": {"mode": "file"}, "earning": {"points_per_unit": 1}})


@pytest.fixture
def loyalty(tmp_path):
    engine = engine_for(f"sqlite:///{tmp_path / 'loyalty.db'}")
    metadata.create_all(engine)
    service = worker_factory(LoyaltyService, platform=Platform(), rules=Rules())

    def run(method, command):
        service.db = LegacyDb(engine, {})
        event = CloudEvent.new(command.TYPE, "retailbus/orders", command, idempotencykey=f"k:{command.TYPE}")
        try:
            return getattr(service, method)(command, event)
        finally:
            service.db.end(success=True)
    yield service, run, engine
    engine.dispose()


def hold(order_id, points, answer_in=60):
    return LoyaltyHoldPointsV1(order_id=order_id, store_id="S001", card="LC1", points=points, ttl_seconds=345600,
                               answer_by=datetime.now(timezone.utc) + timedelta(seconds=answer_in))


def test_hold_capture_release_and_refusals(loyalty):
    service, run, engine = loyalty
    held = run("on_hold_points", hold("W-1", 500))
    assert held.TYPE == "loyalty.redemption_authorized.v1" and (held.hold_id, held.pos_txn_id) == ("H-W-1", "W-1")
    assert service.platform.calls[0] == ("hold", "order-hold:W-1", 345600)
    refused = run("on_hold_points", hold("W-2", 5000))
    assert refused.TYPE == "loyalty.redemption_refused.v1" and refused.code == "insufficient_points"
    captured = run("on_capture_points", LoyaltyCapturePointsV1(order_id="W-1", store_id="S001", hold_id="H-W-1"))
    assert (captured.points, captured.store_id) == (500, "S001")
    run("on_hold_points", hold("W-3", 200))
    released = run("on_release_points", LoyaltyReleasePointsV1(order_id="W-3", store_id="S001", hold_id="H-W-3"))
    assert released.reason == "cancelled"
    with engine.connect() as conn:
        assert dict(conn.execute(select(HOLDS.c.HOLD_ID, HOLDS.c.STATUS)).all()) == {"H-W-1": "captured",
                                                                              "H-W-3": "released"}
    with pytest.raises(StepRefused):
        run("on_capture_points", LoyaltyCapturePointsV1(order_id="W-9", store_id="S001", hold_id="H-unknown"))


def test_platform_down_is_retried_until_answer_by_then_refused_as_unavailable(loyalty):
    service, run, _ = loyalty
    service.platform.down = True
    with pytest.raises(LoyaltyUnavailableError):  # the order may still wait: the handler retries
        run("on_hold_points", hold("W-4", 100, answer_in=60))
    late = run("on_hold_points", hold("W-4", 100, answer_in=-1))
    assert late.TYPE == "loyalty.redemption_refused.v1" and late.code == "unavailable"


def test_collected_order_earns_by_the_rules_once_in_any_accrual_mode(loyalty):
    service, run, engine = loyalty
    command = LoyaltyAccrueOrderV1(order_id="W-5", store_id="S002", card="LC1", business_day=date(2026, 12, 8),
                                   currency="EUR", lines=[{"sku": "100001", "quantity": 2, "line_total_minor": 3998},
                                                          {"sku": "990001", "quantity": 1, "line_total_minor": 500}])
    assert run("on_accrue_order", command).points == 44  # 39.98 + 5.00 units, line by line (the mode is `file`)
    assert run("on_accrue_order", command).points == 44
    assert [c for c in service.platform.calls if c[0] == "book"] == [("book", "earn:S002:W-5", 44)] * 2  # one key
    with engine.connect() as conn:
        assert sorted(conn.execute(select(ACCRUALS.c.STORE_ID, ACCRUALS.c.POS_TXN_ID, ACCRUALS.c.BUSINESS_DAY,
                                          ACCRUALS.c.POINTS))) == [("S002", "W-5", "2026-12-08", 5),
                                                                   ("S002", "W-5", "2026-12-08", 39)]
