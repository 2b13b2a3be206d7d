"""Reconciliation extended to loyalty (issue 18, item 5): for a business day, the loyalty
platform's ledger (over its HTTP API) vs the ERP's loyalty postings (the LOYALTY tender's
GL 1300 debits, the settlement) vs the redemptions the loyalty service captured for the
stores. Real erp and loyalty processes on a real broker, the demo platform, the legacy
ERP database; `retailbus reconcile` a real subprocess. It names exactly the gaps the test
makes: an accrual deleted in the platform's database, one doubled, and an offline
redemption the card could not cover."""
from __future__ import annotations

import json
import sqlite3
from collections import Counter
from datetime import datetime, timedelta, timezone

import pytest
from nameko.standalone.rpc import ClusterRpcProxy
from sqlalchemy import create_engine

from contracts.control import StoreControlTotalsV1
from contracts.pos import PosSaleV1
from services.reconcile import store
from tests.integration.loyalty_estate import LoyaltyEstate
from tests.integration.support import wait_for

pytestmark = pytest.mark.integration

DAY = datetime.now(timezone.utc).date() - timedelta(days=1)  # a closed day: its settlement is checked too
RULES = {"accrual": {"mode": "api"}, "earning": {"points_per_unit": 1},
         "redemption": {"point_value_minor": 1, "hold_ttl_seconds": 600},
         "settlement": {"close_after_hours": 0, "interval_seconds": 0.5, "lookback_days": 3}}


def pos_sale(txn: str, card: str, total: int, loyalty: tuple[int, str] | None = None) -> dict:
    tenders = [{"kind": "cash", "amount_minor": total - (loyalty[0] if loyalty else 0)}]
    if loyalty:
        tenders.append({"kind": "loyalty", "amount_minor": loyalty[0], "hold_id": loyalty[1]})
    return PosSaleV1(store_id="S001", terminal_id="07", pos_txn_id=txn, business_day=DAY, currency="EUR",
                     lines=[{"line_no": 1, "sku": "100001", "quantity": 1, "unit_price_minor": total,
                             "line_total_minor": total}],
                     total_minor=total, tenders=tenders, loyalty_card=card).model_dump(mode="json")


def report(e: LoyaltyEstate) -> tuple[int, dict, str]:
    as_json = e.cli("reconcile", "--date", DAY.isoformat(), "--store", "S001", "--json")
    text = e.cli("reconcile", "--date", DAY.isoformat(), "--store", "S001")
    assert as_json.returncode in (0, 1), as_json.stderr
    [one] = json.loads(as_json.stdout)
    return as_json.returncode, one, text.stdout


FINDINGS = ("erp_missing", "erp_duplicated", "erp_unexpected", "amount_mismatch", "loyalty_missing",
            "loyalty_duplicated", "loyalty_unexpected", "digest_mismatch", "platform_missing", "platform_doubled",
            "platform_mismatch", "platform_unexpected", "redemption_mismatch", "loyalty_exception",
            "settlement_mismatch", "loyalty_unavailable")


def findings(one: dict) -> dict[str, list[tuple[str, str]]]:
    return {name: [(f["kind"], f["pos_txn_id"]) for f in one[name]] for name in FINDINGS if one[name]}


@pytest.mark.timeout(900)
def test_reconcile_names_the_accrual_deleted_in_the_platform_the_doubled_one_and_the_offline_over_redemption(
        amqp_uri, tmp_path):
    e = LoyaltyEstate(tmp_path, amqp_uri, RULES, reconcile={"loyalty_pending_seconds": 0})
    try:
        e.start("erp", "loyalty")
        for k in range(6):
            e.enrol(f"C{k}", points=1000)
        e.enrol("POOR")  # nothing to spend
        sales = []
        with ClusterRpcProxy({"AMQP_URI": amqp_uri}, timeout=60) as rpc:
            for n in range(12):
                txn, card = f"S001-07-{n:04d}", f"C{n % 6}"
                hold = None
                if n in (3, 8):  # paid partly with points, authorised online
                    hold = (200, rpc.loyalty.authorize_redemption(card, 200, "S001", txn)["hold_id"])
                sales.append(pos_sale(txn, card, 1500 + 100 * n, hold))
            # the platform was away at the till: authorised offline, booked later, not covered
            answer = rpc.loyalty.capture_offline("POOR", 300, "S001", "S001-07-0099", "OFFLINE-0099")
            assert answer["status"] == "over_redeemed"
            sales.append(pos_sale("S001-07-0099", "POOR", 2000, (300, "OFFLINE-0099")))
            for s in sales:
                rpc.erp.post_sale(s)
        kinds = lambda: Counter(k for k, in e.platform.rows("SELECT type FROM ledger WHERE store = 'S001'"))  # noqa: E731
        assert wait_for(lambda: kinds() == {"EARN": 13, "REDEEM": 2}, 180, interval=0.3), (kinds(), e.log("loyalty"))
        assert wait_for(lambda: e.legacy_rows("SELECT SUM(POINTS_ISSUED), SUM(POINTS_REDEEMED) FROM RB_LOY_SETTLEMENT")
                        == [(sum(s["total_minor"] // 100 for s in sales), 400)], 120, interval=0.3), e.log("erp")
        # the store's control totals, as its agent would have sent them: every sale accepted via the bus
        totals = StoreControlTotalsV1.model_validate({
            "store_id": "S001", "business_day": DAY, "as_of": len(sales), "taken_at": datetime.now(timezone.utc),
            "sales": {"count": len(sales), "amount_minor": {"EUR": sum(s["total_minor"] for s in sales)},
                      "transactions": [{"pos_txn_id": s["pos_txn_id"], "total_minor": s["total_minor"],
                                        "currency": "EUR", "loyalty_card": True, "via": "bus"} for s in sales]},
            "returns": {"count": 0, "amount_minor": {}, "transactions": []}})
        engine = store.open_engine(f"sqlite:///{tmp_path / 'var' / 'reconcile.db'}")
        store.keep_latest(engine, totals)
        engine.dispose()

        code, one, _ = report(e)
        assert findings(one) == {"loyalty_exception": [("over_redemption", "S001-07-0099")]}
        assert code == 1 and one["gap"] == 1 and one["loyalty_checked"]
        assert one["loyalty_platform"] == {"earn": sum(s["total_minor"] // 100 for s in sales), "redeem": -400,
                                           "adjust": 0, "refund": 0}

        # the gaps the test makes in the platform's own database
        with sqlite3.connect(e.platform.db) as db:
            db.execute("DELETE FROM ledger WHERE type = 'EARN' AND reference = 'S001/S001-07-0004'")
            db.execute("INSERT INTO ledger (txn_id, card, type, points, reference, store, hold_id, created) "
                       "SELECT txn_id || 'X', card, type, points, reference, store, hold_id, created FROM ledger "
                       "WHERE type = 'EARN' AND reference = 'S001/S001-07-0007'")
        code, one, text = report(e)
        assert findings(one) == {"platform_missing": [("earn", "S001-07-0004")],
                                 "platform_doubled": [("earn", "S001-07-0007")],
                                 "loyalty_exception": [("over_redemption", "S001-07-0099")]}
        assert code == 1 and one["gap"] == 3
        assert one["platform_missing"][0]["detail"] == "platform 0 entries, 0 points; the loyalty service booked " \
                                                       "1 entry, 19 points"
        assert "2 entries, 44 points" in one["platform_doubled"][0]["detail"]
        assert "not covered" in one["loyalty_exception"][0]["detail"]
        for line in ("platform missing", "S001-07-0004", "platform doubled", "S001-07-0007", "loyalty exception",
                     "S001-07-0099", "GAP 3"):
            assert line in text, text

        # the ERP's loyalty tender booked twice for a sale: the redemption no longer matches what was captured
        legacy = create_engine(f"sqlite:///{e.legacy_db}")
        with legacy.begin() as conn:
            conn.exec_driver_sql("UPDATE GL_PST SET DR_CENTS = DR_CENTS * 2 WHERE ACCOUNT = '1300' AND DOC_NO = "
                                 "(SELECT DOC_NO FROM SLS_HDR WHERE POS_TXN_ID = 'S001-07-0003')")
        legacy.dispose()
        code, one, _ = report(e)
        assert findings(one)["redemption_mismatch"] == [("redemption", "S001-07-0003")]
        assert one["redemption_mismatch"][0]["detail"] == ("ERP loyalty tender 400 cents; authorised 200 points "
                                                           "x 1 = 200 cents")
    finally:
        e.close()
