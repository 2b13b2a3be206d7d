"""The daily loyalty settlement end to end (issue 18, item 2): the loyalty service settles
each closed business day per store from what the platform booked, the erp posts it to
the liability account of the legacy ERP once, and a restart of the loyalty service
neither misses a late posting nor sends a settlement twice. Real broker, real loyalty
and erp processes, the demo loyalty platform, the legacy ERP's SQLite database."""
from __future__ import annotations

import json
from collections import Counter, defaultdict
from datetime import datetime, timedelta, timezone

import amqp
import pytest
from nameko.standalone.rpc import ClusterRpcProxy

from bus import topology
from bus.publisher import connection_params
from contracts.envelope import CloudEvent
from contracts.erp import ErpReturnPostedV1
from contracts.returns import LoyaltyReturnPointsV1
from tests.integration.loyalty_estate import LoyaltyEstate, sale
from tests.integration.support import wait_for

pytestmark = pytest.mark.integration

TODAY = datetime.now(timezone.utc).date()
D1, D2 = TODAY - timedelta(days=2), TODAY - timedelta(days=1)
RULES = {"accrual": {"mode": "api"},
         "earning": {"points_per_unit": 1, "tier_multipliers": {"GOLD": 2.0}, "excluded_sku_prefixes": ["99"]},
         "redemption": {"point_value_minor": 2, "hold_ttl_seconds": 600},
         "settlement": {"close_after_hours": 0, "interval_seconds": 0.5, "lookback_days": 5}}
TAP = "test-loyalty-settlements"


class Tap:
    """Every loyalty.settlement.v1 the loyalty service publishes, as the broker routed it."""

    def __init__(self, uri: str):
        self.uri, self.bodies = uri, []
        with self._channel() as ch:
            topology.declare_exchange(ch, "loyalty.events")
            ch.queue_declare(TAP, durable=True, auto_delete=False)
            ch.queue_purge(TAP)
            ch.queue_bind(TAP, "loyalty.events", "loyalty.settlement.v1")

    def _channel(self):
        conn = amqp.Connection(**connection_params(self.uri, 5))
        conn.connect()

        class Scope:
            def __enter__(self):
                return conn.channel()

            def __exit__(self, *exc):
                conn.collect()
        return Scope()

    def drain(self) -> list[dict]:
        with self._channel() as ch:
            while (msg := ch.basic_get(TAP, no_ack=True)) is not None:
                self.bodies.append(json.loads(msg.body))
        return self.bodies

    def close(self):
        with self._channel() as ch:
            ch.queue_delete(TAP)


@pytest.fixture
def estate(amqp_uri, tmp_path):
    e = LoyaltyEstate(tmp_path, amqp_uri, RULES)
    tap = Tap(amqp_uri)
    try:
        yield e, tap
    finally:
        tap.close()
        e.close()


def expected_from_platform(e: LoyaltyEstate, day_of: dict[str, object]) -> dict:
    """Per business day, what the platform's ledger says was issued, redeemed, reversed."""
    out = defaultdict(lambda: [0, 0, 0])
    for kind, points, reference in e.platform.rows("SELECT type, points, reference FROM ledger WHERE store IS NOT NULL"):
        day = day_of[reference.split("/", 1)[1]]
        if kind in ("EARN", "REFUND"):
            out[day][0] += points
        elif kind == "REDEEM":
            out[day][1] -= points
        elif kind == "ADJUST":
            out[day][2] -= points
    return {day.strftime("%Y%m%d"): tuple(v) for day, v in out.items()}


def settled_at_erp(e: LoyaltyEstate) -> dict:
    out = defaultdict(lambda: [0, 0, 0])
    for day, i, rd, rv in e.legacy_rows("SELECT BUSINESS_DAY, POINTS_ISSUED, POINTS_REDEEMED, POINTS_REVERSED "
                                        "FROM RB_LOY_SETTLEMENT WHERE STORE_NO = 'S001'"):
        for n, v in enumerate((i, rd, rv)):
            out[day][n] += v
    return {day: tuple(v) for day, v in out.items()}


@pytest.mark.timeout(900)
def test_each_closed_day_is_settled_once_posted_to_the_liability_account_and_a_restart_misses_nothing(estate):
    e, tap = estate
    e.start("erp", "loyalty")
    e.enrol("G1", "GOLD", points=1000)
    e.enrol("B1", "BASE")
    with ClusterRpcProxy({"AMQP_URI": e.uri}, timeout=30) as rpc:
        hold = rpc.loyalty.authorize_redemption("G1", 300, "S001", "S001-01-D1-00")
    assert hold["points"] == 300
    day_of, events = {}, []
    for n in range(20):
        txn = f"S001-01-D1-{n:02d}"
        day_of[txn] = D1
        events.append(sale("S001", txn, ("G1", "B1", None)[n % 3], [("100001", 2, 1000 + 37 * n), ("990001", 1, 500)],
                           D1))
    for n in range(10):
        txn = f"S001-01-D2-{n:02d}"
        day_of[txn] = D2
        events.append(sale("S001", txn, "B1", [("100002", 1, 2500 + n)], D2))
    events += [sale("S001", f"S001-01-T-{n}", "B1", [("100003", 1, 900)], TODAY) for n in range(5)]
    for n in range(5):
        day_of[f"S001-01-T-{n}"] = TODAY
    e.publish(events)

    def booked() -> Counter:
        return Counter(k for k, in e.platform.rows("SELECT type FROM ledger WHERE store IS NOT NULL"))
    assert wait_for(lambda: booked()["EARN"] == 14 + 10 + 5 and booked()["REDEEM"] == 1, 180, interval=0.3), \
        e.log("loyalty")
    # a return of D2: the return-to-refund process asks loyalty to refund and to reverse (issue 19)
    day_of["S001-01-D2-R1"] = D2
    ret = sale("S001", "S001-01-D2-R1", "G1", [("100001", -1, -1000)], D2, kind=ErpReturnPostedV1,
               original_pos_txn_id="S001-01-D1-00").payload()
    e.publish([CloudEvent.new(LoyaltyReturnPointsV1.TYPE, "retailbus/returns",
                              LoyaltyReturnPointsV1(action=action, posted=ret), subject="S001:S001-01-D2-R1",
                              idempotencykey=f"return_to_refund:R1:{action}:0") for action in ("refund", "reverse")],
              topology.commands_exchange("loyalty"))
    assert wait_for(lambda: booked()["ADJUST"] == 1 and booked()["REFUND"] == 1, 120, interval=0.3), e.log("loyalty")
    expected = expected_from_platform(e, day_of)
    today = TODAY.strftime("%Y%m%d")
    closed = {d: v for d, v in expected.items() if d != today}
    assert wait_for(lambda: settled_at_erp(e) == closed, 120, interval=0.3), (settled_at_erp(e), closed, e.log("erp"))
    assert expected[D1.strftime("%Y%m%d")][1] == 300 and expected[D2.strftime("%Y%m%d")][2] > 0

    # the loyalty service goes away; a store that was offline posts one more sale of D1 meanwhile
    e.stop("loyalty")
    e.publish([sale("S001", "S001-09-D1-LATE", "B1", [("100001", 1, 4200)], D1)])
    day_of["S001-09-D1-LATE"] = D1
    e.start("loyalty")
    closed[D1.strftime("%Y%m%d")] = tuple(a + b for a, b in zip(closed[D1.strftime("%Y%m%d")], (42, 0, 0)))
    assert wait_for(lambda: settled_at_erp(e) == closed, 120, interval=0.3), (settled_at_erp(e), closed)
    assert expected_from_platform(e, day_of) == {**closed, today: expected[today]}

    # on the wire: each (store, day, sequence) once, the day's first settlement sequence 1, the late one a supplement
    rows = e.legacy_rows("SELECT BUSINESS_DAY, SEQ, DOC_NO, LIABILITY_CENTS FROM RB_LOY_SETTLEMENT ORDER BY 1, 2")
    sent = [(b["data"]["business_day"].replace("-", ""), b["data"]["sequence"]) for b in tap.drain()]
    assert sorted(sent) == [(d, s) for d, s, _, _ in rows] and len(set(sent)) == len(sent)
    assert max(s for d, s, _, _ in rows if d == D1.strftime("%Y%m%d")) >= 2
    assert e.loyalty_rows("SELECT COUNT(*), COUNT(PUBLISHED_AT) FROM LOY_SETTLEMENT") == [(len(rows), len(rows))]
    assert today not in {d for d, *_ in rows}  # an open day is not settled

    # the GL: every settlement document balances; the liability account holds the liability at 2 cents a point
    for _, _, doc_no, liability in rows:
        [(dr, cr)] = e.legacy_rows("SELECT SUM(DR_CENTS), SUM(CR_CENTS) FROM GL_PST WHERE DOC_NO = ?", doc_no)
        assert dr == cr
        [(net,)] = e.legacy_rows("SELECT COALESCE(SUM(CR_CENTS - DR_CENTS), 0) FROM GL_PST WHERE DOC_NO = ? "
                                 "AND ACCOUNT = '2400'", doc_no)
        assert net == liability
    total = {k: sum(v[n] for v in closed.values()) for n, k in enumerate(("issued", "redeemed", "reversed"))}
    [(liability,)] = e.legacy_rows("SELECT SUM(CR_CENTS - DR_CENTS) FROM GL_PST WHERE ACCOUNT = '2400'")
    assert liability == (total["issued"] - total["reversed"] - total["redeemed"]) * 2
    [(cleared,)] = e.legacy_rows("SELECT SUM(CR_CENTS) FROM GL_PST WHERE ACCOUNT = '1300'")
    assert cleared == 300 * 2

    # a settlement delivered again (a redelivery, a replay) posts nothing more
    documents = e.legacy_rows("SELECT COUNT(*) FROM GL_PST")
    e.publish([CloudEvent.model_validate(tap.bodies[0])], "loyalty.events")
    assert wait_for(lambda: e.metric("erp", "retailbus_inbox_duplicates_total",
                                     consumer="erp.on_loyalty_settlement") == 1, 60, interval=0.3)
    assert e.legacy_rows("SELECT COUNT(*) FROM GL_PST") == documents

