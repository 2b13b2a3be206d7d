"""What a till sends: sales, returns and stock look-ups.

Sale and return share one transaction shape and one set of arithmetic rules, so a
receipt that does not add up is refused at the edge instead of surfacing as a ledger
difference in the ERP days later.

Cross-field rules are field validators reading earlier fields (`info.data`) rather than
model validators, because only a field validator reports the failing field's path
(`lines.0.line_total_minor`, `total_minor`, `tenders`). That is why, in a transaction,
`total_minor` is declared between `lines` and `tenders`: each rule checks against fields
declared before it.
"""
from __future__ import annotations

from collections import Counter
from datetime import date
from typing import Annotated, ClassVar, Literal

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    StrictInt,
    StringConstraints,
    ValidationInfo,
    field_validator,
    model_serializer,
)

from contracts.money import Currency, MinorUnits, NonNegativeMinor

# The legacy QTY and ON_HAND columns are INTEGER: 32 bits on PostgreSQL (and in most ERPs).
_INT32_MAX = 2**31 - 1
Quantity = Annotated[StrictInt, Field(ge=-_INT32_MAX, le=_INT32_MAX)]


class Limits(BaseModel):
    """Sane bounds for a till's transaction, below what storage can hold; retail practice
    varies (a builder's merchant sells by the thousand), so ops set them
    (`RETAILBUS.agent.limits`) and the store agent validates with them as context
    (`model_validate(data, context={"limits": limits})`). Without that context only the
    storage bounds of the types apply, so a consumer never refuses what an agent took."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_quantity: int = Field(100_000, ge=1, le=_INT32_MAX, description="units on one line, either sign")
    max_amount_minor: int = Field(100_000_000, ge=1, description=(
        "any price, line, total or tender in minor units, either sign (default: 1,000,000.00)"))


def _within_limits(field: str, value: int, info: ValidationInfo) -> int:
    """Refuse `value` beyond the caller's Limits (if it gave any), naming the bound."""
    limits = info.context.get("limits") if isinstance(info.context, dict) else None
    if limits is None:
        return value
    bound = limits.max_quantity if field == "quantity" else limits.max_amount_minor
    if abs(value) > bound:
        raise ValueError(f"{value} is beyond the limit of {bound} (RETAILBUS.agent.limits)")
    return value

# Retail identifiers shared by every message that refers to a store transaction.
StoreId = Annotated[str, StringConstraints(pattern=r"^[A-Z0-9]{1,8}$")]
TerminalId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9]{1,4}$")]
PosTxnId = Annotated[str, StringConstraints(min_length=1, max_length=40, pattern=r"\S")]
Sku = Annotated[str, StringConstraints(min_length=1, pattern=r"\S")]


class SaleLine(BaseModel):
    """One receipt line; a negative quantity corrects an earlier line of the same sale."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    line_no: int = Field(ge=1)
    sku: Sku
    quantity: Quantity
    unit_price_minor: NonNegativeMinor
    discount_minor: NonNegativeMinor = 0
    line_total_minor: MinorUnits

    @field_validator("quantity")
    @classmethod
    def _non_zero(cls, quantity: int, info: ValidationInfo) -> int:
        if quantity == 0:
            raise ValueError("quantity must not be zero")
        return _within_limits("quantity", quantity, info)

    @field_validator("unit_price_minor", "discount_minor")
    @classmethod
    def _amount_within_limits(cls, amount: int, info: ValidationInfo) -> int:
        return _within_limits(info.field_name, amount, info)

    @field_validator("line_total_minor")
    @classmethod
    def _adds_up(cls, total: int, info: ValidationInfo) -> int:
        parts = info.data
        if {"quantity", "unit_price_minor", "discount_minor"} <= parts.keys():
            expected = parts["quantity"] * parts["unit_price_minor"] - parts["discount_minor"]
            if total != expected:
                raise ValueError(
                    f"line_total_minor {total} != quantity*unit_price_minor"
                    f" - discount_minor = {expected}"
                )
        return _within_limits("line_total_minor", total, info)


class ReturnLine(SaleLine):
    """Units handed back: always a positive count, the refund direction is the message type."""

    quantity: Annotated[StrictInt, Field(gt=0, le=_INT32_MAX)]


HoldId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,64}$")]


class Tender(BaseModel):
    """A means of payment (or of refund, on a return), net of any change given. A sale's
    loyalty tender names the hold its points were authorised under (`hold_id`, from the
    store agent's `POST /v1/loyalty/authorize`); no other tender carries one."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["cash", "card", "voucher", "loyalty", "other"]
    amount_minor: MinorUnits
    reference: str | None = None
    hold_id: HoldId | None = None

    @field_validator("amount_minor")
    @classmethod
    def _amount_within_limits(cls, amount: int, info: ValidationInfo) -> int:
        return _within_limits("amount_minor", amount, info)

    @field_validator("hold_id")
    @classmethod
    def _loyalty_only(cls, hold_id: str | None, info: ValidationInfo) -> str | None:
        if hold_id is not None and info.data.get("kind") != "loyalty":
            raise ValueError("only a loyalty tender carries a hold")
        return hold_id

    @model_serializer(mode="wrap")
    def _absent_hold_left_out(self, handler: SerializerFunctionWrapHandler) -> dict:
        """A tender without a hold serialises as before `hold_id` existed: a sale an older agent
        accepted, retried to a newer one, is still the same sale (the outbox's payload hash)."""
        data = handler(self)
        if data.get("hold_id") is None:
            data.pop("hold_id", None)
        return data


class _PosTransaction(BaseModel):
    """Header, lines, total and tenders common to a sale and a return."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    store_id: StoreId
    terminal_id: TerminalId
    pos_txn_id: PosTxnId
    business_day: date
    occurred_at: AwareDatetime | None = None  # None: the till gave no time (the legacy ERP stores NULL)
    currency: Currency
    lines: list[SaleLine] = Field(min_length=1)
    total_minor: MinorUnits
    tenders: list[Tender] = Field(min_length=1)
    loyalty_card: str | None = None
    customer_id: str | None = None

    @field_validator("lines")
    @classmethod
    def _unique_line_numbers(cls, lines: list[SaleLine]) -> list[SaleLine]:
        numbers = [line.line_no for line in lines]
        if len(set(numbers)) < len(numbers):  # counted only then: this runs for every sale
            duplicates = sorted(line_no for line_no, n in Counter(numbers).items() if n > 1)
            raise ValueError(f"duplicate line_no {duplicates}")
        return lines

    @field_validator("total_minor")
    @classmethod
    def _total_is_sum_of_lines(cls, total: int, info: ValidationInfo) -> int:
        if "lines" in info.data:
            expected = sum(line.line_total_minor for line in info.data["lines"])
            if total != expected:
                raise ValueError(f"total_minor {total} != sum of line totals {expected}")
        return _within_limits("total_minor", total, info)

    @field_validator("tenders")
    @classmethod
    def _tenders_cover_total(cls, tenders: list[Tender], info: ValidationInfo) -> list[Tender]:
        if "total_minor" in info.data:
            paid = sum(tender.amount_minor for tender in tenders)
            if paid != info.data["total_minor"]:
                raise ValueError(f"sum of tenders {paid} != total_minor {info.data['total_minor']}")
        return tenders


class PosSaleV1(_PosTransaction):
    """A negative line corrects another line of the same sale; a "sale" whose every line is
    negative is a refund in disguise and is refused: it must travel as a pos.return.v1, so
    it is booked as a return (RTN document, reversed GL) and found by reconciliation as one."""

    TYPE: ClassVar[str] = "pos.sale.v1"

    @field_validator("total_minor")
    @classmethod
    def _not_a_disguised_return(cls, total: int, info: ValidationInfo) -> int:
        lines = info.data.get("lines")
        if lines and total < 0 and all(line.quantity < 0 for line in lines):
            raise ValueError("every line is negative: a refund is a return (pos.return.v1, POST /erp/returns), "
                             "not a sale")
        return total


class OriginalSaleRef(BaseModel):
    """The sale being returned, when the customer brought the receipt."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    store_id: StoreId
    pos_txn_id: PosTxnId
    business_day: date | None = None


class PosReturnV1(_PosTransaction):
    """A refund: positive quantities and amounts, tenders are what was paid back."""

    TYPE: ClassVar[str] = "pos.return.v1"

    lines: list[ReturnLine] = Field(min_length=1)
    original: OriginalSaleRef | None = None  # None: a return without a receipt
    reason: str | None = None

    @field_validator("tenders")
    @classmethod
    def _no_holds(cls, tenders: list[Tender]) -> list[Tender]:
        held = [str(n) for n, tender in enumerate(tenders, start=1) if tender.hold_id is not None]
        if held:
            raise ValueError(f"tender {', '.join(held)} carries a hold_id: a return refunds points, it redeems none")
        return tenders


def idempotency_key(txn: PosSaleV1 | PosReturnV1) -> str:
    """The one key of a store transaction, however it travels (the store agent's legacy
    paths and /v1/events, the erp's RPC path): a sale sent two ways posts once."""
    return f"{txn.TYPE}:{txn.store_id}:{txn.pos_txn_id}"


class PosStockQueryV1(BaseModel):
    """A till asking for on-hand quantities; bounded so one query stays one cheap RPC."""

    TYPE: ClassVar[str] = "pos.stock_query.v1"
    model_config = ConfigDict(extra="forbid", frozen=True)

    store_id: StoreId
    skus: list[Sku] = Field(min_length=1, max_length=100)
