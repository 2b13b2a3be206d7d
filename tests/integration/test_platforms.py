"""The simulated loyalty platform and CRM as real processes over real HTTP: what the
loyalty and CRM system APIs will rely on (balances, holds that race and expire,
idempotent writes, segments, the fault switch)."""
from __future__ import annotations

import threading
import time

import pytest

from tests.conftest import free_port
from tests.integration.support import Platform

pytestmark = pytest.mark.integration


@pytest.fixture
def loyalty(tmp_path):
    platform = Platform("demo.loyalty_platform", tmp_path / "loyalty.db", free_port())
    yield platform
    platform.stop()


@pytest.fixture
def crm(tmp_path):
    platform = Platform("demo.crm", tmp_path / "crm.db", free_port())
    yield platform
    platform.stop()


def enrol(loyalty, card: str, points: int):
    assert loyalty.call("POST", "/members", {"card": card, "customer_id": f"CU-{card}"}, f"m-{card}")[0] == 201
    if points:
        assert loyalty.call("POST", "/transactions", {"card": card, "type": "EARN", "points": points,
                                                      "reference": f"seed-{card}"}, f"e-{card}")[0] == 201


def test_two_tills_racing_for_one_balance_get_exactly_one_hold(loyalty):
    enrol(loyalty, "C1", 100)
    answers = []

    def till(n):
        answers.append(loyalty.call("POST", "/holds", {"card": "C1", "points": 80, "reference": f"S001-0{n}"},
                                    f"hold-{n}"))

    threads = [threading.Thread(target=till, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(status for status, _ in answers) == [201] + [422] * 7
    refused = next(body for status, body in answers if status == 422)
    assert refused["error"]["code"] == "insufficient_points" and "20 available" in refused["error"]["message"]
    assert loyalty.rows("SELECT COUNT(*) FROM holds WHERE status = 'held'") == [(1,)]


def test_a_captured_hold_redeems_once_and_an_expired_one_gives_its_points_back(loyalty):
    enrol(loyalty, "C2", 500)
    status, hold = loyalty.call("POST", "/holds", {"card": "C2", "points": 200, "reference": "S001-07-1"}, "h1")
    assert status == 201 and hold["balance"] == 300
    for _ in range(2):  # a capture retried after a lost answer redeems once
        status, captured = loyalty.call("POST", f"/holds/{hold['hold_id']}/capture", {}, f"cap-{hold['hold_id']}")
        assert status == 200 and captured["status"] == "captured" and captured["ledger_points"] == 300
    assert loyalty.rows("SELECT type, points FROM ledger WHERE hold_id = ?", hold["hold_id"]) == [("REDEEM", -200)]

    status, short = loyalty.call("POST", "/holds", {"card": "C2", "points": 100, "reference": "S001-07-2",
                                                   "ttl_seconds": 1}, "h2")
    assert status == 201 and short["balance"] == 200
    deadline = time.monotonic() + 30
    while loyalty.call("GET", "/members/C2")[1]["balance"] != 300:
        assert time.monotonic() < deadline, "the expired hold still holds its points"
        time.sleep(0.2)
    status, refused = loyalty.call("POST", f"/holds/{short['hold_id']}/capture", {}, "cap-late")
    assert status == 409 and refused["error"]["code"] == "hold_expired"
    assert loyalty.call("POST", f"/holds/{short['hold_id']}/release", {}, "rel")[1]["status"] == "released"


def test_every_write_needs_a_key_and_a_key_answers_its_first_answer(loyalty):
    enrol(loyalty, "C3", 0)
    earn = {"card": "C3", "type": "EARN", "points": 40, "reference": "S002-01-9"}
    status, body = loyalty.call("POST", "/transactions", earn)
    assert status == 400 and "Idempotency-Key" in body["error"]["message"]
    first = loyalty.call("POST", "/transactions", earn, "k-earn")
    assert first[0] == 201 and loyalty.call("POST", "/transactions", earn, "k-earn") == first
    status, body = loyalty.call("POST", "/transactions", {**earn, "points": 41}, "k-earn")
    assert status == 409 and body["error"]["code"] == "idempotency_conflict"
    assert loyalty.rows("SELECT SUM(points), COUNT(*) FROM ledger WHERE card = 'C3'") == [(40, 1)]
    status, body = loyalty.call("POST", "/transactions", {**earn, "type": "REDEEM", "points": 41}, "k-over")
    assert status == 422 and loyalty.rows("SELECT COUNT(*) FROM ledger WHERE card = 'C3'") == [(1,)]
    status, body = loyalty.call("POST", "/transactions", {**earn, "points": "40"}, "k-bad")
    assert status == 400 and body["error"]["message"].startswith("points:")


def test_the_fault_switch_fails_writes_without_writing(loyalty):
    enrol(loyalty, "C4", 10)
    assert loyalty.call("POST", "/_faults", {"fail_rate": 1.0})[0] == 200
    status, _ = loyalty.call("POST", "/transactions", {"card": "C4", "type": "EARN", "points": 5,
                                                       "reference": "x"}, "k-fail")
    assert status == 503
    assert loyalty.call("POST", "/_faults", {"fail_rate": 0.0})[0] == 200
    assert loyalty.rows("SELECT COUNT(*) FROM ledger WHERE card = 'C4'") == [(1,)]


def test_crm_keeps_engagement_once_and_recomputes_segments(crm):
    status, profile = crm.call("PUT", "/customers/CU1", {"email": "a@example.com",
                                                         "consent": {"marketing_email": True}}, "p1")
    assert status == 200 and profile["consent"] == {"marketing_email": True, "sms": False, "data_sharing": False}
    for n in range(3):
        for _ in range(2):  # a redelivered purchase is one entry
            crm.call("POST", "/customers/CU1/interactions", {"type": "purchase", "reference": f"S001-{n}",
                                                            "amount_minor": 20_000}, f"i{n}-{_}")
    assert crm.rows("SELECT COUNT(*) FROM interactions WHERE customer_id = 'CU1'") == [(3,)]
    assert crm.call("GET", "/customers/CU1")[1]["segments"] == ["active", "frequent", "high_value"]
    crm.call("POST", "/customers/CU1/interactions", {"type": "return", "reference": "S001-R1",
                                                    "amount_minor": 15_000}, "r1")
    crm.call("PUT", "/customers/CU1", {"loyalty_tier": "GOLD"}, "p2")
    assert crm.call("GET", "/customers/CU1")[1]["segments"] == ["active", "frequent", "tier_gold"]
    status, body = crm.call("PUT", "/customers/CU1", {"consent": {"marketing_email": "yes"}}, "p3")
    assert status == 400 and body["error"]["message"].startswith("consent:")
