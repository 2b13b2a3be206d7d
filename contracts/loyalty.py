"""Points earned on a sale and taken back on a return.

Points are always a positive count; the direction is the message type, so a consumer
cannot mistake a reversal for an accrual by a sign slip.
"""
from __future__ import annotations

from datetime import date
from typing import Annotated, ClassVar

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StringConstraints

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
