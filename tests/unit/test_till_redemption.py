"""Redemption at the till (routing/till_loyalty.py, routing/redemption.py): the agent's
authorise and void calls, the hold a sale's LOYALTY tender must name, the offline floor,
and what the agent tells loyalty afterwards. worker_factory, a real outbox file, the
loyalty service stubbed by a plain object answering as its RPC does."""
from __future__ import annotations

import time
from types import SimpleNamespace

import eventlet
import pytest
from nameko.testing.services import worker_factory

from bus.settings import AgentSettings, ConfigError, RetailbusSettings
from contracts.envelope import CloudEvent
from contracts.errors import ContractError
from routing.answers import AnswerCache
from routing.edge_auth import TerminalKeys, Verifier
from routing import loyalty_rpc
from routing.loyalty_rpc import LoyaltyRefusedError, LoyaltyRpc, LoyaltyUnreachableError
from routing.outbox import Outbox
from routing.redemption import CAPTURE_OFFLINE, RELEASE, HoldBook, HoldRefusedError, iso
from routing.legacy_payload import return_from_legacy, sale_from_legacy
from routing.store_agent import StoreAgent
from routing.till_loyalty import RedemptionRules, TillRedemption
from tests.conftest import free_port
from tests.unit.test_store_agent import BUS_TABLE, FakeForwarder, answer, request

pytestmark = pytest.mark.unit

CARD = "LC0000000001"


class FakeLoyalty:
    """Answers as the loyalty service's RPC does; `down` makes every call unreachable."""

    def __init__(self, balance: int = 1000):
        self.balance, self.down, self.calls, self.n = balance, False, [], 0

    def call(self, method, *args):
        self.calls.append((method, *args))
        if self.down:
            raise LoyaltyUnreachableError(f"loyalty.{method}: no answer within 2.0s")
        if method == "authorize_redemption":
            card, points, store, txn = args
            if card == "UNKNOWN":
                raise LoyaltyRefusedError("UnknownMemberError", f"card: no member with card {card}")
            if points > self.balance:
                raise LoyaltyRefusedError("InsufficientPointsError", f"points: {points} asked, {self.balance} "
                                                                     f"available on card {card}")
            self.balance -= points
            self.n += 1
            return {"hold_id": f"01HOLD{self.n:04d}", "card": card, "points": points, "balance": self.balance,
                    "expires_at": iso(time.time() + 900)}
        if method == "balance":
            return {"card": args[0], "balance": self.balance, "ledger_points": self.balance, "held_points": 0}
        if method == "release":
            return {"hold_id": args[0], "status": "released"}
        if method == "capture_offline":
            return {"hold_id": args[4], "status": "captured"}
        raise AssertionError(method)

    def close(self):
        pass


@pytest.fixture
def outbox(tmp_path):
    box = Outbox(tmp_path / "outbox.db")
    yield box
    box.close()


@pytest.fixture
def loyalty_yaml(tmp_path):
    path = tmp_path / "config" / "loyalty.yaml"
    path.parent.mkdir()
    path.write_text("redemption: {offline_floor_points: 500, hold_ttl_seconds: 900, point_value_minor: 1}\n")
    return path


@pytest.fixture
def rpc():
    return FakeLoyalty()


def make_till(outbox, tmp_path, rpc) -> TillRedemption:
    till = TillRedemption()
    till.container = SimpleNamespace(config={})
    till.attach(outbox, "S001", "amqp://unused", RetailbusSettings(root=tmp_path))
    till.rpc = rpc
    till._running = True
    return till


@pytest.fixture
def till(outbox, tmp_path, loyalty_yaml, rpc):
    till = make_till(outbox, tmp_path, rpc)
    yield till
    till.stop()


@pytest.fixture
def agent(outbox, till, tmp_path):
    from routing.route_state import RouteStats
    from routing.route_table import parse_route_table
    store = SimpleNamespace(store_id="S001", outbox=outbox, forwarder=FakeForwarder(), loyalty=till,
                            config=AgentSettings(auth_required=False),
                            verifier=Verifier(TerminalKeys(tmp_path / "keys.json")), answers=AnswerCache(300))
    routes = SimpleNamespace(table=parse_route_table(BUS_TABLE), stats=RouteStats())
    return worker_factory(StoreAgent, store=store, routes=routes)


def authorize(agent, points=300, txn="S001-07-000001", card=CARD, **extra):
    body = {"CARD": card, "POINTS": points, "TXN_ID": txn, **extra}
    return answer(agent.loyalty_authorize(request("/v1/loyalty/authorize", body=body)))


def void(agent, hold_id):
    return answer(agent.loyalty_void(request("/v1/loyalty/void", body={"HOLD_ID": hold_id})))


def sale(txn="S001-07-000001", points=300, hold_id=None, card=CARD, total=1000) -> dict:
    loyalty = {"TYPE": "LOYALTY", "AMOUNT": points, **({"HOLD_ID": hold_id} if hold_id else {})}
    return {"STORE": "S001", "TERMINAL": "07", "TXN_ID": txn, "TXN_DATE": "20261127", "CURRENCY": "EUR",
            "LINES": [{"SKU": "100001", "QTY": 1, "PRICE": total, "LINE": total}], "TOTAL": total,
            "TENDERS": [{"TYPE": "CASH", "AMOUNT": total - points}, loyalty], "LOYALTY_CARD": card}


def sell(agent, payload):
    return answer(agent.post_sale(request(body=payload)))


# -- the payload --------------------------------------------------------------------------------

def test_hold_id_travels_on_the_loyalty_tender_and_only_there():
    txn = sale_from_legacy(sale(hold_id="01HOLD0001"))
    assert [t.hold_id for t in txn.tenders] == [None, "01HOLD0001"]
    with pytest.raises(ContractError, match=r"TENDERS\[1\]\.HOLD_ID: .*only a loyalty tender"):
        sale_from_legacy({**sale(), "TENDERS": [{"TYPE": "CASH", "AMOUNT": 700, "HOLD_ID": "01X"},
                                                {"TYPE": "LOYALTY", "AMOUNT": 300}]})
    with pytest.raises(ContractError, match="a return refunds points"):
        return_from_legacy(sale(hold_id="01HOLD0001"))


def test_a_tender_without_a_hold_serialises_as_it_did_before_the_field_existed():
    """Else a sale accepted before an upgrade, retried after it, would hash differently: 409."""
    dumped = sale_from_legacy(sale()).model_dump(mode="json")
    assert dumped["tenders"] == [{"kind": "cash", "amount_minor": 700, "reference": None},
                                 {"kind": "loyalty", "amount_minor": 300, "reference": None}]
    assert sale_from_legacy(sale(hold_id="H1")).model_dump(mode="json")["tenders"][1]["hold_id"] == "H1"


# -- authorise, spend, void ---------------------------------------------------------------------

def test_an_authorised_hold_pays_its_sale_once(agent, outbox, till, rpc):
    status, hold = authorize(agent)
    assert status == 200 and hold["OFFLINE"] is False and hold["BALANCE"] == 700 and hold["POINTS"] == 300
    assert rpc.calls == [("authorize_redemption", CARD, 300, "S001", "S001-07-000001")]
    status, body = sell(agent, sale(hold_id=hold["HOLD_ID"]))
    assert status == 200 and body["DUPLICATE"] is False
    assert till.book.get(hold["HOLD_ID"]).status == "used"
    assert CloudEvent.from_json(outbox.unsent(10)[0].body).data["tenders"][1]["hold_id"] == hold["HOLD_ID"]
    status, body = sell(agent, sale(hold_id=hold["HOLD_ID"]))  # the till retrying the same sale
    assert status == 200 and body["DUPLICATE"] is True and len(outbox.unsent(10)) == 1
    assert till.book.due(time.time() + 60) == []  # online: loyalty captures it when the ERP posts the sale


def test_a_sale_the_outbox_refuses_spends_no_hold(agent, outbox, till):
    """The hold is spent in the very transaction that accepts the sale, or not at all."""
    _, hold = authorize(agent)
    cash_only = sale()
    cash_only["TENDERS"] = [{"TYPE": "CASH", "AMOUNT": 1000}]
    assert sell(agent, cash_only)[0] == 200
    status, body = sell(agent, sale(hold_id=hold["HOLD_ID"]))  # the same TXN_ID, other content
    assert status == 409 and body["MESSAGE"].startswith("TXN_ID")
    assert till.book.get(hold["HOLD_ID"]).status == "held" and len(outbox.unsent(10)) == 1


def test_asking_again_for_the_same_transaction_gets_the_same_hold(agent, rpc):
    first, again = authorize(agent), authorize(agent)
    assert first == again and len(rpc.calls) == 1
    status, body = authorize(agent, points=200)
    assert status == 409 and body["MESSAGE"].startswith("TXN_ID") and "void it first" in body["MESSAGE"]


@pytest.mark.parametrize("change, field", [
    (lambda h: sale(), "TENDERS[2].HOLD_ID: a LOYALTY tender needs the hold"),
    (lambda h: sale(hold_id="01NOTOURS"), "TENDERS[2].HOLD_ID: 01NOTOURS was not issued"),
    (lambda h: sale(txn="S001-07-000002", hold_id=h), "was authorised for transaction S001-07-000001"),
    (lambda h: sale(hold_id=h, card="LC0000000002"), "LOYALTY_CARD: hold"),
    (lambda h: sale(hold_id=h, points=301), "TENDERS[2].AMOUNT: 301 is more than hold"),
    (lambda h: sale(hold_id=h, points=299), "TENDERS[2].AMOUNT: 299 is less than hold"),
])
def test_a_sale_whose_loyalty_tender_cannot_spend_its_hold_is_422_naming_the_tender(agent, outbox, till,
                                                                                    change, field):
    _, hold = authorize(agent)
    status, body = sell(agent, change(hold["HOLD_ID"]))
    assert status == 422 and field in body["MESSAGE"]
    assert outbox.unsent(10) == [] and till.book.get(hold["HOLD_ID"]).status == "held"


def test_one_hold_cannot_pay_two_tenders(agent, outbox):
    _, hold = authorize(agent, points=150)
    payload = sale(hold_id=hold["HOLD_ID"], points=150)
    spend = {"TYPE": "LOYALTY", "AMOUNT": 150, "HOLD_ID": hold["HOLD_ID"]}
    payload["TENDERS"] = [{"TYPE": "CASH", "AMOUNT": 700}, spend, spend]
    status, body = sell(agent, payload)
    assert status == 422 and "TENDERS[3].HOLD_ID" in body["MESSAGE"] and outbox.unsent(10) == []


def test_an_expired_hold_pays_nothing(agent, outbox, till, rpc):
    rpc_answer = rpc.call
    rpc.call = lambda method, *a: {**rpc_answer(method, *a), "expires_at": iso(time.time() - 1)}
    _, hold = authorize(agent)
    status, body = sell(agent, sale(hold_id=hold["HOLD_ID"]))
    assert status == 422 and f"{hold['HOLD_ID']} expired at" in body["MESSAGE"] and outbox.unsent(10) == []


def test_a_voided_hold_is_released_at_loyalty_and_pays_nothing(agent, outbox, till, rpc):
    _, hold = authorize(agent)
    status, body = void(agent, hold["HOLD_ID"])
    assert status == 200 and body["VOIDED"] is True
    assert till.book.get(hold["HOLD_ID"]).todo == RELEASE
    assert authorize(agent)[0] == 409  # the same transaction again waits for the release
    status, body = sell(agent, sale(hold_id=hold["HOLD_ID"]))
    assert status == 422 and "was voided" in body["MESSAGE"] and outbox.unsent(10) == []
    assert till._settle_due() is False
    assert rpc.calls[-1] == ("release", hold["HOLD_ID"]) and till.book.get(hold["HOLD_ID"]).todo is None
    assert void(agent, hold["HOLD_ID"])[0] == 200 and rpc.calls[-1] == ("release", hold["HOLD_ID"])  # once
    assert authorize(agent)[0] == 200


def test_a_hold_its_accepted_sale_spent_cannot_be_voided(agent):
    _, hold = authorize(agent)
    sell(agent, sale(hold_id=hold["HOLD_ID"]))
    status, body = void(agent, hold["HOLD_ID"])
    assert status == 409 and "a return gives its points back" in body["MESSAGE"]
    assert void(agent, "01NEVERISSUED")[0] == 404


def test_business_refusals_are_4xx_never_offline(agent, till, rpc):
    status, body = authorize(agent, points=5000)
    assert status == 422 and body["BALANCE"] == 1000 and "5000 asked, card LC0000000001 has 1000" in body["MESSAGE"]
    status, body = authorize(agent, card="UNKNOWN", txn="S001-07-000002")
    assert status == 404 and body["MESSAGE"].startswith("CARD")
    assert till.book.of_txn("S001-07-000001") == [] and till.book.of_txn("S001-07-000002") == []


@pytest.mark.parametrize("body, field", [({"CARD": CARD, "POINTS": 0, "TXN_ID": "T"}, "POINTS"),
                                         ({"CARD": CARD, "POINTS": "10", "TXN_ID": "T"}, "POINTS"),
                                         ({"CARD": " ", "POINTS": 10, "TXN_ID": "T"}, "CARD"),
                                         ({"CARD": CARD, "POINTS": 10}, "TXN_ID"),
                                         ({"CARD": CARD, "POINTS": 10, "TXN_ID": "T", "STORE": "S002"}, "STORE"),
                                         ({"CARD": CARD, "POINTS": 10, "TXN_ID": "T", "EXTRA": 1}, "EXTRA")])
def test_a_bad_authorisation_is_400_naming_the_field(agent, rpc, body, field):
    status, answer_ = answer(agent.loyalty_authorize(request("/v1/loyalty/authorize", body=body)))
    assert status == 400 and answer_["MESSAGE"].startswith(field) and rpc.calls == []


def test_the_cloudevents_path_spends_holds_too_naming_the_contract_field(agent, outbox):
    _, hold = authorize(agent)
    txn = sale_from_legacy(sale(points=301, hold_id=hold["HOLD_ID"]))
    event = CloudEvent.new("pos.sale.v1", "store/S001/pos/07", txn, subject=txn.pos_txn_id,
                           idempotencykey=f"pos.sale.v1:S001:{txn.pos_txn_id}")
    req = request("/v1/events", data=event.to_json(), content_type="application/cloudevents+json")
    status, body = answer(agent.post_event(req))
    assert status == 422 and body["MESSAGE"].startswith("data.tenders.1.amount_minor") and outbox.unsent(10) == []


# -- offline ------------------------------------------------------------------------------------

def test_loyalty_unreachable_authorises_offline_up_to_the_floor(agent, till, rpc):
    rpc.down = True
    status, first = authorize(agent, points=300, txn="S001-07-000001")
    assert status == 200 and first["OFFLINE"] is True and first["HOLD_ID"].startswith("OFF-")
    assert first["FLOOR_LEFT"] == 200 and first["BALANCE"] is None
    status, refused = authorize(agent, points=201, txn="S001-07-000002")
    assert status == 503 and refused["OFFLINE"] is True
    assert "loyalty offline: floor limit 500 points per card per day reached" in refused["MESSAGE"]
    assert authorize(agent, points=200, txn="S001-07-000003")[1]["FLOOR_LEFT"] == 0
    assert authorize(agent, points=300, txn="S001-07-000004", card="LC0000000002")[0] == 200  # another card


def test_an_offline_hold_a_sale_spent_is_captured_once_loyalty_is_back_even_after_a_restart(
        agent, outbox, till, rpc, tmp_path):
    rpc.down = True
    _, hold = authorize(agent)
    assert till.book.due(time.time() + 60) == []  # authorised only: nothing to capture yet
    assert sell(agent, sale(hold_id=hold["HOLD_ID"]))[0] == 200
    assert till.book.pending_offline() == 1
    assert till._settle_due() is True  # loyalty still away: it waits, with a later try
    [waiting] = till.book.due(time.time() + 60)
    assert waiting.todo == CAPTURE_OFFLINE and waiting.attempts == 1
    till.book.close()
    restarted = make_till(outbox, tmp_path, rpc)  # the agent restarted: the row is still there
    rpc.down = False
    restarted.book.retry_later(hold["HOLD_ID"], "due now", time.time())  # skip the backoff
    assert restarted._settle_due() is False
    assert rpc.calls[-1] == ("capture_offline", CARD, 300, "S001", "S001-07-000001", hold["HOLD_ID"])
    assert restarted.book.pending_offline() == 0 and restarted.book.due(time.time() + 60) == []
    restarted.book.close()


def test_a_floor_of_zero_refuses_every_offline_redemption(agent, rpc, loyalty_yaml):
    rpc.down = True
    loyalty_yaml.write_text("redemption: {offline_floor_points: 0}\n")
    status, body = authorize(agent)
    assert status == 503 and "offline redemption is off" in body["MESSAGE"]


# -- the floor arithmetic -----------------------------------------------------------------------

@pytest.fixture
def book(outbox):
    book = HoldBook(outbox)
    yield book
    book.close()


def offline(book, points, txn, card=CARD, day="2026-11-27", now=None, ttl=900):
    return book.authorise_offline(card, points, txn, "07", day, 500, ttl, now or time.time())


def test_the_floor_counts_per_card_and_day_what_can_still_redeem(book):
    assert offline(book, 400, "T1")[1] == 400
    with pytest.raises(HoldRefusedError, match=r"400 authorised offline today, 101 asked") as refused:
        offline(book, 101, "T2")
    assert refused.value.status == 503
    assert offline(book, 400, "T3", day="2026-11-28")[1] == 400  # a new business day
    book.void(offline(book, 100, "T4")[0].hold_id, time.time())  # a voided hold gives its floor back
    assert offline(book, 100, "T5")[1] == 500
    offline(book, 300, "T6", day="2026-11-29", ttl=1, now=time.time() - 5)  # expired unspent
    assert offline(book, 500, "T7", day="2026-11-29")[1] == 500


def test_two_tills_cannot_both_take_the_last_of_the_floor(book):
    results = []

    def till(n):
        try:
            results.append(offline(book, 300, f"T{n}")[0].hold_id)
        except HoldRefusedError:
            results.append(None)
    pile = eventlet.GreenPile()
    for n in range(6):
        pile.spawn(till, n)
    list(pile)
    assert len([r for r in results if r]) == 1


def test_rules_come_from_loyalty_yaml_and_a_bad_file_stops_the_agent(tmp_path):
    path = tmp_path / "loyalty.yaml"
    assert RedemptionRules(path).current().offline_floor_points == 500  # no file: the defaults
    path.write_text("earning: {points_per_unit: 2}\nredemption: {offline_floor_points: 50}\n")
    rules = RedemptionRules(path)
    assert rules.current().offline_floor_points == 50
    path.write_text("redemption: {offline_floor_points: -1}\n")
    with pytest.raises(ConfigError, match="redemption.offline_floor_points"):
        RedemptionRules(path)
    assert rules.current().offline_floor_points == 50  # a running agent keeps what it runs


def test_an_unreachable_bus_is_unreachable_not_a_failure():
    rpc = LoyaltyRpc(f"amqp://nobody:nothing@127.0.0.1:{free_port()}/", timeout=2.0)
    with pytest.raises(LoyaltyUnreachableError, match="loyalty.balance"):
        rpc.call("balance", CARD)


def test_after_three_unreachable_calls_the_breaker_answers_at_once():
    rpc = LoyaltyRpc(f"amqp://nobody:nothing@127.0.0.1:{free_port()}/", timeout=0.5)
    for _ in range(3):
        with pytest.raises(LoyaltyUnreachableError):
            rpc.call("balance", CARD)
    with pytest.raises(LoyaltyUnreachableError, match="breaker open"):  # not tried: no wait for the timeout
        rpc.call("balance", CARD)
    assert rpc.breaker.current_state == "open"


def test_proxies_are_kept_between_calls_and_a_dead_one_is_replaced_within_the_call(monkeypatch):
    opened = []

    class Proxy:  # stands in for nameko's standalone proxy: what the pool does with it is under test
        def __init__(self, config, timeout):
            self.dead, self.closed = False, False
            opened.append(self)

        def open(self):
            self.service = self
            return self

        def close(self, timeout):
            self.closed = True

        def balance(self, card):
            if self.dead:
                raise ConnectionResetError("the broker restarted")
            return {"card": card, "balance": 7}
    monkeypatch.setattr(loyalty_rpc, "_ExpiringProxy", Proxy)
    rpc = LoyaltyRpc("amqp://unused", timeout=5)
    assert [rpc.call("balance", CARD)["balance"] for _ in range(3)] == [7, 7, 7] and len(opened) == 1
    opened[0].dead = True
    assert rpc.call("balance", CARD)["balance"] == 7  # not unreachable: a new connection answered
    assert len(opened) == 2 and opened[0].closed and not opened[1].closed
    opened[1].dead = True
    Proxy.balance = lambda self, card: (_ for _ in ()).throw(ConnectionRefusedError("the broker is down"))
    with pytest.raises(LoyaltyUnreachableError, match="ConnectionRefusedError"):
        rpc.call("balance", CARD)
    assert rpc._idle == []  # a proxy that failed is never kept
