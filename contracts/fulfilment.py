"""Fulfilment at the pickup store: tasks for store associates, and what they report back.

A task reaches the store's agent on the store's own queue (so a store that is offline
finds its tasks waiting when it reconnects); associates list, pick and hand over orders
through signed calls on their agent, which sends `fulfilment.picked.v1`,
`fulfilment.collected.v1` and `fulfilment.task_withdrawn.v1` through the store's outbox
like a sale: a collection recorded while the store is offline reaches the order process
when the link returns.
"""
from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, StrictInt

from contracts.orders import CustomerId, OrderId
from contracts.pos import Sku, StoreId, TerminalId


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TaskLine(_Message):
    line_no: StrictInt = Field(ge=1, le=999)
    sku: Sku
    quantity: StrictInt = Field(gt=0)


class FulfilmentTaskCreatedV1(_Message):
    """Pick these lines for the customer; hand them over until `collect_by`."""

    TYPE: ClassVar[str] = "fulfilment.task_created.v1"

    order_id: OrderId
    store_id: StoreId
    customer_id: CustomerId
    lines: list[TaskLine] = Field(min_length=1)
    collect_by: AwareDatetime = Field(description="the order is cancelled as not collected after this")
    created_at: AwareDatetime


class FulfilmentTaskCancelledV1(_Message):
    """The customer cancelled: withdraw the task unless the order was handed over (the store,
    where handover happens, decides; a cancellation that arrives before its task waits for it)."""

    TYPE: ClassVar[str] = "fulfilment.task_cancelled.v1"

    order_id: OrderId
    store_id: StoreId
    reason: Literal["customer_cancelled"] = "customer_cancelled"
    cancelled_at: AwareDatetime


class _StoreReport(_Message):
    order_id: OrderId
    store_id: StoreId
    terminal_id: TerminalId = Field(description="the associate's terminal that signed the call")


class FulfilmentPickedV1(_StoreReport):
    """The order is picked and waits at the counter."""

    TYPE: ClassVar[str] = "fulfilment.picked.v1"

    picked_at: AwareDatetime


class FulfilmentCollectedV1(_StoreReport):
    """The customer took the order (the store's clock; the link may have been down)."""

    TYPE: ClassVar[str] = "fulfilment.collected.v1"

    collected_at: AwareDatetime


class FulfilmentTaskWithdrawnV1(_Message):
    """The store put the order's goods back and will not hand it over: the customer cancelled,
    or did not come by `collect_by` (the store's agent decides at its clock, offline too)."""

    TYPE: ClassVar[str] = "fulfilment.task_withdrawn.v1"

    order_id: OrderId
    store_id: StoreId
    reason: Literal["customer_cancelled", "not_collected"]
    withdrawn_at: AwareDatetime
