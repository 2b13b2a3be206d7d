"""The loyalty service as a real process on a real broker, against the demo loyalty
platform over HTTP: accrual by the earning rules once per sale however often it is
delivered, a partial return (the return process's commands) reversing in proportion, a
redemption held at the till and captured once when the ERP posts the sale, and the platform failing for a while
losing, doubling and dead-lettering nothing."""
from __future__ import annotations

import random
import time
from datetime import date, datetime, timezone

import pytest
import yaml
from nameko.standalone.rpc import ClusterRpcProxy

from bus import topology
from bus.extensions import event_message
from bus.publisher import ConfirmingPublisher
from contracts.envelope import CloudEvent
from contracts.erp import ErpReturnPostedV1, ErpSalePostedV1
from contracts.returns import LoyaltyReturnPointsV1
from services.loyalty.rules import Earning, sale_points
from tests.conftest import free_port
from tests.integration.returns_estate import reply_queue, taken
from tests.integration.support import Platform, nameko_run, queue_state, stop, wait_for, write_config

pytestmark = pytest.mark.integration

DAY = date(2026, 12, 7)
RULES = {"accrual": {"mode": "api"},
         "earning": {"points_per_unit": 1, "tier_multipliers": {"BASE": 1.0, "GOLD": 2.0},
                     "excluded_sku_prefixes": ["99"],
                     "campaigns": [{"name": "sku-200", "multiplier": 3, "valid_from": "2026-12-01",
                                    "valid_to": "2026-12-31", "skus": ["200001"]}]},
         "redemption": {"hold_ttl_seconds": 600}}
HANDLERS = (("erp.sale_posted.v1", "on_sale_posted"),)
# a return's points move on the return process's commands (services/returns)
RETURNS = topology.handler_queue("loyalty", LoyaltyReturnPointsV1.TYPE, "loyalty", "on_return_points")
SKUS = ("100001", "200001", "990001")  # plain, in a campaign, a gift card (never earns)


@pytest.fixture
def estate(amqp_uri, tmp_path):
    yield from _estate(amqp_uri, tmp_path, [0.5, 1, 2, 4])


@pytest.fixture
def patient_estate(amqp_uri, tmp_path):
    """Retries spanning minutes, as config/bus.yaml has them, compressed to 20 s steps."""
    yield from _estate(amqp_uri, tmp_path, [1, 2, 5, 10, 20])


def _estate(amqp_uri, tmp_path, delays):
    platform = Platform("demo.loyalty_platform", tmp_path / "platform.db", free_port())
    rules = tmp_path / "config" / "loyalty.yaml"
    rules.parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / "var").mkdir()  # the service's own database: var/loyalty.db, as `retailbus up` makes it
    rules.write_text(yaml.safe_dump(RULES))
    host_port = platform.url.removeprefix("http://")
    config = write_config(tmp_path, amqp_uri, loyalty_platform={"http": host_port, "db": "var/unused.db"},
                          loyalty_rules=str(rules),
                          handlers={f"loyalty.{m}": {"attempts": 12, "delays": delays}
                                    for m in ("on_sale_posted", "on_return_points")})
    service = nameko_run(config, "services.loyalty", tmp_path / "loyalty.log")
    queues = [topology.handler_queue("erp", t, "loyalty", m) for t, m in HANDLERS] + [RETURNS]
    assert wait_for(lambda: all(queue_state(amqp_uri, q)[1] for q in queues), 120), "the loyalty service did not start"
    publisher = ConfirmingPublisher(amqp_uri, window=500)
    try:
        yield platform, publisher, amqp_uri
    finally:
        publisher.close()
        stop(service)
        platform.stop()


def posted(store: str, txn: str, card: str | None, lines: list[tuple[str, int, int]], kind=ErpSalePostedV1,
           **extra) -> CloudEvent:
    doc = kind(store_id=store, pos_txn_id=txn, doc_no=f"D-{txn}", business_day=DAY,
               posted_at=datetime.now(timezone.utc), currency="EUR", total_minor=sum(t for _, _, t in lines),
               loyalty_card=card, lines=[{"sku": s, "quantity": q, "line_total_minor": t} for s, q, t in lines],
               **extra)
    return CloudEvent.new(kind.TYPE, "retailbus/erp", doc, subject=txn, idempotencykey=f"{kind.TYPE}:{store}:{txn}")


def publish(publisher, events: list[CloudEvent]) -> None:
    assert publisher.publish_many([event_message(e, "erp.events") for e in events]) == [None] * len(events)


def enrol(platform, card: str, tier: str = "BASE", points: int = 0) -> None:
    assert platform.call("POST", "/members", {"card": card, "customer_id": f"CU-{card}", "tier": tier},
                         f"m-{card}")[0] == 201
    if points:
        assert platform.call("POST", "/transactions", {"card": card, "type": "EARN", "points": points,
                                                       "reference": "seed"}, f"seed-{card}")[0] == 201


def ledger(platform, card: str) -> list[tuple[str, int]]:
    return platform.rows("SELECT type, points FROM ledger WHERE card = ? AND reference != 'seed' "
                         "ORDER BY created", card)


def dead_letters(uri: str) -> int:
    return sum(queue_state(uri, topology.handler_queue("erp", t, "loyalty", m) + ".dlq")[0]
               for t, m in HANDLERS) + queue_state(uri, RETURNS + ".dlq")[0]


@pytest.mark.timeout(600)
def test_1000_sales_delivered_twice_earn_once_by_the_rules_while_the_platform_fails_for_a_while(estate):
    platform, publisher, uri = estate
    cards = {f"L{n:03d}": ("GOLD" if n % 4 == 0 else "BASE") for n in range(50)}
    for card, tier in cards.items():
        enrol(platform, card, tier)
    rng = random.Random(7)
    sales, expected = [], {card: 0 for card in cards}
    for n in range(1000):
        card = rng.choice(list(cards))
        lines = [(rng.choice(SKUS), rng.randint(1, 3), rng.randint(50, 20_000)) for _ in range(rng.randint(1, 3))]
        sales.append(posted("S001", f"S001-01-{n:05d}", card, lines))
        expected[card] += sum(sale_points(Earning(**RULES["earning"]), cards[card], DAY, lines))
    publish(publisher, sales[:400] + sales[:400])
    assert wait_for(lambda: platform.rows("SELECT COUNT(*) FROM ledger WHERE type = 'EARN'")[0][0] >= 100, 120)
    platform.call("POST", "/_faults", {"fail_rate": 1.0})  # the platform answers 503 for a while
    publish(publisher, sales[400:] + sales[400:])
    sales_queue = topology.handler_queue("erp", "erp.sale_posted.v1", "loyalty", "on_sale_posted")
    retrying = [topology.retry_queue(sales_queue, delay) for delay in (0.5, 1, 2, 4)]
    assert wait_for(lambda: sum(queue_state(uri, q)[0] for q in retrying) >= 50, 120), "no sale was retried"
    platform.call("POST", "/_faults", {"fail_rate": 0.0})

    def booked() -> dict:
        return dict(platform.rows("SELECT card, SUM(points) FROM ledger WHERE type = 'EARN' GROUP BY card"))
    wait_for(lambda: booked() == {c: p for c, p in expected.items() if p}, 300, interval=0.5)
    assert platform.rows("SELECT COUNT(*), COUNT(DISTINCT reference) FROM ledger WHERE type = 'EARN'")[0] == \
        (sum(1 for s in sales if s.payload().lines and _earns(s)),) * 2
    assert dead_letters(uri) == 0


@pytest.mark.timeout(600)
def test_the_platform_stopped_for_60_s_during_accrual_loses_doubles_and_dead_letters_nothing(patient_estate):
    platform, publisher, uri = patient_estate
    cards = [f"P{n:03d}" for n in range(20)]
    for card in cards:
        enrol(platform, card)
    rng = random.Random(11)
    sales = [posted("S002", f"S002-01-{n:05d}", rng.choice(cards), [("100001", rng.randint(1, 5), 1_000)])
             for n in range(300)]
    expected: dict[str, int] = {}
    for sale in sales:
        doc = sale.payload()
        points = sum(sale_points(Earning(**RULES["earning"]), "BASE", DAY,
                                 [(line.sku, line.quantity, line.line_total_minor) for line in doc.lines]))
        expected[doc.loyalty_card] = expected.get(doc.loyalty_card, 0) + points
    publish(publisher, sales[:100] + sales[:100])
    assert wait_for(lambda: platform.rows("SELECT COUNT(*) FROM ledger WHERE type = 'EARN'")[0][0] >= 50, 120)
    platform.proc.terminate()  # the platform goes away: connections refused, not 5xx
    platform.proc.wait(timeout=15)
    stopped = time.monotonic()
    publish(publisher, sales[100:] + sales[100:])
    sales_queue = topology.handler_queue("erp", "erp.sale_posted.v1", "loyalty", "on_sale_posted")
    retrying = [topology.retry_queue(sales_queue, delay) for delay in (1, 2, 5, 10, 20)]
    assert wait_for(lambda: sum(queue_state(uri, q)[0] for q in retrying) >= 100, 60), "no sale was retried"
    time.sleep(max(0.0, 60 - (time.monotonic() - stopped)))  # the outage itself, not a wait for a condition
    assert dead_letters(uri) == 0
    back = Platform("demo.loyalty_platform", platform.db, int(platform.url.rsplit(":", 1)[1]))
    platform.proc = back.proc  # the fixture stops whichever process is running

    def booked() -> dict:
        return dict(back.rows("SELECT card, SUM(points) FROM ledger WHERE type = 'EARN' GROUP BY card"))
    assert wait_for(lambda: booked() == expected, 180, interval=0.5), (booked(), expected)
    assert back.rows("SELECT COUNT(*), COUNT(DISTINCT reference) FROM ledger WHERE type = 'EARN'")[0] == (300, 300)
    assert dead_letters(uri) == 0


def _earns(event: CloudEvent) -> bool:
    return any(not line.sku.startswith("99") and line.line_total_minor >= 100 for line in event.payload().lines)


@pytest.mark.timeout(300)
def test_a_partial_return_reverses_in_proportion_and_refunds_the_redeemed_points(estate):
    platform, publisher, uri = estate
    enrol(platform, "C1", points=1000)
    with ClusterRpcProxy({"AMQP_URI": uri}, timeout=30) as rpc:
        hold = wait_for(lambda: _try(lambda: rpc.loyalty.authorize_redemption("C1", 400, "S001", "S001-07-1")), 60)
        assert hold["balance"] == 600
        with pytest.raises(Exception) as refused:  # the other till: the balance covers one redemption
            rpc.loyalty.authorize_redemption("C1", 700, "S001", "S001-08-1")
        assert "InsufficientPointsError" in str(refused.value)
    sale = posted("S001", "S001-07-1", "C1", [("100001", 4, 8000), ("200001", 1, 2000)])  # 80 + 60 points
    publish(publisher, [sale, sale])
    wait_for(lambda: ("EARN", 140) in ledger(platform, "C1"), 60)
    assert ledger(platform, "C1") == [("REDEEM", -400), ("EARN", 140)]  # the hold captured once
    ret = posted("S001", "S001-07-R1", "C1", [("100001", -1, -2000)], kind=ErpReturnPostedV1,
                 original_pos_txn_id="S001-07-1").payload()
    commands = [CloudEvent.new(LoyaltyReturnPointsV1.TYPE, "retailbus/returns",
                               LoyaltyReturnPointsV1(action=action, posted=ret), subject="S001:S001-07-R1",
                               idempotencykey=f"return_to_refund:P1:{action}:0") for action in ("refund", "reverse")]
    messages = [event_message(c, topology.commands_exchange("loyalty")) for c in commands for _ in (1, 2)]
    replies = reply_queue(uri, "loyalty", "loyalty.return_points_booked.v1")  # where the process would hear it
    assert publisher.publish_many(messages) == [None] * 4  # each command twice: booked once
    wait_for(lambda: len(ledger(platform, "C1")) == 4, 60)
    # one of four units of a line that earned 80: 20 back; 2000 of 10000 paid: a fifth of 400 refunded
    assert sorted(ledger(platform, "C1")[2:]) == [("ADJUST", -20), ("REFUND", 80)]
    assert platform.call("GET", "/members/C1")[1]["balance"] == 1000 - 400 + 140 - 20 + 80
    assert dead_letters(uri) == 0
    answers = []
    assert wait_for(lambda: answers.extend(taken(uri, replies)) or len(answers) == 4, 30), answers
    assert sorted((a["data"]["action"], a["data"]["points"]) for a in answers) == [
        ("refund", 80), ("refund", 80), ("reverse", 20), ("reverse", 20)]  # each delivery answered, the same


def _try(call):
    try:
        return call()
    except Exception as exc:  # the service may still be starting: its RPC queue not yet there
        if "InsufficientPoints" in str(exc):
            raise
        return None


@pytest.mark.timeout(300)
def test_a_late_online_hold_never_pays_a_sale_its_store_redeemed_offline_and_a_void_frees_the_txn(estate):
    platform, publisher, uri = estate
    enrol(platform, "C9", points=1000)
    with ClusterRpcProxy({"AMQP_URI": uri}, timeout=30) as rpc:
        # the agent gave up waiting and authorised offline; the service made the hold afterwards
        late = wait_for(lambda: _try(lambda: rpc.loyalty.authorize_redemption("C9", 300, "S002", "S002-01-1")), 60)
        assert rpc.loyalty.capture_offline("C9", 300, "S002", "S002-01-1", "OFF-1")["status"] == "captured"
        assert platform.call("GET", f"/holds/{late['hold_id']}")[1]["status"] == "released"
        sale = posted("S002", "S002-01-1", "C9", [("100001", 1, 3000)])
        publish(publisher, [sale])
        wait_for(lambda: ("EARN", 30) in ledger(platform, "C9"), 60)
        assert [t for t in ledger(platform, "C9") if t[0] == "REDEEM"] == [("REDEEM", -300)]  # paid once

        # a till voids its hold, then authorises the same transaction again: a new hold, not the old one
        first = rpc.loyalty.authorize_redemption("C9", 100, "S002", "S002-01-2")
        assert rpc.loyalty.release(first["hold_id"])["status"] == "released"
        again = rpc.loyalty.authorize_redemption("C9", 100, "S002", "S002-01-2")
        assert again["hold_id"] != first["hold_id"]
        assert platform.call("GET", f"/holds/{again['hold_id']}")[1]["status"] == "held"


@pytest.mark.timeout(300)
def test_an_expired_hold_is_released_and_gives_its_points_back(estate, tmp_path):
    platform, _, uri = estate
    enrol(platform, "C5", points=500)
    rules = tmp_path / "config" / "loyalty.yaml"
    rules.write_text(yaml.safe_dump({**RULES, "redemption": {"hold_ttl_seconds": 30}}))  # re-read on change
    with ClusterRpcProxy({"AMQP_URI": uri}, timeout=30) as rpc:
        hold = wait_for(lambda: _try(lambda: rpc.loyalty.authorize_redemption("C5", 200, "S001", "S001-09-1")), 60)
    assert hold["balance"] == 300
    # the platform gives the points back at expiry; the service's sweep then releases the hold for the bus
    assert wait_for(lambda: platform.call("GET", f"/holds/{hold['hold_id']}")[1]["status"] == "released", 150,
                    interval=1), platform.call("GET", f"/holds/{hold['hold_id']}")[1]
    assert platform.call("GET", "/members/C5")[1]["balance"] == 500
    assert ledger(platform, "C5") == []  # nothing redeemed
