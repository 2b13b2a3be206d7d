"""Earning and redemption rules (config/loyalty.yaml) and the arithmetic they imply.

Plain functions over plain values, so every rule is unit-tested without a broker:
points per line of a posted sale, what a return takes back (never more than the
sale's lines earned), and the floor limit a store agent may authorise offline.
Points are whole numbers: a line's points are rounded down once, after every
multiplier, so a sale's points are the sum of its lines' and a return of some
lines can reverse exactly what those lines earned.
"""
from __future__ import annotations

from datetime import date
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from contracts.errors import RetailbusError, format_validation_error
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


class Earning(Strict):
    points_per_unit: float = Field(1.0, ge=0, description="points per whole currency unit of a line's total")
    tier_multipliers: dict[str, float] = Field(
        default_factory=lambda: {"BASE": 1.0, "SILVER": 1.25, "GOLD": 1.5},
        description="per member tier; a tier not listed earns at 1.0")
    excluded_skus: tuple[str, ...] = Field((), description="SKUs that never earn (gift cards, deposits)")
    excluded_sku_prefixes: tuple[str, ...] = Field(
        (), description="categories that never earn, by SKU prefix (the category digits of the SKU)")
    campaigns: tuple[Campaign, ...] = ()


class Accrual(Strict):
    mode: Literal["file", "api", "shadow"] = Field(
        "file", description="file: the legacy points file earns (today's job); api: the loyalty platform; "
                            "shadow: the file earns and the platform's figure is compared per transaction")


class LoyaltyConfig(Strict):
    accrual: Accrual = Accrual()
    earning: Earning = Earning()
    redemption: Redemption = Redemption()


def load(path: Path | str) -> LoyaltyConfig:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise LoyaltyConfigError(f"{path}: cannot read ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise LoyaltyConfigError(f"{path}{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    try:
        return LoyaltyConfig.model_validate(raw)
    except ValidationError as exc:
        raise LoyaltyConfigError(f"{path}: {format_validation_error(exc)}") from None


def line_points(earning: Earning, tier: str, day: date, sku: str, line_total_minor: int) -> int:
    """What one line earns: nothing for an excluded SKU or a non-positive total."""
    if line_total_minor <= 0 or sku in earning.excluded_skus or sku.startswith(earning.excluded_sku_prefixes):
        return 0
    factor = earning.points_per_unit * earning.tier_multipliers.get(tier, 1.0)
    for campaign in earning.campaigns:
        if campaign.applies(day, sku):
            factor *= campaign.multiplier
    return int(line_total_minor // 100 * factor)


def sale_points(earning: Earning, tier: str, day: date, lines: list[tuple[str, int, int]]) -> list[int]:
    """Points per line of a sale, lines given as (sku, quantity, line total in minor units)."""
    return [line_points(earning, tier, day, sku, total) for sku, _, total in lines]


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
