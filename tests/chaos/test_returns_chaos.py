"""The returns service killed with SIGKILL at random moments while 300 returns of 150 sales flow,
and started again each time (issue 19): every process completes once, no step's effect happens
twice (one ERP document, one loyalty booking of each kind and one CRM entry per return, the
points exactly what the rules imply) and no instance is doubled. Real processes and platforms
on the session's broker, as tests/integration/test_returns.py."""
from __future__ import annotations

import random
import time
from collections import Counter

import pytest

from tests.integration.returns_estate import ReturnsEstate, expected, workload
from tests.integration.support import wait_for

pytestmark = pytest.mark.chaos


@pytest.mark.timeout(600)
def test_the_returns_service_killed_at_random_during_300_returns_completes_each_once(amqp_uri, tmp_path):
    estate = ReturnsEstate(tmp_path, amqp_uri, processes={"return_to_refund": {"poll_seconds": 0.5}})
    try:
        estate.start("erp", "loyalty", "crm", "returns")
        sales = workload("KO", 150, 30, seed=29)
        for card in sorted({s.txn.loyalty_card for s in sales}):
            estate.enrol(card)
        estate.publish([s.txn for s in sales])
        assert wait_for(lambda: len(estate.loyalty("SELECT DISTINCT POS_TXN_ID FROM LOY_ACCRUAL WHERE POS_TXN_ID "
                                                   "LIKE 'KO-S%'")) == 150, 120), estate.log("loyalty")
        returns = [r for s in sales for r in s.returns]
        random.Random(3).shuffle(returns)
        rng, kills = random.Random(31), 0
        for n in range(0, 300, 50):  # in six waves, so kills fall in the thick of it
            estate.publish(returns[n:n + 50])
            time.sleep(rng.uniform(0.2, 1.5))  # a random moment to kill at, not a wait for a condition
            estate.kill("returns")
            kills += 1
            estate.start("returns")
        assert estate.settled(300, 300, prefix="KO-R"), (estate.instances("KO-R"), estate.log("returns"))
        assert estate.instances("KO-R") == {"completed": 300}
        assert kills == 6

        # no instance doubled: one per return (the key is unique), each started once
        started = estate.returns("""SELECT p."CORR_KEY", count(*) FROM "RB_PROCESS" p JOIN "RB_PROCESS_HISTORY" h
                                    USING ("PROCESS_ID") WHERE h."WHAT" = 'started' AND p."CORR_KEY" LIKE :k
                                    GROUP BY p."CORR_KEY" """, k="%:KO-R%")
        assert sorted(started) == sorted((f"{r.store_id}:{r.pos_txn_id}", 1) for r in returns)
        # no effect twice: one ERP document, at most one ADJUST and one REFUND, one CRM entry per return
        assert estate.erp("SELECT count(*), count(DISTINCT POS_TXN_ID) FROM SLS_HDR WHERE DOC_TYPE = 'R' "
                          "AND POS_TXN_ID LIKE 'KO-R%'") == [(300, 300)]
        entries = Counter((reference, kind) for reference, kind in estate.platform.rows(
            "SELECT reference, type FROM ledger WHERE reference LIKE '%/KO-R%'"))
        assert max(entries.values()) == 1, [k for k, n in entries.items() if n > 1]
        assert estate.crm.rows("SELECT count(*), count(DISTINCT reference) FROM interactions WHERE type = 'return' "
                               "AND reference LIKE '%/KO-R%'") == [(300, 300)]
        # and exactly the points the rules imply
        back, clawed, balance = expected(estate.earning, sales)
        adjusted = {reference.split("/")[1]: -points for reference, points in estate.platform.rows(
            "SELECT reference, points FROM ledger WHERE type = 'ADJUST' AND reference LIKE '%/KO-R%'")}
        assert sum(adjusted.values()) == sum(back.values()) + sum(clawed.values())
        for card, points in balance.items():
            assert estate.platform.call("GET", f"/members/{card}")[1]["balance"] == points, card
        resent = estate.returns("""SELECT count(*) FROM "RB_PROCESS_HISTORY" WHERE "WHAT" = 'resent'""")[0][0]
        print(f"\n{kills} kills, {resent} commands sent again after a timeout")
    finally:
        estate.close()
