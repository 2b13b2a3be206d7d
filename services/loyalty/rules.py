"""Earning and redemption rules (config/loyalty.yaml) and the arithmetic they imply.

Plain functions over plain values, so every rule is unit-tested without a broker:
points per line of a posted sale, what a return takes back (never more than the
sale's lines earned), and the floor limit a store agent may authorise offline.
Points are whole numbers and a sale's points are the sum of its lines', so a
return of some lines can reverse exactly what those lines earned. `rounding:
line` (the default) rounds each line down after every multiplier; `rounding:
sale` rounds the sale's exact total down once and gives each line its share
(largest remainders), which is how the legacy points file counts (one point per
whole unit of the total): a shadow run with the file's rule then agrees.

The accrual mode is decided per sale by the time the ERP posted it
(`Accrual.mode_at`): `retailbus loyalty mode` switches it from a moment a few
seconds ahead and keeps the earlier modes, so the files service and the loyalty
service, each reading the file on its own and each with its own backlog, agree
on every sale about who earns it.
"""
from __future__ import annotations

from datetime import date, datetime
from fractions import Fraction
from math import floor
from pathlib import Path
from typing import Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, model_validator

from bus import yaml_config
from contracts.errors import RetailbusError
from contracts.redemption import Redemption, offline_allowed  # noqa: F401  (shared with the store agent)


class LoyaltyConfigError(RetailbusError):
    """Raised when config/loyalty.yaml is missing or invalid; names the field (and the line of a YAML error)."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Campaign(Strict):
    """A bonus campaign: its multiplier applies to lines posted on its days."""

    name: str = Field(min_length=1, description="shown in accrual events and reports")
    multiplier: float = Field(gt=0, le=20, description="applied on top of the tier multiplier")
    valid_from: date = Field(description="first business day (inclusive)")
    valid_to: date = Field(description="last business day (inclusive)")
    skus: tuple[str, ...] = Field((), description="only these SKUs; empty: every earning SKU")

    @model_validator(mode="after")
    def _ordered(self):
        if self.valid_to < self.valid_from:
            raise ValueError(f"campaign {self.name}: valid_to {self.valid_to} is before valid_from {self.valid_from}")
        return self

    def applies(self, day: date, sku: str) -> bool:
        return self.valid_from <= day <= self.valid_to and (not self.skus or sku in self.skus)


class ThresholdPromotion(Strict):
    """Spend X get Y: a sale with a card whose earning lines total at least `min_spend_minor`
    on a business day within the validity earns `bonus_points` once (the richest promotion
    met, one per sale); a return that takes the sale back below the threshold takes the
    bonus back (the return process, services/returns)."""

    name: str = Field(min_length=1, max_length=32, pattern=r"^[A-Za-z0-9_-]+$")
    min_spend_minor: int = Field(gt=0, description="the earning lines' total a sale must reach")
    bonus_points: int = Field(gt=0, description="points earned once on top of the lines'")
    valid_from: date
    valid_to: date

    @model_validator(mode="after")
    def _ordered(self):
        if self.valid_to < self.valid_from:
            raise ValueError(f"promotion {self.name}: valid_to {self.valid_to} is before valid_from {self.valid_from}")
        return self


class Earning(Strict):
    points_per_unit: float = Field(1.0, ge=0, description="points per whole currency unit of a line's total")
    tier_multipliers: dict[str, float] = Field(
        default_factory=lambda: {"BASE": 1.0, "SILVER": 1.25, "GOLD": 1.5},
        description="per member tier; a tier not listed earns at 1.0")
    excluded_skus: tuple[str, ...] = Field((), description="SKUs that never earn (gift cards, deposits)")
    excluded_sku_prefixes: tuple[str, ...] = Field(
        (), description="categories that never earn, by SKU prefix (the category digits of the SKU)")
    campaigns: tuple[Campaign, ...] = ()
    threshold_promotions: tuple[ThresholdPromotion, ...] = Field((), description="spend X get Y bonus points")
    rounding: Literal["line", "sale"] = Field(
        "line", description="line: each line's points rounded down; sale: the sale's exact points rounded "
                            "down once and shared out over its lines (the legacy points file's way)")


Mode = Literal["file", "api", "shadow"]


class EarlierMode(Strict):
    """A mode that applied to sales posted from `since` (open: from the start) until the next one."""

    mode: Mode
    since: AwareDatetime | None = None


class Accrual(Strict):
    mode: Mode = Field(
        "file", description="file: the legacy points file earns (today's job); api: the loyalty platform; "
                            "shadow: the file earns and the platform's figure is compared per transaction")
    since: AwareDatetime | None = Field(
        None, description="sales the ERP posted from this moment on earn by `mode`, earlier ones by `before`; "
                          "unset: every sale (written by `retailbus loyalty mode`)")
    before: tuple[EarlierMode, ...] = Field((), description="the earlier modes, newest first")

    @model_validator(mode="after")
    def _ordered(self):
        if self.before and self.since is None:
            raise ValueError("accrual.since: required when accrual.before lists earlier modes")
        later = self.since
        for n, earlier in enumerate(self.before):
            if earlier.since is None and n != len(self.before) - 1:
                raise ValueError(f"accrual.before.{n}.since: only the oldest mode may leave it out")
            if earlier.since is not None and earlier.since >= later:
                raise ValueError(f"accrual.before.{n}.since: {earlier.since.isoformat()} is not before "
                                 f"{later.isoformat()} (newest first)")
            later = earlier.since
        return self

    def modes_since(self, at: datetime) -> set[Mode]:
        """Every mode a sale posted from `at` on may have earned by."""
        return {self.mode_at(at)} | {self.mode} | {e.mode for e in self.before if e.since is not None and e.since > at}

    def mode_at(self, posted_at: datetime) -> Mode:
        """The mode a sale the ERP posted at `posted_at` earns by."""
        if self.since is None or posted_at >= self.since:
            return self.mode
        for earlier in self.before:
            if earlier.since is None or posted_at >= earlier.since:
                return earlier.mode
        return self.before[-1].mode if self.before else self.mode


class Settlement(Strict):
    """The daily `loyalty.settlement.v1` per store (services/loyalty/settlement.py)."""

    close_after_hours: float = Field(2.0, ge=0, le=72, description="a business day is settled this long after "
                                     "it ended (UTC), so the postings of a late store are in it")
    interval_seconds: float = Field(60.0, gt=0, le=3600, description="how often the service looks for days "
                                    "to settle (read at start)")
    lookback_days: int = Field(35, ge=1, le=400, description="how far back it looks for days not settled yet "
                               "and for late postings (settled as a supplement)")
    currency: str = Field("EUR", pattern=r"^[A-Z]{3}$", description="the currency of point_value_minor")


class LoyaltyConfig(Strict):
    accrual: Accrual = Accrual()
    earning: Earning = Earning()
    redemption: Redemption = Redemption()
    settlement: Settlement = Settlement()


def load(path: Path | str) -> LoyaltyConfig:
    return yaml_config.load_model(path, LoyaltyConfig, LoyaltyConfigError)


def eligible(earning: Earning, sku: str, line_total_minor: int) -> bool:
    """Whether a line can earn at all: not an excluded SKU, a positive total."""
    return line_total_minor > 0 and sku not in earning.excluded_skus \
        and not sku.startswith(earning.excluded_sku_prefixes)


def _factors(earning: Earning, tier: str, day: date, sku: str, line_total_minor: int) -> list[float]:
    """The multipliers of one line, in order; none for a line that cannot earn."""
    if not eligible(earning, sku, line_total_minor):
        return []
    return [earning.points_per_unit, earning.tier_multipliers.get(tier, 1.0),
            *(c.multiplier for c in earning.campaigns if c.applies(day, sku))]


def line_points(earning: Earning, tier: str, day: date, sku: str, line_total_minor: int) -> int:
    """What one line earns alone (`rounding: line`): nothing for an excluded SKU or a non-positive total."""
    factors = _factors(earning, tier, day, sku, line_total_minor)
    if not factors:
        return 0
    factor = factors[0]
    for f in factors[1:]:
        factor *= f
    return int(line_total_minor // 100 * factor)


def sale_points(earning: Earning, tier: str, day: date, lines: list[tuple[str, int, int]]) -> list[int]:
    """Points per line of a sale, lines given as (sku, quantity, line total in minor units)."""
    if earning.rounding == "line":
        return [line_points(earning, tier, day, sku, total) for sku, _, total in lines]
    exact = []
    for sku, _, total in lines:
        factors = _factors(earning, tier, day, sku, total)
        value = Fraction(total, 100) if factors else Fraction(0)
        for f in factors:
            value *= Fraction(str(f))
        exact.append(value)
    points = [floor(v) for v in exact]
    left = floor(sum(exact)) - sum(points)
    for n in sorted(range(len(exact)), key=lambda i: (points[i] - exact[i], i))[:left]:
        points[n] += 1
    return points


def eligible_spend(earning: Earning, lines: list[tuple[str, int]]) -> int:
    """What a sale's lines (sku, total in minor units) count towards a threshold promotion."""
    return sum(total for sku, total in lines if eligible(earning, sku, total))


def threshold_promotion(earning: Earning, day: date, spend: float) -> ThresholdPromotion | None:
    """The richest promotion valid on `day` whose threshold `spend` reaches, if any."""
    met = [p for p in earning.threshold_promotions
           if p.valid_from <= day <= p.valid_to and spend >= p.min_spend_minor]
    return max(met, key=lambda p: (p.bonus_points, p.name)) if met else None


def reversal(accrued: list[tuple[str, int, int]], returned: list[tuple[str, int]]) -> int:
    """Points a return takes back: per SKU, the sale's points for that SKU in proportion to the
    quantity returned (rounded down), never more than the sale's lines of that SKU earned.

    `accrued` is (sku, quantity sold, points earned) per sale line; `returned` is (sku, quantity)
    per return line of this return only. What earlier returns of the same sale took back is
    the caller's to subtract (the cap per sale is the sale's total).
    """
    sold: dict[str, list[int]] = {}
    for sku, quantity, points in accrued:
        entry = sold.setdefault(sku, [0, 0])
        entry[0] += quantity
        entry[1] += points
    total = 0
    for sku, quantity in returned:
        if sku not in sold or sold[sku][0] <= 0:
            continue
        quantity_sold, points = sold[sku]
        take = min(quantity, quantity_sold)
        total += points * take // quantity_sold
    return total
