"""Click and collect as a process on the engine (bus/process): one instance per order.

    hold_points -> reserve_stock -> commit_order -> handover -+-> collected: capture_points,
                                                               |   recognise_revenue, accrue_points
                                                               +-> cancelled: release_stock,
                                                                   reverse_commitment, release_points
                                                   -> close -> record_crm

Each step is a command to the system that does it; a step with nothing to do for this
order is skipped (its command function returns None). A business "no" is a reply, not
a failure: the loyalty service refusing the points (or not reaching the platform by the
order's `answer_by`), the ERP short of stock, the store withdrawing the task (the
customer cancelled, or did not come by `collect_by`) set `cancel` in the instance's
data, the steps up to the handover are skipped, and the cancellation steps give back
what the order held. The customer's cancellation (`order.cancel_requested.v1`) is noted
in ORDER_CANCEL (services/orders/process.py) and read here before each step up to the
handover; once the store has the task, the store decides (it may have handed it over).

A step up to the commitment that fails for good (refused, or no answer after its
resends) is compensated by the engine (latest first) and a case opened. From the
handover on, nothing is undone: the goods may be in the customer's hands, so a failure
there opens a case and leaves everything as it is (`on_failure="case"`). The CRM entry
is the last step, so a CRM outage never holds an order up.
"""
from __future__ import annotations

from datetime import date, datetime, timedelta, timezone

from sqlalchemy import Column, MetaData, String, Table, delete, select

from bus.process import Context, ProcessDefinition, Step, store
from contracts.fulfilment import FulfilmentCollectedV1, FulfilmentTaskCreatedV1, FulfilmentTaskWithdrawnV1
from contracts.inventory import InventoryReleasedV1, InventoryReservedV1, InventoryUnavailableV1
from contracts.loyalty import LoyaltyRedemptionAuthorizedV1, LoyaltyRedemptionCapturedV1, LoyaltyRedemptionReleasedV1
from contracts.order_process import (CrmOrderRecordedV1, CrmRecordOrderV1, ErpCommitOrderV1, ErpFulfilOrderV1,
                                     ErpOrderCommittedV1, ErpOrderFulfilledV1, ErpOrderReversedV1, ErpReleaseStockV1,
                                     ErpReserveStockV1, ErpReverseOrderV1, LoyaltyAccrueOrderV1,
                                     LoyaltyCapturePointsV1, LoyaltyHoldPointsV1, LoyaltyOrderAccruedV1,
                                     LoyaltyRedemptionRefusedV1, LoyaltyReleasePointsV1, OrderCloseV1)
from contracts.orders import OrderCancelledV1, OrderCollectedV1, OrderPlacedV1
from services.orders.config import OrdersConfig

NAME = "click_collect"

metadata = MetaData()
CANCELS = Table(  # customers' cancellations, noted by the orders service as they arrive
    "ORDER_CANCEL", metadata,
    Column("ORDER_ID", String(40), primary_key=True),
    Column("REASON", String(200)),
    Column("REQUESTED_AT", String(40), nullable=False),
)



def prune_cancels(conn, limit: int) -> int:
    """Up to `limit` ORDER_CANCEL rows whose order has no process instance any more (a completed
    one pruned after `process_days`: bus/process/store.py `prune_completed`); how many went.
    Only the steps of a live instance read them (`_going_on`); a failed one, which `cases
    retry` runs again, is never pruned, so its cancellation stays. A request redelivered
    later is known by its inbox key; one for an order not started yet is not noted."""
    i = store.INSTANCES.c
    live = select(i.PROCESS_ID).where(i.PROCESS == NAME, i.CORR_KEY == CANCELS.c.ORDER_ID).exists()
    ids = list(conn.execute(select(CANCELS.c.ORDER_ID).where(~live).limit(limit)).scalars())
    if ids:
        conn.execute(delete(CANCELS).where(CANCELS.c.ORDER_ID.in_(ids), ~live))
    return len(ids)


# Replies a step may get besides its `reply` (the engine takes a command handler's answer by
# its key, whatever its type; the service binds these types too).
OTHER_REPLIES = (("loyalty", LoyaltyRedemptionRefusedV1), ("erp", InventoryUnavailableV1),
                 ("store_agent", FulfilmentTaskWithdrawnV1), ("orders_api", OrderCancelledV1))

LOYALTY_REASONS = {"unavailable": "loyalty_unavailable"}


class _Rules:
    """The orders rules of the running service (OrdersProcess sets them at start)."""
    config = OrdersConfig()


RULES = _Rules()


def _order(ctx: Context) -> dict:
    return ctx.data["order"]


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _cancel(ctx: Context, reason: str, detail: str) -> None:
    if not ctx.data.get("cancel"):
        ctx.data["cancel"] = {"reason": reason, "detail": detail[:500], "at": _now().isoformat()}


def _going_on(ctx: Context) -> bool:
    """False once the order is being cancelled; notes a customer's cancellation that arrived."""
    if not ctx.data.get("cancel"):
        found = ctx.conn.execute(select(CANCELS.c.REASON).where(CANCELS.c.ORDER_ID == ctx.key)).first()
        if found is not None:
            _cancel(ctx, "customer_cancelled", "the customer cancelled" + (f": {found.REASON}" if found.REASON else ""))
    return not ctx.data.get("cancel")


def begin(ctx: Context, order: OrderPlacedV1) -> None:
    rules = RULES.config
    ctx.data["order"] = order.model_dump(mode="json")
    ctx.data["answer_by"] = (order.placed_at + timedelta(seconds=rules.loyalty.wait_seconds)).isoformat()
    ctx.data["hold_ttl"] = rules.hold_seconds
    ctx.data["collect_seconds"] = rules.collect_seconds
    ctx.data["reservation_seconds"] = rules.reservation_seconds


# ---------------------------------------------------------------------- up to the handover
def hold_points(ctx: Context):
    order = _order(ctx)
    if not order["points"] or not _going_on(ctx):
        return None
    return LoyaltyHoldPointsV1(order_id=order["order_id"], store_id=order["pickup_store"], card=order["loyalty_card"],
                               points=order["points"], ttl_seconds=ctx.data["hold_ttl"],
                               answer_by=datetime.fromisoformat(ctx.data["answer_by"]))


def points_held(ctx: Context, reply) -> None:
    if isinstance(reply, LoyaltyRedemptionRefusedV1):
        _cancel(ctx, LOYALTY_REASONS.get(reply.code, "loyalty_refused"), f"loyalty: {reply.reason}")
    else:
        ctx.data["hold_id"] = reply.hold_id


def release_points(ctx: Context):
    order = _order(ctx)
    if not ctx.data.get("hold_id"):
        return None
    return LoyaltyReleasePointsV1(order_id=order["order_id"], store_id=order["pickup_store"],
                                  hold_id=ctx.data["hold_id"])


def points_released(ctx: Context, reply) -> None:
    ctx.data["hold_released"] = True


def reserve_stock(ctx: Context):
    order = _order(ctx)
    if not _going_on(ctx):
        return None
    until = datetime.fromisoformat(order["placed_at"]) + timedelta(seconds=ctx.data["reservation_seconds"])
    return ErpReserveStockV1(order_id=order["order_id"], store_id=order["pickup_store"], expires_at=until,
                             lines=[{"sku": x["sku"], "quantity": x["quantity"]} for x in order["lines"]])


def stock_reserved(ctx: Context, reply) -> None:
    if isinstance(reply, InventoryUnavailableV1):
        short = ", ".join(f"{s.sku}: {s.wanted} wanted, {max(s.available, 0)} available" for s in reply.shortages)
        _cancel(ctx, "out_of_stock", f"not enough stock at {reply.store_id}: {short}")
    else:
        ctx.data["reserved"] = True


def release_stock(ctx: Context):
    order = _order(ctx)
    if not ctx.data.get("reserved"):
        return None
    return ErpReleaseStockV1(order_id=order["order_id"], store_id=order["pickup_store"])


def stock_released(ctx: Context, reply) -> None:
    ctx.data["stock_released"] = True


def commit_order(ctx: Context):
    if not _going_on(ctx):
        return None
    return ErpCommitOrderV1(order=OrderPlacedV1.model_validate(_order(ctx)))


def committed(ctx: Context, reply: ErpOrderCommittedV1) -> None:
    ctx.data["doc_no"] = reply.doc_no


def reverse_commitment(ctx: Context):
    order = _order(ctx)
    if not ctx.data.get("doc_no"):
        return None
    return ErpReverseOrderV1(order_id=order["order_id"], store_id=order["pickup_store"], business_day=_now().date())


def reversed_(ctx: Context, reply: ErpOrderReversedV1) -> None:
    ctx.data["reversal_doc_no"] = reply.doc_no


def handover(ctx: Context):
    order = _order(ctx)
    if not _going_on(ctx):
        return None
    now = _now()
    collect_by = now + timedelta(seconds=ctx.data["collect_seconds"])
    ctx.data["collect_by"] = collect_by.isoformat()
    return FulfilmentTaskCreatedV1(order_id=order["order_id"], store_id=order["pickup_store"],
                                   customer_id=order["customer_id"], collect_by=collect_by, created_at=now,
                                   lines=[{"line_no": x["line_no"], "sku": x["sku"], "quantity": x["quantity"]}
                                          for x in order["lines"]])


def handed_over(ctx: Context, reply) -> None:
    if isinstance(reply, FulfilmentTaskWithdrawnV1):
        why = {"customer_cancelled": "the customer cancelled", "not_collected": "not collected in time"}
        _cancel(ctx, reply.reason, f"the store withdrew the task: {why[reply.reason]}")
    else:
        ctx.data["collected_at"] = reply.collected_at.isoformat()


# ---------------------------------------------------------------------- collected
def _collected(ctx: Context) -> bool:
    return bool(ctx.data.get("collected_at"))


def _collection_day(ctx: Context) -> date:
    return datetime.fromisoformat(ctx.data["collected_at"]).astimezone(timezone.utc).date()


def capture_points(ctx: Context):
    order = _order(ctx)
    if not _collected(ctx) or not ctx.data.get("hold_id"):
        return None
    return LoyaltyCapturePointsV1(order_id=order["order_id"], store_id=order["pickup_store"],
                                  hold_id=ctx.data["hold_id"])


def points_captured(ctx: Context, reply: LoyaltyRedemptionCapturedV1) -> None:
    ctx.data["points_redeemed"] = reply.points


def recognise_revenue(ctx: Context):
    order = _order(ctx)
    if not _collected(ctx):
        return None
    return ErpFulfilOrderV1(order_id=order["order_id"], store_id=order["pickup_store"],
                            business_day=_collection_day(ctx))


def revenue_recognised(ctx: Context, reply: ErpOrderFulfilledV1) -> None:
    ctx.data["revenue_doc_no"] = reply.revenue_doc_no


def accrue_points(ctx: Context):
    order = _order(ctx)
    if not _collected(ctx) or not order["loyalty_card"]:
        return None
    return LoyaltyAccrueOrderV1(order_id=order["order_id"], store_id=order["pickup_store"],
                                card=order["loyalty_card"], business_day=_collection_day(ctx),
                                currency=order["currency"],
                                lines=[{"sku": x["sku"], "quantity": x["quantity"],
                                        "line_total_minor": x["line_total_minor"]} for x in order["lines"]])


def points_accrued(ctx: Context, reply: LoyaltyOrderAccruedV1) -> None:
    ctx.data["points_earned"] = reply.points


# ---------------------------------------------------------------------- cancelled: give it all back
def _cancelled(ctx: Context) -> bool:
    return bool(ctx.data.get("cancel"))


def _when_cancelled(build):
    def command(ctx: Context):
        return build(ctx) if _cancelled(ctx) else None
    command.__name__ = build.__name__
    return command


# ---------------------------------------------------------------------- closing
def close(ctx: Context):
    order, cancel = _order(ctx), ctx.data.get("cancel")
    fields = dict(order_id=order["order_id"], store_id=order["pickup_store"])
    if cancel:
        return OrderCloseV1(**fields, outcome="cancelled", at=datetime.fromisoformat(cancel["at"]),
                            reason=cancel["reason"], detail=cancel["detail"])
    return OrderCloseV1(**fields, outcome="collected", at=datetime.fromisoformat(ctx.data["collected_at"]),
                        detail="collected at the store", revenue_doc_no=ctx.data["revenue_doc_no"],
                        points_redeemed=ctx.data.get("points_redeemed", 0),
                        points_earned=ctx.data.get("points_earned", 0))


def closed(ctx: Context, reply) -> None:
    ctx.data["outcome"] = "cancelled" if isinstance(reply, OrderCancelledV1) else "collected"


def record_crm(ctx: Context):
    order, cancel = _order(ctx), ctx.data.get("cancel")
    at = cancel["at"] if cancel else ctx.data["collected_at"]
    return CrmRecordOrderV1(order_id=order["order_id"], store_id=order["pickup_store"],
                            customer_id=order["customer_id"], outcome="cancelled" if cancel else "collected",
                            amount_minor=order["total_minor"], currency=order["currency"],
                            at=datetime.fromisoformat(at))


def _route_to_store(command) -> str:
    """A store's agent binds its own commands only: `<type>.<store>`."""
    return f"{command.TYPE}.{command.store_id}"


FOREVER = 8 * 86400.0  # the handover waits for the store; the store decides at collect_by (<= 5 days)
CLICK_COLLECT = ProcessDefinition(
    name=NAME,
    start=OrderPlacedV1,
    correlate=lambda order: order.order_id,
    begin=begin,
    case_type="order_failed",
    steps=(
        Step("hold_points", "loyalty", hold_points, LoyaltyRedemptionAuthorizedV1, on_reply=points_held,
             compensation=release_points, compensation_reply=LoyaltyRedemptionReleasedV1, timeout=600, resends=1),
        Step("reserve_stock", "erp", reserve_stock, InventoryReservedV1, on_reply=stock_reserved,
             compensation=release_stock, compensation_reply=InventoryReleasedV1, timeout=30, resends=4),
        Step("commit_order", "erp", commit_order, ErpOrderCommittedV1, on_reply=committed,
             compensation=reverse_commitment, compensation_reply=ErpOrderReversedV1, timeout=30, resends=4),
        Step("handover", "store_agent", handover, FulfilmentCollectedV1, on_reply=handed_over, route=_route_to_store,
             timeout=FOREVER, resends=0, case_type="order_not_handed_over"),
        Step("capture_points", "loyalty", capture_points, LoyaltyRedemptionCapturedV1, on_reply=points_captured,
             timeout=60, resends=4, on_failure="case", case_type="order_collected_not_settled"),
        Step("recognise_revenue", "erp", recognise_revenue, ErpOrderFulfilledV1, on_reply=revenue_recognised,
             timeout=30, resends=4, on_failure="case", case_type="order_collected_not_settled"),
        Step("accrue_points", "loyalty", accrue_points, LoyaltyOrderAccruedV1, on_reply=points_accrued,
             timeout=60, resends=4, on_failure="case", case_type="order_collected_not_settled"),
        Step("release_stock", "erp", _when_cancelled(release_stock), InventoryReleasedV1, on_reply=stock_released,
             timeout=30, resends=4, on_failure="case", case_type="order_cancelled_not_released"),
        Step("reverse_commitment", "erp", _when_cancelled(reverse_commitment), ErpOrderReversedV1, on_reply=reversed_,
             timeout=30, resends=4, on_failure="case", case_type="order_cancelled_not_released"),
        Step("release_points", "loyalty", _when_cancelled(release_points), LoyaltyRedemptionReleasedV1,
             on_reply=points_released, timeout=60, resends=4, on_failure="case",
             case_type="order_cancelled_not_released"),
        Step("close", "orders_api", close, OrderCollectedV1, on_reply=closed, timeout=30, resends=4,
             on_failure="case", case_type="order_not_closed"),
        Step("record_crm", "crm", record_crm, CrmOrderRecordedV1, timeout=60, resends=10, on_failure="case",
             case_type="order_not_in_crm"),
    ))
