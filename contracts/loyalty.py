"""Points earned on a sale and taken back on a return.

Points are always a positive count; the direction is the message type, so a consumer
cannot mistake a reversal for an accrual by a sign slip.
"""
from __future__ import annotations

from datetime import date
from typing import Annotated, ClassVar, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, StrictInt, StringConstraints, model_validator

from contracts.money import Currency, NonNegativeMinor
from contracts.pos import PosTxnId, StoreId


class _PointsMovement(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    card: Annotated[str, StringConstraints(min_length=1, pattern=r"\S")]
    store_id: StoreId
    pos_txn_id: PosTxnId
    business_day: date
    points: StrictInt = Field(gt=0)
    basis_minor: NonNegativeMinor
    currency: Currency


class LoyaltyPointsAccruedV1(_PointsMovement):
    TYPE: ClassVar[str] = "loyalty.points_accrued.v1"


class LoyaltyPointsReversedV1(_PointsMovement):
    """`pos_txn_id` is the return; `original_pos_txn_id` the sale whose points go back."""

    TYPE: ClassVar[str] = "loyalty.points_reversed.v1"

    original_pos_txn_id: PosTxnId


class _HoldEvent(BaseModel):
    """A redemption hold on a card, taken for one till transaction."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    hold_id: Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"\S")]
    card: Annotated[str, StringConstraints(min_length=1, pattern=r"\S")]
    store_id: StoreId
    pos_txn_id: PosTxnId
    points: StrictInt = Field(gt=0)
    offline: bool = Field(False, description="authorised by the store agent while the platform was unreachable")


class LoyaltyRedemptionAuthorizedV1(_HoldEvent):
    TYPE: ClassVar[str] = "loyalty.redemption_authorized.v1"

    expires_at: AwareDatetime


class LoyaltyRedemptionCapturedV1(_HoldEvent):
    """The held points are redeemed: the sale they paid for is posted."""

    TYPE: ClassVar[str] = "loyalty.redemption_captured.v1"


class LoyaltyRedemptionReleasedV1(_HoldEvent):
    """The hold gave its points back: the till voided the sale, the hold expired, or the order
    it was taken for was cancelled."""

    TYPE: ClassVar[str] = "loyalty.redemption_released.v1"

    reason: Literal["voided", "expired", "cancelled"]


class LoyaltySettlementV1(BaseModel):
    """A store's loyalty figures for one business day: what the ERP books as liability.

    `points_issued` are the points the platform gave members for the day's postings
    (earned on sales, and redeemed points refunded on returns), `points_reversed` the
    earned points returns took back, `points_redeemed` the points captured as payment.
    `liability_minor` is issued minus reversed minus redeemed points, valued at
    `point_value_minor` (config/loyalty.yaml); negative when more was redeemed than
    issued. `sequence` 1 is the day's settlement; postings that arrive after it (a
    store that was offline) follow as supplements 2, 3, ..., each with only what is new.
    """

    TYPE: ClassVar[str] = "loyalty.settlement.v1"
    model_config = ConfigDict(extra="forbid", frozen=True)

    store_id: StoreId
    business_day: date
    sequence: StrictInt = Field(1, ge=1)
    points_issued: StrictInt = Field(ge=0)
    points_redeemed: StrictInt = Field(ge=0)
    points_reversed: StrictInt = Field(ge=0)
    point_value_minor: StrictInt = Field(ge=0)
    liability_minor: StrictInt
    currency: Currency

    @model_validator(mode="after")
    def _liability(self):
        expected = (self.points_issued - self.points_reversed - self.points_redeemed) * self.point_value_minor
        if self.liability_minor != expected:
            raise ValueError(f"liability_minor: {self.liability_minor} is not (issued - reversed - redeemed) "
                             f"x point_value_minor = {expected}")
        return self
