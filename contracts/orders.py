"""Click and collect: an online order, paid partly with loyalty points, picked up in store.

`order.placed.v1` is what the ecommerce experience API recorded (the order as the
customer placed it); the order process closes it with `order.collected.v1` or
`order.cancelled.v1` (the store's `fulfilment.picked.v1` says it is ready for pickup).
Amounts are minor units of one currency; the points' value is fixed when the order is
placed, so what the customer was shown is what the ERP books.
"""
from __future__ import annotations

from collections import Counter
from typing import Annotated, ClassVar, Literal

from pydantic import (AwareDatetime, BaseModel, ConfigDict, Field, StrictInt, StringConstraints, ValidationInfo,
                      field_validator)

from contracts.money import Currency, NonNegativeMinor
from contracts.pos import Sku, StoreId

# Fits ORD_HDR.ORDER_NO (40) and an idempotency key; a URL path segment as it is.
OrderId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,39}$")]
CustomerId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,12}$")]  # CUST_MST.CUST_NO
Card = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,20}$")]  # LOYALTY_CARD's width
Units = Annotated[StrictInt, Field(gt=0, le=10_000, description="units ordered on the line")]

CancelReason = Literal["out_of_stock", "customer_cancelled", "not_collected", "loyalty_refused",
                       "loyalty_unavailable"]


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class OrderLine(_Message):
    line_no: StrictInt = Field(ge=1, le=999, description="position on the order, unique")
    sku: Sku = Field(max_length=20, description="the article (STK_LVL.SKU)")
    quantity: Units
    unit_price_minor: NonNegativeMinor = Field(description="price of one unit, after discounts")
    line_total_minor: NonNegativeMinor = Field(description="quantity x unit_price_minor")

    @field_validator("line_total_minor")
    @classmethod
    def _adds_up(cls, total: int, info: ValidationInfo) -> int:
        if {"quantity", "unit_price_minor"} <= info.data.keys():
            expected = info.data["quantity"] * info.data["unit_price_minor"]
            if total != expected:
                raise ValueError(f"line_total_minor {total} != quantity*unit_price_minor = {expected}")
        return total


class OrderPlacedV1(_Message):
    """An order the experience API has durably recorded: the start of its process. Fields
    are declared in the order their cross-checks read them (see contracts/pos.py)."""

    TYPE: ClassVar[str] = "order.placed.v1"

    order_id: OrderId = Field(description="the experience API's id; the process's correlation key")
    customer_id: CustomerId = Field(description="the customer (CRM, CUST_MST)")
    loyalty_card: Card | None = Field(None, description="the card that redeems and earns points")
    pickup_store: StoreId = Field(description="where the customer collects; its stock is reserved")
    currency: Currency
    lines: list[OrderLine] = Field(min_length=1, max_length=100)
    total_minor: NonNegativeMinor = Field(description="sum of the line totals")
    points: StrictInt = Field(0, ge=0, le=2**31 - 1, description="loyalty points redeemed on the order")
    points_minor: NonNegativeMinor = Field(0, description="what the points pay, at the point value of the day")
    paid_minor: NonNegativeMinor = Field(description="what the payment reference pays: total minus points")
    payment_reference: str = Field(min_length=1, max_length=64, pattern=r"^\S+$",
                                   description="the payment provider's authorisation")
    placed_at: AwareDatetime

    @field_validator("lines")
    @classmethod
    def _unique_line_numbers(cls, lines: list[OrderLine]) -> list[OrderLine]:
        twice = sorted(n for n, count in Counter(line.line_no for line in lines).items() if count > 1)
        if twice:
            raise ValueError(f"duplicate line_no {twice}")
        return lines

    @field_validator("total_minor")
    @classmethod
    def _total_is_sum_of_lines(cls, total: int, info: ValidationInfo) -> int:
        if "lines" in info.data:
            expected = sum(line.line_total_minor for line in info.data["lines"])
            if total != expected:
                raise ValueError(f"total_minor {total} != sum of line totals {expected}")
        return total

    @field_validator("points")
    @classmethod
    def _points_need_a_card(cls, points: int, info: ValidationInfo) -> int:
        if points and not info.data.get("loyalty_card"):
            raise ValueError("points are redeemed from a card: loyalty_card is required")
        return points

    @field_validator("paid_minor")
    @classmethod
    def _paid_and_points_make_total(cls, paid: int, info: ValidationInfo) -> int:
        if {"total_minor", "points_minor"} <= info.data.keys():
            expected = info.data["total_minor"] - info.data["points_minor"]
            if paid != expected:
                raise ValueError(f"paid_minor {paid} != total_minor - points_minor = {expected}")
        return paid


class OrderCancelRequestedV1(_Message):
    """The customer asked to cancel (`POST /v1/orders/{id}/cancel`); the process decides."""

    TYPE: ClassVar[str] = "order.cancel_requested.v1"

    order_id: OrderId
    reason: str | None = Field(None, max_length=200, description="what the customer gave, if anything")
    requested_at: AwareDatetime


class OrderCollectedV1(_Message):
    """The order is closed: handed over, points captured, revenue recognised, points earned."""

    TYPE: ClassVar[str] = "order.collected.v1"

    order_id: OrderId
    store_id: StoreId
    collected_at: AwareDatetime = Field(description="when the store handed it over (its clock)")
    revenue_doc_no: str = Field(min_length=1, max_length=12, description="the ERP document recognising revenue")
    points_redeemed: StrictInt = Field(ge=0)
    points_earned: StrictInt = Field(ge=0)


class OrderCancelledV1(_Message):
    """The order is closed without a sale; everything it held was given back."""

    TYPE: ClassVar[str] = "order.cancelled.v1"

    order_id: OrderId
    store_id: StoreId
    reason: CancelReason
    detail: str = Field(min_length=1, max_length=500, description="the reason in words, for the customer service")
    cancelled_at: AwareDatetime
