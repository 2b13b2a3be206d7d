"""Return to refund end to end (issue 19): the erp, loyalty, crm, returns and journal services as
real processes on the real broker, with the demo ERP database, loyalty platform and CRM.

One estate for the module, its tests in this order: the 500 returns of 250 sales first (they
count the stock the seed gave), the CRM outage last (it restarts the returns service with a
short CRM timeout)."""
from __future__ import annotations

import random
import subprocess
import sys
import time
from collections import Counter, defaultdict
from datetime import date, timedelta

import pytest
import yaml
from nameko.standalone.rpc import ClusterRpcProxy

from bus.extensions import event_message
from contracts.cases import ProcessStepRetryV1
from contracts.envelope import CloudEvent
from demo.legacy_erp.schema import DEMO_ON_HAND
from tests.integration.returns_estate import ReturnsEstate, expected, reply_queue, return_of, sale, taken, workload
from tests.integration.support import Platform, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def estate(amqp_uri, tmp_path_factory):
    estate = ReturnsEstate(tmp_path_factory.mktemp("returns"), amqp_uri,
                           processes={"return_to_refund": {"poll_seconds": 0.5}},
                           # the CRM may be away for a while: its commands wait, as bus.yaml has it for hours
                           handlers={"crm.on_record_return": {"attempts": 90, "delays": [1]}},
                           policy={"window_days": 30, "receiptless": {"max_returns": 2, "max_amount_minor": 50_000,
                                                                       "period_days": 30}})
    try:
        estate.start("journal", "erp", "loyalty", "crm", "returns")
        yield estate
    finally:
        estate.close()


def _post_sales(estate: ReturnsEstate, sales: list, prefix: str) -> None:
    estate.publish(sales)
    with_card = sum(1 for s in sales if s.loyalty_card)
    assert wait_for(lambda: estate.erp("SELECT count(*) FROM SLS_HDR WHERE DOC_TYPE = 'S' AND POS_TXN_ID LIKE ?",
                                       f"{prefix}%")[0][0] == len(sales), 120), estate.log("erp")
    assert wait_for(lambda: len(estate.loyalty("SELECT DISTINCT POS_TXN_ID FROM LOY_ACCRUAL WHERE POS_TXN_ID LIKE ?",
                                               f"{prefix}%")) >= with_card, 120), estate.log("loyalty")


def _cli(estate: ReturnsEstate, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "services.cli", *args, "--config", str(estate.config)],
                          capture_output=True, text=True, timeout=120, cwd=estate.root)


@pytest.mark.timeout(600)
def test_500_returns_of_250_sales_end_consistent_across_erp_loyalty_and_crm(estate):
    sales = workload("AC", 250, 40, seed=19)
    for card in sorted({s.txn.loyalty_card for s in sales}):
        estate.enrol(card)
    _post_sales(estate, [s.txn for s in sales], "AC-S")
    returns = [r for s in sales for r in s.returns]
    random.Random(7).shuffle(returns)  # a sale's two returns in either order, side by side
    started = time.monotonic()
    estate.publish(returns + returns[:50])  # and 50 of them twice: the till retried
    assert estate.settled(500, 300, prefix="AC-R"), (estate.instances("AC-R"), estate.log("returns"))
    print(f"\n500 returns through 4 steps in {time.monotonic() - started:.1f} s")
    assert estate.instances("AC-R") == {"completed": 500}

    back, clawed, balance = expected(estate.earning, sales)
    by_return = {r.pos_txn_id: r for r in returns}
    # the ERP: each return posted once, revenue and stock back
    posted = {txn: (n, total) for txn, n, total in estate.erp(
        "SELECT POS_TXN_ID, count(*), sum(TOTAL_CENTS) FROM SLS_HDR WHERE DOC_TYPE = 'R' AND POS_TXN_ID LIKE 'AC-R%' "
        "GROUP BY POS_TXN_ID")}
    assert posted == {txn: (1, r.total_minor) for txn, r in by_return.items()}
    [(revenue,)] = estate.erp("SELECT sum(g.DR_CENTS) FROM GL_PST g JOIN SLS_HDR h USING (DOC_NO) "
                              "WHERE h.DOC_TYPE = 'R' AND g.ACCOUNT = '4000' AND h.POS_TXN_ID LIKE 'AC-R%'")
    assert revenue == sum(r.total_minor for r in by_return.values())
    moved = defaultdict(int)
    for s in sales:
        for line in s.txn.lines:
            moved[(s.txn.store_id, line.sku)] -= line.quantity
        for r in s.returns:
            for line in r.lines:
                moved[(r.store_id, line.sku)] += line.quantity
    stock = {(store, sku): on_hand for store, sku, on_hand in estate.erp("SELECT STORE_NO, SKU, ON_HAND FROM STK_LVL")}
    assert {key: stock[key] - DEMO_ON_HAND for key in moved} == dict(moved)

    # loyalty: each return takes back exactly what its lines earned; the bonus once per sale the returns
    # took below the threshold, by the return that crossed it; every card's balance adds up
    adjusted = Counter()
    for reference, points, n in estate.platform.rows(
            "SELECT reference, sum(points), count(*) FROM ledger WHERE type = 'ADJUST' AND reference LIKE '%/AC-R%' "
            "GROUP BY reference"):
        assert n == 1, reference
        adjusted[reference.split("/")[1]] = -points
    taken_back = dict(estate.loyalty("SELECT ORIGINAL_TXN_ID, sum(POINTS) FROM LOY_CLAWBACK "
                                     "WHERE ORIGINAL_TXN_ID LIKE 'AC-S%' GROUP BY ORIGINAL_TXN_ID"))
    assert taken_back == {txn: points for txn, points in clawed.items() if points}
    assert sum(1 for p in clawed.values() if p) > 20  # the workload does exercise the promotion
    for s in sales:
        a, b = (r.pos_txn_id for r in s.returns)
        assert adjusted[a] + adjusted[b] == back[a] + back[b] + clawed[s.txn.pos_txn_id], s.txn.pos_txn_id
        assert {adjusted[a] - back[a], adjusted[b] - back[b]} <= {0, clawed[s.txn.pos_txn_id]}
    reversed_lines = dict(estate.loyalty(
        "SELECT r.RETURN_TXN_ID, r.POINTS - coalesce(c.POINTS, 0) FROM LOY_REVERSAL r LEFT JOIN LOY_CLAWBACK c "
        "ON c.STORE_ID = r.STORE_ID AND c.RETURN_TXN_ID = r.RETURN_TXN_ID WHERE r.RETURN_TXN_ID LIKE 'AC-R%'"))
    assert reversed_lines == back
    for card, points in balance.items():
        assert estate.platform.call("GET", f"/members/{card}")[1]["balance"] == points, card

    # the CRM: each return once in its customer's history
    recorded = estate.crm.rows("SELECT reference, count(*) FROM interactions WHERE type = 'return' "
                               "AND reference LIKE '%/AC-R%' GROUP BY reference")
    assert sorted(recorded) == sorted((f"{r.store_id}/{txn}", 1) for txn, r in by_return.items())
    assert estate.metric("retailbus_process_instances", process="return_to_refund", state="completed") is not None


@pytest.mark.timeout(300)
def test_a_reversal_the_platform_refuses_is_compensated_opens_a_case_and_a_retry_completes_it(estate):
    card, uri = "RFC001", estate.uri
    estate.enrol(card, points=100)
    cases = reply_queue(uri, "returns", "case.opened.v1")  # what the workbench takes
    with ClusterRpcProxy({"AMQP_URI": uri}, timeout=30) as rpc:
        hold = rpc.loyalty.authorize_redemption(card, 100, "S001", "RF-S1")
    bought = sale("S001", "RF-S1", card, [("100001", 3, 10_000, 0)], tenders=[
        {"kind": "card", "amount_minor": 29_900}, {"kind": "loyalty", "amount_minor": 100, "hold_id": hold["hold_id"]}])
    _post_sales(estate, [bought], "RF-S")
    # 300 points for the lines and 250 for the promotion (spend 300.00 >= 100.00), 100 redeemed
    assert wait_for(lambda: estate.platform.call("GET", f"/members/{card}")[1]["balance"] == 550, 60)
    estate.platform.call("POST", "/transactions", {"card": card, "type": "REDEEM", "points": 550,
                                                    "reference": "spent elsewhere"}, key="spent:RFC001")
    estate.publish([return_of(bought, "RF-R1", {"100001": 3})])  # all back: 100 to refund, 300 + 250 to take back
    assert estate.settled(1, 120, prefix="RF-R1")
    assert estate.instances("RF-R1") == {"failed": 1}
    assert [(step, what) for step, what in estate.history("RF-R1") if what in (
        "done", "refused", "compensation_sent", "compensated", "not_compensated", "case", "failed")] == [
        ("post_return", "done"), ("refund_points", "done"), ("reverse_points", "refused"),
        ("reverse_points", "failed"), ("refund_points", "compensation_sent"), ("refund_points", "compensated"),
        ("post_return", "not_compensated"), (None, "case")]
    ledger = estate.platform.rows("SELECT type, points FROM ledger WHERE reference = 'S001/RF-R1' ORDER BY created")
    assert ledger == [("REFUND", 100), ("ADJUST", -100)]  # the refund undone: the account as before the return
    assert estate.platform.call("GET", f"/members/{card}")[1]["balance"] == 0
    opened = wait_for(lambda: taken(uri, cases), 30)
    assert [(c["data"]["case_id"], c["data"]["case_type"], c["data"]["transaction_id"]) for c in opened] == [
        ("loyalty_reversal_refused:S001:RF-R1", "loyalty_reversal_refused", "RF-R1")]
    case = opened[0]["data"]
    assert "Undone: refund_points. Still in effect: post_return." in case["summary"]
    shown = _cli(estate, "processes", "show", case["process_id"])
    assert shown.returncode == 0 and "refused" in shown.stdout and "compensated" in shown.stdout, shown.stderr

    # ops: the member earned points since; `cases retry` runs the steps undone and the refused one again
    estate.platform.call("POST", "/transactions", {"card": card, "type": "EARN", "points": 1000,
                                                    "reference": "later"}, key="later:RFC001")
    retry = ProcessStepRetryV1(process="return_to_refund", process_id=case["process_id"], case_id=case["case_id"],
                               requested_by="ops")
    event = CloudEvent.new(retry.TYPE, "retailbus/cases", retry, subject=case["case_id"],
                           idempotencykey=f"retry:{case['case_id']}:1")
    assert estate.publisher.publish_many([event_message(event, "cases.events")]) == [None]
    assert wait_for(lambda: estate.instances("RF-R1") == {"completed": 1}, 60), estate.history("RF-R1")
    ledger = estate.platform.rows("SELECT type, points FROM ledger WHERE reference = 'S001/RF-R1' ORDER BY created")
    assert ledger == [("REFUND", 100), ("ADJUST", -100), ("REFUND", 100), ("ADJUST", -550)]
    assert estate.platform.call("GET", f"/members/{card}")[1]["balance"] == 1000 + 100 - 550
    assert estate.metric("retailbus_process_compensations_total", process="return_to_refund",
                         step="refund_points", outcome="compensated") == 1.0


@pytest.mark.timeout(300)
def test_returns_against_the_policy_are_posted_and_each_opens_the_right_case(estate):
    uri, today = estate.uri, date.today()
    cases = reply_queue(uri, "returns", "case.opened.v1")
    two = sale("S002", "PO-S1", None, [("100002", 2, 1_000, 0)])
    old = sale("S002", "PO-S2", None, [("100003", 1, 1_000, 0)], day=today - timedelta(days=40))
    discounted = sale("S002", "PO-S3", None, [("100004", 2, 1_000, 500)])  # 7.50 paid per unit
    _post_sales(estate, [two, old, discounted], "PO-S")
    returns = [
        return_of(two, "PO-R1", {"100002": 3}),                          # 3 back of 2 sold
        return_of(old, "PO-R2", {"100003": 1}),                          # 40 days after the sale
        return_of(discounted, "PO-R3", {"100004": 1}, refund={"100004": 1_000}),  # 10.00 for 7.50 paid
        return_of(two, "PO-R4", {"100002": 1}),                          # nothing left to return: over too
        *(return_of(None, f"PO-R{n}", {"100005": 1}, refund={"100005": 1_000}, store="S002", customer="CUST-77")
          for n in (5, 6, 7)),                                           # the third receipt-less one is over 2
        return_of(None, "PO-R8", {"100005": 1}, refund={"100005": 1_000}, store="S002", customer="CUST-78"),
    ]
    for ret in returns:  # one at a time: the receipt-less count and "returned before" follow this order
        estate.publish([ret])
        assert estate.settled(1, 60, prefix=ret.pos_txn_id), estate.history(ret.pos_txn_id)
    assert estate.instances("PO-R") == {"completed": 8}  # the till refunded them: all posted all the same
    assert [txn for (txn,) in estate.erp("SELECT POS_TXN_ID FROM SLS_HDR WHERE DOC_TYPE = 'R' "
                                         "AND POS_TXN_ID LIKE 'PO-R%' ORDER BY POS_TXN_ID")] == [
        f"PO-R{n}" for n in range(1, 9)]
    opened = []
    assert wait_for(lambda: opened.extend(taken(uri, cases)) or len(opened) >= 5, 30), opened
    assert sorted((c["data"]["case_type"], c["data"]["transaction_id"], c["data"]["case_id"]) for c in opened) == [
        ("return_above_price_paid", "PO-R3", "return_above_price_paid:S002:PO-R3"),
        ("return_outside_window", "PO-R2", "return_outside_window:S002:PO-R2"),
        ("return_over_quantity", "PO-R1", "return_over_quantity:S002:PO-R1"),
        ("return_over_quantity", "PO-R4", "return_over_quantity:S002:PO-R4"),
        ("return_receiptless_over_limit", "PO-R7", "return_receiptless_over_limit:S002:PO-R7")]
    assert all(c["data"]["store_id"] == "S002" and c["data"]["process"] == "return_to_refund" for c in opened)
    listed = _cli(estate, "processes", "list", "--state", "completed", "--limit", "1000")
    assert listed.returncode == 0 and "S002:PO-R7" in listed.stdout, listed.stderr


@pytest.mark.timeout(400)
def test_the_crm_down_past_its_timeout_with_a_restart_in_between_opens_a_case_then_completes(estate):
    """The documented path: no reply in the step's timeout -> sent again -> no reply again -> the step
    has failed: a `return_crm_not_recorded` case, the money steps left done; the CRM back, the
    crm service's own retries answer late and the process completes. The timeouts are rows: the
    returns service killed while one runs out finds it due when it starts again."""
    config = yaml.safe_load(estate.config.read_text())
    config["RETAILBUS"]["processes"] = {"return_to_refund": {"poll_seconds": 0.5,
                                                             "steps": {"crm_history": {"timeout": 4, "resends": 1}}}}
    estate.config.write_text(yaml.safe_dump(config, sort_keys=False))
    estate.stop("returns")
    estate.start("returns")
    card, uri = "CRMD01", estate.uri
    estate.enrol(card)
    bought = sale("S001", "CD-S1", card, [("100006", 2, 2_000, 0)])
    _post_sales(estate, [bought], "CD-S")
    cases = reply_queue(uri, "returns", "case.opened.v1")
    port = int(estate.crm.url.rsplit(":", 1)[1])
    estate.crm.stop()  # the CRM goes away

    estate.publish([return_of(bought, "CD-R1", {"100006": 1})])
    assert wait_for(lambda: ("crm_history", "sent") in estate.history("CD-R1"), 60), estate.history("CD-R1")
    estate.kill("returns")  # SIGKILL while the CRM's reply is awaited
    assert wait_for(lambda: estate.returns('SELECT "DUE_AT" FROM "RB_PROCESS" WHERE "CORR_KEY" = :k',
                                           k="S001:CD-R1")[0][0] < time.time(), 30)  # due while it is down
    estate.start("returns")
    assert wait_for(lambda: estate.instances("CD-R1") == {"failed": 1}, 60), estate.history("CD-R1")
    opened = wait_for(lambda: taken(uri, cases), 30)
    assert [c["data"]["case_id"] for c in opened] == ["return_crm_not_recorded:S001:CD-R1"]
    history = estate.history("CD-R1")
    assert [w for s, w in history if s == "crm_history"] == ["sent", "timeout", "resent", "timeout", "failed"]
    assert ("reverse_points", "done") in history  # the money steps stand

    estate.crm = Platform("demo.crm", estate.root / "crm.db", port)  # the CRM is back
    assert wait_for(lambda: estate.instances("CD-R1") == {"completed": 1}, 120), estate.history("CD-R1")
    assert estate.history("CD-R1")[-3:] == [("crm_history", "late_reply"), ("crm_history", "done"), (None, "completed")]
    assert estate.crm.rows("SELECT count(*) FROM interactions WHERE reference = 'S001/CD-R1'") == [(1,)]
    assert estate.metric("retailbus_process_timeouts_total", process="return_to_refund", step="crm_history") == 2.0
    # `retailbus trace` shows the process's hops after its restart (those the killed one had not sent to
    # the journal yet went with it: tracing is best effort, the process's own history above is not)
    hops = ("process_timeout", "process_resent", "process_case_opened", "process_step_done", "process_completed")
    traced = wait_for(lambda: (t := _cli(estate, "trace", "CD-R1")).returncode == 0
                      and all(hop in t.stdout for hop in hops) and t, 60)
    assert traced, _cli(estate, "trace", "CD-R1").stdout
