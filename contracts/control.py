"""What a store agent says it accepted on one business day: its control totals.

Reconciliation (services/reconcile) holds these against what the ERP posted and
what the loyalty points file carried. A later message for the same store and
day supersedes an earlier one: `as_of` (the agent's accept counter) orders them.

v1 carries every transaction of the day, so its size and the work to build it
grow with the day. v2 carries per kind a count, amounts and an order-independent
digest of the transactions (`TxnDigest`), a few hundred bytes whatever the day:
reconciliation computes the same digest over the ERP's documents and the points
file, and asks the agent for the day's list (the v1 shape) only when they differ.
Both are served while agents move to v2.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import date
from typing import Annotated, ClassVar, Literal

from pydantic import (AwareDatetime, BaseModel, ConfigDict, Field, StringConstraints, field_validator,
                      model_validator)

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


MASK64 = (1 << 64) - 1


def txn_hash(kind: str, pos_txn_id: str, *more: object) -> int:
    """64 bits of a transaction's identity (and, for the ERP side, its total and currency)."""
    text = "\x1f".join((kind, pos_txn_id, *map(str, more)))
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


@dataclass
class TxnDigest:
    """Count, amounts and the sum (mod 2^64) of per-transaction hashes: the same for the
    same multiset whatever the order, and changed by a missing, doubled or re-priced one
    (a sum, unlike a XOR, does not cancel a transaction counted twice)."""

    count: int = 0
    amount_minor: dict[str, int] = field(default_factory=dict)
    digest: int = 0

    def add(self, hashed: int, total_minor: int = 0, currency: str | None = None) -> None:
        self.count += 1
        self.digest = (self.digest + hashed) & MASK64
        if currency is not None:
            self.amount_minor[currency] = self.amount_minor.get(currency, 0) + total_minor

    def add_txn(self, kind: str, pos_txn_id: str, total_minor: int, currency: str) -> None:
        self.add(txn_hash(kind, pos_txn_id, total_minor, currency), total_minor, currency)

    def add_points(self, kind: str, pos_txn_id: str) -> None:
        self.add(txn_hash(kind, pos_txn_id))

    def same(self, other: "TxnDigest") -> bool:
        return (self.count, self.digest, self.amount_minor) == (other.count, other.digest, other.amount_minor)


Hex64 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{16}$")]


class KindDigest(BaseModel):
    """Sales or returns of the day: count, amount per currency, and digests of the
    transactions (kind, pos id, total, currency) and of those that should be in the
    loyalty points file (bus transactions with a loyalty card: kind, pos id)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    count: int = Field(ge=0)
    amount_minor: dict[Currency, MinorUnits] = Field(default_factory=dict)
    digest: Hex64 = Field(description="sum mod 2^64 of contracts.control.txn_hash(kind, pos_txn_id, "
                                      "total_minor, currency), 16 hex digits")
    loyalty_count: int = Field(ge=0, description="bus transactions with a loyalty card")
    loyalty_digest: Hex64 = Field(description="sum mod 2^64 of txn_hash(kind, pos_txn_id) over those")

    @classmethod
    def of(cls, txns: TxnDigest, loyalty: TxnDigest) -> "KindDigest":
        return cls(count=txns.count, amount_minor=dict(txns.amount_minor), digest=f"{txns.digest:016x}",
                   loyalty_count=loyalty.count, loyalty_digest=f"{loyalty.digest:016x}")

    def txns(self) -> TxnDigest:
        return TxnDigest(self.count, dict(self.amount_minor), int(self.digest, 16))

    def loyalty(self) -> TxnDigest:
        return TxnDigest(self.loyalty_count, {}, int(self.loyalty_digest, 16))


class StoreControlTotalsV2(BaseModel):
    """A store agent's accepted sales and returns of one business day, as digests
    (the list itself: `GET /control/transactions` on the agent)."""

    TYPE: ClassVar[str] = "store.control_totals.v2"
    model_config = ConfigDict(extra="forbid", frozen=True)

    store_id: StoreId
    business_day: date
    as_of: int = Field(ge=0, description="the agent's accept counter when the totals were taken")
    taken_at: AwareDatetime
    sales: KindDigest
    returns: KindDigest
