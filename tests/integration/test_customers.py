"""Customer mastering end to end (issue 21): the customers, erp, crm, loyalty and files services
as real processes on a real broker, with the demo CRM, loyalty platform and legacy ERP database.

One run of 1,000 customers touched by the CRM's nightly file, CRM users, tills and a legacy
ERP program, interleaved, converges to the values the rules choose in all three systems; a
withdrawn consent stays withdrawn against an older file row; one person with two cards is
merged once and every system learns the survivor; a conflicting match opens a case and
merges nothing; and once it has settled no system receives a customer change for 30 s."""
from __future__ import annotations

import time

import pytest

from tests.integration.customers_estate import CustomersEstate, cli
from tests.integration.customers_workload import base, card, cid, differences, run
from tests.integration.support import wait_for

pytestmark = pytest.mark.integration

CUSTOMERS = 1000
QUIET_SECONDS = 30


@pytest.fixture
def estate(amqp_uri, tmp_path):
    estate = CustomersEstate(tmp_path, amqp_uri)
    try:
        estate.start()
        yield estate
    finally:
        estate.close()


@pytest.mark.timeout(900)
def test_a_day_of_changes_from_every_system_converges_and_then_stays_quiet(estate):
    run(estate, CUSTOMERS)
    assert wait_for(lambda: not differences(estate, CUSTOMERS), 300, interval=2), \
        differences(estate, CUSTOMERS)[:10] + [estate.diagnosis()]

    # An older file row says granted where the CRM withdrew: withdrawn, everywhere, and stays so.
    estate.nightly_file("customers_20261206_late.csv", [
        [cid(15), "Customer 15", "c15@example.com", "+49 30 0000015", card(15), "2026-12-01T00:00:00+00:00",
         "Y", "Y", "Y"]])
    assert wait_for(lambda: any((estate.drop / "archive").rglob("customers_20261206_late.csv")), 60)

    # One person, two cards: a second card enrolled with a name only, then given the e-mail.
    survivor = estate.golden_of("crm", cid(1))
    estate.enrol("LCX0000001", name="Customer 1", reward_preference="points")
    assert wait_for(lambda: estate.golden_of("loyalty", "LCX0000001"), 60)
    retired = estate.golden_of("loyalty", "LCX0000001")
    assert retired != survivor
    estate.member_update("LCX0000001", email="c1@example.com")
    assert wait_for(lambda: estate.golden_of("loyalty", "LCX0000001") == survivor, 60)

    # A conflicting match: the e-mail of customer 2 with another phone number.
    estate.enrol("LCY0000002", name="Someone", email="c2@example.com", phone="+44 7700 900999")
    assert wait_for(lambda: estate.tap.of("case.opened.v1"), 60)

    def learnt() -> bool:  # every system's records of the retired golden record name the survivor
        member, account = estate.members().get("LCX0000001", ()), estate.accounts().get(retired, ())
        return member[-1:] == (survivor,) and member[1] == "c1@example.com" and account[-1:] == (survivor,)
    assert wait_for(learnt, 60), (estate.members().get("LCX0000001"), estate.accounts().get(retired))
    assert wait_for(estate.settled, 120)
    # customer 1's main card is now the newer one (loyalty owns cards: its most recent word)
    assert differences(estate, CUSTOMERS, {1: {"loyalty_card": "LCX0000001"}}) == []

    # No loop: after settling, no system receives any customer change for 30 s.
    before = estate.writes_seen()
    time.sleep(QUIET_SECONDS)
    assert estate.writes_seen() == before
    assert estate.settled()

    merges = estate.tap.of("customer.merged.v1")
    assert [(m["survivor"], m["retired"]) for m in merges] == [(survivor, retired)]
    [case] = estate.tap.of("case.opened.v1")
    assert case["case_type"] == "customer_match" and "agree on email but differ on phone" in case["summary"]
    assert estate.golden_of("loyalty", "LCY0000002") not in (None, estate.golden_of("crm", cid(2)))
    assert estate.crm_profiles()[cid(15)][3] == 0 and estate.accounts()[cid(15)][6] == "N"
    withdrawn = [c for c in estate.tap.of("consent.changed.v1") if c["consent"] == "marketing_email"
                 and c["granted"] is False]
    assert len(withdrawn) == CUSTOMERS // 15 and {c["origin"] for c in withdrawn} == {"crm"}

    # a customer across the estate: the CRM user's change, the hub, and each system's write
    def traced() -> set:
        done = cli(estate.config, "trace", cid(6))
        return {tuple(line.split()[2:4]) for line in done.stdout.splitlines()[1:]} if done.returncode == 0 else set()
    assert wait_for(lambda: {("crm", "reported"), ("files", "read"), ("customers", "mastered"), ("erp", "applied"),
                             ("loyalty", "applied"), ("crm", "applied")} <= traced(), 60), traced()

    shown = cli(estate.config, "customers", "show", "c1@example.com")
    assert shown.returncode == 0, shown.stderr
    assert survivor in shown.stdout and f"merged {retired}" in shown.stdout
    assert "reward_preference" in shown.stdout and "owner" in shown.stdout and "loyalty:LCX0000001" in shown.stdout
    assert base(1)["email"] in shown.stdout
