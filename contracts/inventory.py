"""Stock reserved for orders at a store, as the ERP announces it.

Each line carries the store's levels after the change (on hand and everything
reserved live), not only the delta, so a store's stock cache can answer "available"
without the ERP, and a replayed or reordered event cannot drift it (the newer
`at` wins), as with erp.stock_changed.v1.
"""
from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, StrictInt

from contracts.orders import OrderId
from contracts.pos import Sku, StoreId


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ReservedLine(_Message):
    sku: Sku
    quantity: StrictInt = Field(gt=0, description="units this order reserves (or gave back)")
    on_hand: StrictInt = Field(description="STK_LVL.ON_HAND after the change")
    reserved: StrictInt = Field(ge=0, description="units of the SKU reserved live at the store after the change")


class InventoryReservedV1(_Message):
    TYPE: ClassVar[str] = "inventory.reserved.v1"

    order_id: OrderId
    store_id: StoreId
    lines: list[ReservedLine] = Field(min_length=1)
    expires_at: AwareDatetime = Field(description="a reservation not collected nor released by then stops counting")
    at: AwareDatetime


class InventoryReleasedV1(_Message):
    """The order's reservation ended: given back to the shelf (cancelled), or taken off the
    shelf with the goods (collected: on hand went down by the same units)."""

    TYPE: ClassVar[str] = "inventory.released.v1"

    order_id: OrderId
    store_id: StoreId
    lines: list[ReservedLine] = Field(min_length=1)
    reason: Literal["cancelled", "collected"]
    at: AwareDatetime


class Shortage(_Message):
    sku: Sku
    wanted: StrictInt = Field(gt=0)
    available: StrictInt = Field(description="on hand minus live reservations (may be negative)")


class InventoryUnavailableV1(_Message):
    """The ERP could not reserve the order: these SKUs lack stock at the store. Nothing was reserved."""

    TYPE: ClassVar[str] = "inventory.unavailable.v1"

    order_id: OrderId
    store_id: StoreId
    shortages: list[Shortage] = Field(min_length=1)
    at: AwareDatetime
