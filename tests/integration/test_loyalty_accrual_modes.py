"""Strangling the loyalty script (issue 18, item 4) with the real loyalty and files
services, the demo loyalty platform and a real broker: in `shadow` the points file earns
and the loyalty service compares every sale (parity 1.0 when the rules are the file's;
a changed earning rule shows mismatches naming the field with both sides); a switch
`file -> api` by `retailbus loyalty mode` moves the sales posted after its moment to the
platform, none earned twice, none lost, however late either service reads them."""
from __future__ import annotations

import random
from datetime import datetime, timedelta, timezone

import pytest
import yaml

from services.files.mapping import points_for
from tests.integration.loyalty_estate import LoyaltyEstate, random_lines, sale
from tests.integration.support import wait_for

pytestmark = pytest.mark.integration

TODAY = datetime.now(timezone.utc).date()  # an open business day: nothing is settled meanwhile
TIERS = ("BASE", "SILVER", "GOLD")
# the legacy file's rule: one point per whole unit of the total, no multipliers or exclusions
FILE_RULE = {"points_per_unit": 1, "tier_multipliers": {}, "excluded_skus": [], "excluded_sku_prefixes": [],
             "campaigns": [], "rounding": "sale"}


@pytest.fixture
def estate(amqp_uri, tmp_path):
    e = LoyaltyEstate(tmp_path, amqp_uri, {"accrual": {"mode": "shadow"}, "earning": FILE_RULE})
    try:
        yield e
    finally:
        e.close()


def cards(e: LoyaltyEstate, n: int) -> dict[str, str]:
    tiers = {f"SH{k:03d}": TIERS[k % 3] for k in range(n)}
    for card, tier in tiers.items():
        e.enrol(card, tier)
    return tiers


def compared(e: LoyaltyEstate) -> float:
    return sum(e.metric("loyalty", "retailbus_loyalty_shadow_total", outcome=o) or 0 for o in ("match", "mismatch"))


@pytest.mark.timeout(900)
def test_shadow_over_500_sales_agrees_then_a_changed_rule_shows_mismatches_naming_the_field(estate):
    e = estate
    e.start("loyalty", "files")
    tiers = cards(e, 30)
    rng = random.Random(18)
    sales = [sale("S001", f"S001-03-{n:05d}", rng.choice(list(tiers)), random_lines(rng), TODAY)
             for n in range(500)]
    e.publish(sales)
    earning = [s for s in sales if points_for(s.payload().total_minor)]
    assert wait_for(lambda: compared(e) >= 500, 300, interval=0.5), (compared(e), e.log("loyalty"))
    assert wait_for(lambda: len(e.points_file()) >= len(earning), 120, interval=0.3), e.log("files")
    assert e.metric("loyalty", "retailbus_loyalty_shadow_parity_ratio") == 1.0
    assert e.metric("loyalty", "retailbus_loyalty_shadow_total", outcome="mismatch") is None
    assert e.loyalty_rows("SELECT COUNT(*) FROM LOY_EXCEPTION") == [(0,)]
    # the file earned, once per sale; the platform booked nothing
    assert sorted(e.points_file()) == sorted(("A", s.payload().pos_txn_id, points_for(s.payload().total_minor))
                                             for s in earning)
    assert e.platform.rows("SELECT COUNT(*) FROM ledger") == [(0,)]

    # ops try the new programme's rule in shadow: GOLD members earn double
    rules = yaml.safe_load(e.rules.read_text())
    rules["earning"]["tier_multipliers"] = {"GOLD": 2.0}
    e.rules.write_text(yaml.safe_dump(rules))
    more = [sale("S001", f"S001-04-{n:05d}", rng.choice(list(tiers)), random_lines(rng), TODAY) for n in range(100)]
    e.publish(more)
    assert wait_for(lambda: compared(e) >= 600, 300, interval=0.5), e.log("loyalty")

    def file_and_rule(event) -> tuple[int, int]:
        doc = event.payload()
        exact = sum(t for _, _, t in [(ln.sku, ln.quantity, ln.line_total_minor) for ln in doc.lines]) * 2
        return points_for(doc.total_minor), exact // 100
    expected = {}
    for event in more:
        doc = event.payload()
        if tiers[doc.loyalty_card] == "GOLD":
            file, ours = file_and_rule(event)
            if file != ours:
                expected[doc.pos_txn_id] = f"points: file {file}, api {ours} (tier GOLD)"
    assert len(expected) > 10  # the change shows on real traffic
    found = dict(e.loyalty_rows("SELECT POS_TXN_ID, DETAIL FROM LOY_EXCEPTION WHERE KIND = 'shadow_mismatch'"))
    assert found == expected
    assert e.metric("loyalty", "retailbus_loyalty_shadow_total", outcome="mismatch") == len(expected)
    assert e.metric("loyalty", "retailbus_loyalty_shadow_mismatch_fields_total", field="points") == len(expected)
    assert e.metric("loyalty", "retailbus_loyalty_shadow_parity_ratio") == pytest.approx(1 - len(expected) / 600)
    listed = e.cli("loyalty", "exceptions", "--kind", "shadow_mismatch", "--limit", "500")
    assert listed.returncode == 0, listed.stderr
    some = next(iter(expected))
    assert f"S001/{some}" in listed.stdout and expected[some] in listed.stdout
    assert f"{len(expected)} exception(s)" in listed.stdout


@pytest.mark.timeout(600)
def test_a_switch_to_api_moves_the_sales_posted_after_its_moment_none_twice_none_lost(tmp_path, amqp_uri):
    e = LoyaltyEstate(tmp_path, amqp_uri, {"accrual": {"mode": "file"}, "earning": FILE_RULE})
    try:
        e.start("loyalty", "files")
        for k in range(10):
            e.enrol(f"SW{k}", "BASE")
        rng = random.Random(4)

        def batch(prefix: str, posted_at: datetime | None = None):
            return [sale("S001", f"S001-{prefix}-{n:03d}", f"SW{n % 10}", [("100001", 1, rng.randint(200, 9_000))],
                         TODAY, posted_at) for n in range(40)]
        before = batch("05")
        e.publish(before)
        assert wait_for(lambda: len(e.points_file()) >= 40, 120, interval=0.3), e.log("files")
        switched = e.cli("loyalty", "mode", "api", "--reason", "parity 1.0 in shadow", "--lead", "2")
        assert switched.returncode == 0, switched.stderr
        since = yaml.safe_load(e.rules.read_text())["accrual"]["since"]
        # a backlog posted just before the moment, consumed after it: still the file's
        late = batch("06", since - timedelta(milliseconds=1))
        after = batch("07", since + timedelta(milliseconds=1))
        e.publish(late + after)

        def earned_at_platform() -> dict[str, int]:
            return {ref.split("/", 1)[1]: pts for ref, pts in
                    e.platform.rows("SELECT reference, points FROM ledger WHERE type = 'EARN'")}
        # a last file-mode sale after them: once it is in the file, the files service has seen the rest
        fence = [sale("S001", "S001-08-000", "SW0", [("100001", 1, 500)], TODAY, since - timedelta(seconds=1))]
        e.publish(fence)
        assert wait_for(lambda: len(earned_at_platform()) >= 40, 120, interval=0.3), e.log("loyalty")
        assert wait_for(lambda: "S001-08-000" in {t for _, t, _ in e.points_file()}, 120, interval=0.3), e.log("files")
        expected = {s.payload().pos_txn_id: points_for(s.payload().total_minor) for s in before + late + after + fence}
        in_file = {txn: pts for _, txn, pts in e.points_file()}
        assert len(e.points_file()) == len(in_file) == 81
        assert in_file == {t: p for t, p in expected.items() if not t.startswith("S001-07-")}
        assert earned_at_platform() == {t: p for t, p in expected.items() if t.startswith("S001-07-")}
        audit = (tmp_path / "var" / "loyalty" / "audit.jsonl").read_text()
        assert '"before": {"mode": "file", "since": null}' in audit and '"reason": "parity 1.0 in shadow"' in audit
    finally:
        e.close()
