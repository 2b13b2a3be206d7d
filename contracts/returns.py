"""The return-to-refund process's commands and replies (services/returns, bus/process).

A bus-routed `pos.return.v1` starts one process per return; the process asks each system
for its part by a command on `<system>.commands` and waits for the system's reply on
`<system>.events`: the erp posts the return (`erp.post_return.v1`, answered by its own
`erp.return_posted.v1`), the loyalty service refunds the points redeemed on the returned
part and reverses the points its lines earned, with any threshold promotion's bonus
the return takes back (`loyalty.return_points.v1`, also undoing either when a later step
fails), and the crm service records the return in the customer's engagement history
(`crm.record_return.v1`).
"""
from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, StrictInt

from contracts.erp import ErpReturnPostedV1
from contracts.pos import PosReturnV1, PosTxnId, StoreId


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ErpPostReturnV1(_Message):
    """Post this return in the ERP: revenue and stock back, once per store and POS id."""

    TYPE: ClassVar[str] = "erp.post_return.v1"

    pos_return: PosReturnV1 = Field(description="the return as the till sent it")


ReturnPointsAction = Literal["refund", "reverse", "undo_refund", "undo_reverse"]


class LoyaltyReturnPointsV1(_Message):
    """A return's points at the loyalty platform. `refund`: give back the points redeemed on
    the sale, in proportion to the amount returned; `reverse`: take back what the returned
    lines earned, plus `clawback_points` of the threshold promotion `clawback_promotion`
    the sale no longer reaches (never more than it granted); `undo_refund` / `undo_reverse`:
    the compensations, taking back exactly what the step booked."""

    TYPE: ClassVar[str] = "loyalty.return_points.v1"

    action: ReturnPointsAction
    posted: ErpReturnPostedV1 = Field(description="the return as the erp posted it")
    clawback_points: StrictInt = Field(0, ge=0, description="reverse: the promotion bonus to take back")
    clawback_promotion: str | None = Field(None, max_length=64)


class LoyaltyReturnPointsBookedV1(_Message):
    """What the loyalty platform booked for one action of a return (0: nothing to book)."""

    TYPE: ClassVar[str] = "loyalty.return_points_booked.v1"

    store_id: StoreId
    pos_txn_id: PosTxnId
    action: ReturnPointsAction
    card: str | None = None
    points: StrictInt = Field(ge=0, description="refunded, reversed (with the clawback) or undone")
    clawback_points: StrictInt = Field(0, ge=0, description="of `points`, the promotion bonus taken back")


class CrmRecordReturnV1(_Message):
    """Add the return to the card holder's engagement history (once per return)."""

    TYPE: ClassVar[str] = "crm.record_return.v1"

    store_id: StoreId
    pos_txn_id: PosTxnId
    loyalty_card: str = Field(min_length=1)
    amount_minor: StrictInt = Field(ge=0)
    posted_at: AwareDatetime
    original_pos_txn_id: PosTxnId | None = None


class CrmReturnRecordedV1(_Message):
    TYPE: ClassVar[str] = "crm.return_recorded.v1"

    store_id: StoreId
    pos_txn_id: PosTxnId
    customer_id: str | None = Field(None, description="None: the card has no member, nothing was recorded")
    recorded: bool
