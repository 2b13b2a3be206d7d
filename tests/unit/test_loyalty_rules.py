"""services/loyalty/rules.py: the earning arithmetic, what a return takes back, the floor
limit, and a rules file refused with what is wrong."""
from __future__ import annotations

from datetime import date
from pathlib import Path

import pytest

from services.loyalty.rules import (Campaign, Earning, LoyaltyConfigError, line_points, load, offline_allowed,
                                    reversal, sale_points)

pytestmark = pytest.mark.unit

DAY = date(2026, 12, 7)
RULES = Earning(points_per_unit=1, tier_multipliers={"BASE": 1.0, "GOLD": 1.5}, excluded_skus=("900001",),
                excluded_sku_prefixes=("99",),
                campaigns=(Campaign(name="x2", multiplier=2, valid_from=date(2026, 12, 1),
                                    valid_to=date(2026, 12, 7), skus=("200001",)),))


@pytest.mark.parametrize("tier, day, sku, total, points", [
    ("BASE", DAY, "100001", 1999, 19),           # whole currency units, rounded down
    ("GOLD", DAY, "100001", 1999, 28),           # 19 * 1.5, rounded down once
    ("UNKNOWN", DAY, "100001", 1000, 10),        # a tier not listed earns at 1.0
    ("BASE", DAY, "200001", 1000, 20),           # the campaign's SKU on its last day
    ("BASE", date(2026, 12, 8), "200001", 1000, 10),  # the day after it ended
    ("GOLD", DAY, "200001", 1000, 30),           # tier and campaign multiply
    ("BASE", DAY, "900001", 5000, 0),            # an excluded SKU (gift card)
    ("BASE", DAY, "990123", 5000, 0),            # an excluded category (prefix)
    ("BASE", DAY, "100001", -500, 0),            # nothing for a non-positive line
    ("BASE", DAY, "100001", 99, 0),              # less than a unit
])
def test_a_line_earns_by_the_rules(tier, day, sku, total, points):
    assert line_points(RULES, tier, day, sku, total) == points


def test_a_sale_earns_the_sum_of_its_lines():
    lines = [("100001", 2, 1999), ("200001", 1, 1000), ("900001", 1, 2500)]
    assert sale_points(RULES, "BASE", DAY, lines) == [19, 20, 0]


@pytest.mark.parametrize("returned, points", [
    ([("100001", 1)], 20),                 # one of four units of a line that earned 80
    ([("100001", 4)], 80),
    ([("100001", 9)], 80),                 # never more than the line earned
    ([("100001", 1), ("200001", 1)], 80),  # 20 + 60
    ([("300001", 1)], 0),                  # not on the sale
    ([("100001", 3)], 60),
])
def test_a_return_takes_back_what_its_lines_earned_never_more(returned, points):
    accrued = [("100001", 4, 80), ("200001", 1, 60)]
    assert reversal(accrued, returned) == points


def test_the_offline_floor_is_per_card_and_day():
    assert offline_allowed(500, 0, 500) and offline_allowed(500, 200, 300)
    assert not offline_allowed(500, 200, 301) and not offline_allowed(0, 0, 1) and not offline_allowed(500, 0, 0)


def test_a_rules_file_is_refused_naming_the_field_or_the_line(tmp_path):
    path = tmp_path / "loyalty.yaml"
    path.write_text("earning:\n  points_per_unit: -1\n")
    with pytest.raises(LoyaltyConfigError, match=r"loyalty\.yaml:2: earning\.points_per_unit"):
        load(path)
    path.write_text("accrual: {mode: apii}\n")
    with pytest.raises(LoyaltyConfigError, match=r"accrual\.mode"):
        load(path)
    path.write_text("earning:\n  campaigns:\n    - {name: x, multiplier: 2, valid_from: 2026-12-09, valid_to: 2026-12-01}\n")
    with pytest.raises(LoyaltyConfigError, match="valid_to 2026-12-01 is before valid_from"):
        load(path)
    path.write_text("earning:\n  points_per_unit: 1\n   bad: indent\n")
    with pytest.raises(LoyaltyConfigError, match="loyalty.yaml:3: a ':' where none may be"):
        load(path)
    path.write_text("earning:\n  point_per_unit: 1\n")
    with pytest.raises(LoyaltyConfigError, match="loyalty.yaml:2: earning: unknown key 'point_per_unit' \\(did you mean 'points_per_unit'\\?\\)"):
        load(path)


def test_the_shipped_rules_load():
    config = load(Path(__file__).parents[2] / "config" / "loyalty.yaml")
    assert config.accrual.mode == "file" and config.redemption.offline_floor_points > 0
