"""Points earned on a sale and taken back on a return.

Points are always a positive count; the direction is the message type, so a consumer
cannot mistake a reversal for an accrual by a sign slip.
"""
from __future__ import annotations

from datetime import date
from typing import Annotated, ClassVar, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, StrictInt, StringConstraints

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
    """The hold gave its points back: the till voided the sale, or the hold expired."""

    TYPE: ClassVar[str] = "loyalty.redemption_released.v1"

    reason: Literal["voided", "expired"]


class LoyaltySettlementV1(BaseModel):
    """A store's loyalty figures for one business day: what the ERP books as liability.

    `liability_minor` is issued minus redeemed points, valued at the point value of
    config/loyalty.yaml; negative when more was redeemed than issued.
    """

    TYPE: ClassVar[str] = "loyalty.settlement.v1"
    model_config = ConfigDict(extra="forbid", frozen=True)

    store_id: StoreId
    business_day: date
    points_issued: StrictInt = Field(ge=0)
    points_redeemed: StrictInt = Field(ge=0)
    points_reversed: StrictInt = Field(ge=0)
    liability_minor: StrictInt
    currency: Currency
