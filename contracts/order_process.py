"""The click-and-collect process's commands and replies (services/orders, bus/process).

One process per `order.placed.v1` asks each system for its part by a command on
`<system>.commands` and waits for its reply on `<system>.events`: the loyalty service
holds, captures, releases the points and earns the order's points; the erp reserves
and releases stock, records the financial commitment and reverses it or recognises
the revenue; the pickup store's agent gets the task (contracts/fulfilment.py) and
answers with its outcome; the experience API closes the order where the customer sees
it (`order.close.v1`, answered by `order.collected.v1` or `order.cancelled.v1`); last,
the crm records the closed order in the customer's engagement history. A
business "no" (not enough points, not enough stock) is a reply of its own, not a
failure: the process then cancels the order with that reason.
"""
from __future__ import annotations

from datetime import date
from typing import ClassVar, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, StrictInt

from contracts.erp import PostedLine
from contracts.money import Currency, NonNegativeMinor
from contracts.orders import Card, CancelReason, CustomerId, OrderId, OrderPlacedV1
from contracts.pos import HoldId, Sku, StoreId


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Order(_Message):
    order_id: OrderId
    store_id: StoreId = Field(description="the pickup store")


# ---------------------------------------------------------------------- erp
class StockLine(_Message):
    sku: Sku
    quantity: StrictInt = Field(gt=0)


class ErpReserveStockV1(_Order):
    """Reserve these units at the store until `expires_at`, all or nothing (answered by
    inventory.reserved.v1, or inventory.unavailable.v1 when stock is short)."""

    TYPE: ClassVar[str] = "erp.reserve_stock.v1"

    lines: list[StockLine] = Field(min_length=1)
    expires_at: AwareDatetime


class ErpReleaseStockV1(_Order):
    """Give the order's reserved units back to the shelf (answered by inventory.released.v1)."""

    TYPE: ClassVar[str] = "erp.release_stock.v1"


class ErpCommitOrderV1(_Message):
    """Record the order's document and its financial commitment (deferred revenue, the payment
    reference, the points' value), once per order."""

    TYPE: ClassVar[str] = "erp.commit_order.v1"

    order: OrderPlacedV1


class ErpOrderCommittedV1(_Order):
    TYPE: ClassVar[str] = "erp.order_committed.v1"

    doc_no: str = Field(min_length=1, max_length=12, description="the commitment document")
    total_minor: NonNegativeMinor
    currency: Currency


class ErpReverseOrderV1(_Order):
    """Reverse the commitment of an order that will not be collected (dated `business_day`)."""

    TYPE: ClassVar[str] = "erp.reverse_order.v1"

    business_day: date


class ErpOrderReversedV1(_Order):
    TYPE: ClassVar[str] = "erp.order_reversed.v1"

    doc_no: str | None = Field(None, max_length=12, description="the reversal document; None: never committed")


class ErpFulfilOrderV1(_Order):
    """The customer collected: the reserved units leave the shelf and the revenue is recognised."""

    TYPE: ClassVar[str] = "erp.fulfil_order.v1"

    business_day: date = Field(description="the day of the collection, the revenue's date")


class ErpOrderFulfilledV1(_Order):
    TYPE: ClassVar[str] = "erp.order_fulfilled.v1"

    revenue_doc_no: str = Field(min_length=1, max_length=12)
    total_minor: NonNegativeMinor
    currency: Currency


# ---------------------------------------------------------------------- loyalty
class LoyaltyHoldPointsV1(_Order):
    """Hold `points` on `card` for the order until it is collected or cancelled (answered by
    loyalty.redemption_authorized.v1, or loyalty.redemption_refused.v1). While the platform
    cannot answer the service keeps trying; past `answer_by` it refuses as `unavailable`."""

    TYPE: ClassVar[str] = "loyalty.hold_points.v1"

    card: Card
    points: StrictInt = Field(gt=0)
    ttl_seconds: StrictInt = Field(gt=0, description="how long the platform holds them")
    answer_by: AwareDatetime


class LoyaltyRedemptionRefusedV1(_Message):
    """Points that could not be held for a transaction: the business answer, not a failure."""

    TYPE: ClassVar[str] = "loyalty.redemption_refused.v1"

    card: Card
    store_id: StoreId
    pos_txn_id: OrderId = Field(description="the order (or till transaction) they were asked for")
    points: StrictInt = Field(gt=0)
    code: Literal["insufficient_points", "unknown_member", "member_inactive", "refused", "unavailable"]
    reason: str = Field(min_length=1, max_length=500)


class LoyaltyCapturePointsV1(_Order):
    """Redeem the held points: the order was collected (answered by loyalty.redemption_captured.v1)."""

    TYPE: ClassVar[str] = "loyalty.capture_points.v1"

    hold_id: HoldId


class LoyaltyReleasePointsV1(_Order):
    """Give the held points back: the order was cancelled (answered by loyalty.redemption_released.v1)."""

    TYPE: ClassVar[str] = "loyalty.release_points.v1"

    hold_id: HoldId


class LoyaltyAccrueOrderV1(_Order):
    """Earn the collected order's points by the earning rules, as a sale of the pickup store on
    the day of the collection (answered by loyalty.order_accrued.v1)."""

    TYPE: ClassVar[str] = "loyalty.accrue_order.v1"

    card: Card
    business_day: date
    currency: Currency
    lines: list[PostedLine] = Field(min_length=1)


class LoyaltyOrderAccruedV1(_Order):
    TYPE: ClassVar[str] = "loyalty.order_accrued.v1"

    card: Card
    business_day: date
    points: StrictInt = Field(ge=0, description="earned at the platform (0: nothing earns, or no member)")


# ---------------------------------------------------------------------- crm
class CrmRecordOrderV1(_Order):
    """Add the closed order to the customer's engagement history, once per order: a purchase
    when it was collected, a service interaction when it was cancelled."""

    TYPE: ClassVar[str] = "crm.record_order.v1"

    customer_id: CustomerId
    outcome: Literal["collected", "cancelled"]
    amount_minor: NonNegativeMinor
    currency: Currency
    at: AwareDatetime = Field(description="when it was collected or cancelled")


class CrmOrderRecordedV1(_Order):
    TYPE: ClassVar[str] = "crm.order_recorded.v1"

    customer_id: CustomerId


# ---------------------------------------------------------------------- the experience API
class OrderCloseV1(_Order):
    """Close the order where the customer sees it (answered by order.collected.v1 or
    order.cancelled.v1, which the experience API announces once it recorded the outcome)."""

    TYPE: ClassVar[str] = "order.close.v1"

    outcome: Literal["collected", "cancelled"]
    at: AwareDatetime = Field(description="when it was collected or cancelled")
    reason: CancelReason | None = Field(None, description="cancelled: why")
    detail: str = Field(min_length=1, max_length=500)
    revenue_doc_no: str | None = Field(None, max_length=12, description="collected: the ERP's revenue document")
    points_redeemed: StrictInt = Field(0, ge=0)
    points_earned: StrictInt = Field(0, ge=0)
