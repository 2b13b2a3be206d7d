"""The loyalty service's part of click and collect: the order process's commands (bus/process).

A mixin of `LoyaltyService` (platform, rules, db). The order's points are held at the
platform for the pickup store under the order id, like a till's hold for its
transaction (`LOY_HOLD`), so the daily settlement and reconciliation see them the same
way; collection captures them and earns the order's points by the earning rules as a
sale of the pickup store on the collection day (`LOY_ACCRUAL`), at the platform whatever
the accrual mode: the legacy points file never knew online orders. Every platform
write is keyed by the order, so a command sent again books nothing twice.

A refusal on the merits (not enough points, no such member) is the reply
`loyalty.redemption_refused.v1`: the process cancels the order with that reason. While
the platform cannot answer, the hold command fails and is retried (the handler's
schedule in bus.yaml); past the command's `answer_by` it is refused as `unavailable`,
so the customer is told instead of left waiting.
"""
from __future__ import annotations

from datetime import datetime, timezone

from bus.process import StepRefused, command_handler
from contracts.envelope import CloudEvent
from contracts.erp import ErpSalePostedV1
from contracts.loyalty import LoyaltyRedemptionAuthorizedV1, LoyaltyRedemptionCapturedV1, LoyaltyRedemptionReleasedV1
from contracts.order_process import (LoyaltyAccrueOrderV1, LoyaltyCapturePointsV1, LoyaltyHoldPointsV1,
                                     LoyaltyOrderAccruedV1, LoyaltyRedemptionRefusedV1, LoyaltyReleasePointsV1)
from services.loyalty import accrual
from services.loyalty.platform import (InsufficientPointsError, LoyaltyRefusedError, LoyaltyUnavailableError,
                                       MemberInactiveError, UnknownMemberError)
from services.loyalty.tables import HOLDS

REFUSAL_CODES = {InsufficientPointsError: "insufficient_points", UnknownMemberError: "unknown_member",
                 MemberInactiveError: "member_inactive"}


class OrderCommands:
    """Command handlers of click and collect (mixed into LoyaltyService)."""

    @command_handler(LoyaltyHoldPointsV1.TYPE)
    def on_hold_points(self, command: LoyaltyHoldPointsV1, event: CloudEvent):
        fields = dict(card=command.card, store_id=command.store_id, pos_txn_id=command.order_id, points=command.points)
        try:
            hold = self.platform.hold(command.card, command.points, f"{command.store_id}/{command.order_id}",
                                      command.store_id, command.ttl_seconds, key=f"order-hold:{command.order_id}")
        except LoyaltyRefusedError as exc:
            return LoyaltyRedemptionRefusedV1(**fields, code=REFUSAL_CODES.get(type(exc), "refused"),
                                              reason=str(exc)[:500] or exc.code)
        except LoyaltyUnavailableError as exc:
            if datetime.now(timezone.utc) < command.answer_by:
                raise  # retried by the handler's schedule while the order may still wait
            return LoyaltyRedemptionRefusedV1(**fields, code="unavailable",
                                              reason=f"the loyalty platform did not answer in time: {exc}"[:500])
        accrual.record_hold(self.db.conn, hold, command.store_id, command.order_id, offline=False)
        return LoyaltyRedemptionAuthorizedV1(**fields, hold_id=hold["hold_id"], expires_at=hold["expires_at"])

    def _hold_row(self, hold_id: str) -> dict:
        row = self.db.conn.execute(HOLDS.select().where(HOLDS.c.HOLD_ID == hold_id)).mappings().first()
        if row is None:
            raise StepRefused("unknown_hold", f"hold {hold_id} was not taken by this service")
        return dict(row)

    @command_handler(LoyaltyCapturePointsV1.TYPE)
    def on_capture_points(self, command: LoyaltyCapturePointsV1, event: CloudEvent):
        row = self._hold_row(command.hold_id)
        try:
            self.platform.capture(command.hold_id)
        except LoyaltyRefusedError as exc:  # expired or released at the platform: a person must look
            raise StepRefused(exc.code if exc.code.startswith("hold_") else "capture_refused", str(exc)) from None
        accrual.mark_hold(self.db.conn, command.hold_id, "captured")
        return LoyaltyRedemptionCapturedV1(hold_id=command.hold_id, card=row["CARD"], store_id=row["STORE_ID"],
                                           pos_txn_id=row["POS_TXN_ID"], points=row["POINTS"])

    @command_handler(LoyaltyReleasePointsV1.TYPE)
    def on_release_points(self, command: LoyaltyReleasePointsV1, event: CloudEvent):
        row = self._hold_row(command.hold_id)
        try:
            self.platform.release(command.hold_id)
        except LoyaltyRefusedError as exc:  # captured already: the points were spent
            raise StepRefused("hold_captured", str(exc)) from None
        accrual.mark_hold(self.db.conn, command.hold_id, "released")
        return LoyaltyRedemptionReleasedV1(hold_id=command.hold_id, card=row["CARD"], store_id=row["STORE_ID"],
                                           pos_txn_id=row["POS_TXN_ID"], points=row["POINTS"], reason="cancelled")

    @command_handler(LoyaltyAccrueOrderV1.TYPE)
    def on_accrue_order(self, command: LoyaltyAccrueOrderV1, event: CloudEvent):
        """The order earns as a sale of the pickup store on the day it was collected."""
        doc = ErpSalePostedV1(store_id=command.store_id, pos_txn_id=command.order_id, doc_no=command.order_id,
                              business_day=command.business_day, posted_at=datetime.now(timezone.utc),
                              currency=command.currency, total_minor=sum(x.line_total_minor for x in command.lines),
                              loyalty_card=command.card, lines=command.lines)
        earned = accrual.earn(self.platform, self.rules.config.earning, doc)  # None: the card has no member
        points = sum(earned.points) if earned else 0
        if points:
            self.platform.book(command.card, "EARN", points, f"{command.store_id}/{command.order_id}",
                               command.store_id, key=f"earn:{command.store_id}:{command.order_id}")
        accrual.record_sale(self.db.conn, doc, earned if points else None)
        return LoyaltyOrderAccruedV1(order_id=command.order_id, store_id=command.store_id, card=command.card,
                                     business_day=command.business_day, points=points)
