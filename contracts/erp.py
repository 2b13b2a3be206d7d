"""What the ERP says back once it has booked a store transaction or moved stock.

Posted documents echo the store's `pos_txn_id` so consumers (loyalty, CRM, the store
agent's parity check) can join them to the POS message without asking the ERP.
"""
from __future__ import annotations

from datetime import date
from typing import Annotated, ClassVar

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, StrictInt, StringConstraints

from contracts.money import Currency, MinorUnits
from contracts.pos import PosTxnId, Sku, StoreId

DocNo = Annotated[str, StringConstraints(min_length=1, max_length=40, pattern=r"\S")]


class PostedLine(BaseModel):
    """A line as the ERP booked it; pricing detail stays with the POS message."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sku: Sku
    quantity: StrictInt
    line_total_minor: MinorUnits


class _PostedDocument(BaseModel):
    """Fields shared by posted sales and posted returns."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    store_id: StoreId
    pos_txn_id: PosTxnId
    doc_no: DocNo
    business_day: date
    posted_at: AwareDatetime
    currency: Currency
    total_minor: MinorUnits
    loyalty_card: str | None = None
    lines: list[PostedLine] = Field(min_length=1)


class ErpSalePostedV1(_PostedDocument):
    TYPE: ClassVar[str] = "erp.sale_posted.v1"


class OriginalSale(BaseModel):
    """The sale a return refers to as the ERP holds it when it posts the return: what each
    line sold and was paid (after discounts), and what the returns posted before this one
    took back, per SKU (`returned_before`: units and amounts), so a return's policy is judged
    by the ERP's record, not by what the till says."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    doc_no: DocNo
    business_day: date
    loyalty_card: str | None = None
    lines: list[PostedLine] = Field(min_length=1)
    returned_before: list[PostedLine] = Field(default_factory=list)


class ErpReturnPostedV1(_PostedDocument):
    """The original sale is optional: a receipt-less return has none; `original` is the
    sale's record when the ERP had posted it (None: receipt-less, or not posted yet)."""

    TYPE: ClassVar[str] = "erp.return_posted.v1"

    original_pos_txn_id: PosTxnId | None = None
    original_doc_no: DocNo | None = None
    original: OriginalSale | None = None


class ErpStockChangedV1(BaseModel):
    """The new on-hand level (not a delta), so a replayed or reordered event cannot drift."""

    TYPE: ClassVar[str] = "erp.stock_changed.v1"
    model_config = ConfigDict(extra="forbid", frozen=True)

    store_id: StoreId
    sku: Sku
    on_hand: StrictInt
    changed_at: AwareDatetime
    deleted: bool = False


class StockChange(BaseModel):
    """One captured row version inside `erp.stock_changes.v1`, keyed as it would be alone."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    idempotencykey: Annotated[str, StringConstraints(min_length=1, max_length=200)]
    change: ErpStockChangedV1


class ErpStockChangesV1(BaseModel):
    """Stock levels captured from the legacy table, many to a message.

    The broker here carries a few thousand persistent messages a second and a
    scan of the stock table yields tens of thousands of changed rows, so one
    message per row would cap change capture at the broker's message rate.
    Each item is exactly an `erp.stock_changed.v1` with its own idempotency
    key: a consumer applies the items as if each had arrived alone. A type of
    its own (not `event.batch.v1`) so subscribers bind stock changes by
    routing key and never receive other tables' rows.
    """

    TYPE: ClassVar[str] = "erp.stock_changes.v1"
    model_config = ConfigDict(extra="forbid", frozen=True)

    items: list[StockChange] = Field(min_length=1, max_length=5000)
