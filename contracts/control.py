"""What a store agent says it accepted on one business day: its control totals.

Reconciliation (services/reconcile) holds these against what the ERP posted and
what the loyalty points file carried. Counts and amounts alone would say *that*
something is missing; the transaction list says *which* POS transaction, so
each one is named. A later message for the same store and day supersedes an
earlier one: `as_of` (the agent's accept counter) orders them.
"""
from __future__ import annotations

from datetime import date
from typing import ClassVar, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, field_validator, model_validator

from contracts.money import Currency, MinorUnits
from contracts.pos import PosTxnId, StoreId


class ControlTxn(BaseModel):
    """One accepted sale or return, as the agent committed it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    pos_txn_id: PosTxnId
    total_minor: MinorUnits
    currency: Currency
    loyalty_card: bool = Field(description="the receipt carried a loyalty card")
    via: Literal["bus", "legacy"] = Field(description="bus: through the outbox and the erp service; "
                                                      "legacy: answered by the legacy ERP API")


def _amounts(txns: list[ControlTxn]) -> dict[str, int]:
    sums: dict[str, int] = {}
    for txn in txns:
        sums[txn.currency] = sums.get(txn.currency, 0) + txn.total_minor
    return sums


class KindTotals(BaseModel):
    """Sales or returns of the day: the count and amount per currency, and each transaction."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    count: int = Field(ge=0)
    amount_minor: dict[Currency, MinorUnits] = Field(default_factory=dict)
    transactions: list[ControlTxn] = Field(default_factory=list)

    @field_validator("transactions")
    @classmethod
    def _unique(cls, txns: list[ControlTxn]) -> list[ControlTxn]:
        seen, twice = set(), set()
        for txn in txns:
            (twice if txn.pos_txn_id in seen else seen).add(txn.pos_txn_id)
        if twice:
            raise ValueError(f"pos_txn_id listed twice: {sorted(twice)[:5]}")
        return txns

    @model_validator(mode="after")
    def _adds_up(self):
        if self.count != len(self.transactions):
            raise ValueError(f"count {self.count} != {len(self.transactions)} transactions listed")
        sums = _amounts(self.transactions)
        if sums != self.amount_minor:
            raise ValueError(f"amount_minor {self.amount_minor} != sum of transactions {sums}")
        return self

    @classmethod
    def of(cls, txns: list[ControlTxn]) -> "KindTotals":
        return cls(count=len(txns), amount_minor=_amounts(txns), transactions=txns)


class StoreControlTotalsV1(BaseModel):
    """A store agent's accepted sales and returns of one business day (reconciliation)."""

    TYPE: ClassVar[str] = "store.control_totals.v1"
    model_config = ConfigDict(extra="forbid", frozen=True)

    store_id: StoreId
    business_day: date
    as_of: int = Field(ge=0, description="the agent's accept counter when the totals were taken")
    taken_at: AwareDatetime
    sales: KindTotals
    returns: KindTotals
