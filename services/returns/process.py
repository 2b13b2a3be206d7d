"""Return to refund: the process a bus-routed `pos.return.v1` starts (bus/process).

Steps, in order, each a command to the system that does it:
1. `post_return` (erp): revenue and stock back in the ERP. The pivot: the till refunded
   already, so it is never undone; a failure after it leaves it standing and opens a case.
   Its reply carries the original sale as the ERP holds it: the return policy is judged
   then (services/returns/policy.py), each breach opening its case while the process goes
   on (the return stands), and the threshold promotion the return takes back is decided.
2. `refund_points` (loyalty): the points redeemed on the sale given back in proportion to
   the amount returned. Undone by taking them back.
3. `reverse_points` (loyalty): the points the returned lines earned taken back, with the
   promotion's bonus. Undone by giving them back. The platform refusing (the member spent
   them: the balance would go negative) fails the step: the refund of step 2 is undone
   (the member's account is as before the return) and a `loyalty_reversal_refused` case
   opens; `retailbus cases retry` runs steps 2 and 3 again (e.g. once the member earned
   enough), with new keys.
4. `crm_history` (crm): the return in the customer's engagement history. The CRM away past
   the step's timeout and resends opens a `return_crm_not_recorded` case and leaves the
   other steps done (money is not undone for a CRM outage); the CRM's late answer, or a
   retry from the case, completes the process.
Steps 2-4 are skipped for a return with no loyalty card on it or on its sale.
"""
from __future__ import annotations

from contracts.erp import ErpReturnPostedV1
from contracts.pos import PosReturnV1
from contracts.returns import (CrmRecordReturnV1, CrmReturnRecordedV1, ErpPostReturnV1, LoyaltyReturnPointsBookedV1,
                               LoyaltyReturnPointsV1)
from bus.process import Context, ProcessDefinition, Step
from services.loyalty.rules import Earning
from services.returns import policy

NAME = "return_to_refund"


def begin(ctx: Context, ret: PosReturnV1) -> None:
    """The return, and the rules in force when it arrived (judged by those, and kept with it)."""
    ctx.data["return"] = ret.model_dump(mode="json")
    ctx.data["rules"] = ctx.extras["rules"]


def _return(ctx: Context) -> PosReturnV1:
    return PosReturnV1.model_validate(ctx.data["return"])


def _posted(ctx: Context) -> ErpReturnPostedV1:
    return ErpReturnPostedV1.model_validate(ctx.data["posted"])


def _card(ctx: Context) -> str | None:
    posted = _posted(ctx)
    return posted.loyalty_card or (posted.original.loyalty_card if posted.original else None)


def post_return(ctx: Context) -> ErpPostReturnV1:
    return ErpPostReturnV1(pos_return=_return(ctx))


def posted(ctx: Context, doc: ErpReturnPostedV1) -> None:
    """Judge the posted return by the policy (a case per breach) and decide the clawback."""
    ctx.data["posted"] = doc.model_dump(mode="json")
    ret, rules = _return(ctx), ctx.data["rules"]
    config = policy.ReturnPolicy.model_validate(rules["policy"])
    receiptless = policy.receiptless_in_period(ctx.conn, ret, config.receiptless.period_days) \
        if ret.original is None else None
    for finding in policy.judge(ret, doc, config, receiptless):
        ctx.open_case(finding.case_type, finding.summary, store_id=ret.store_id, transaction_id=ret.pos_txn_id)
    taken = policy.clawback(Earning.model_validate(rules["earning"]), doc)
    ctx.data["clawback"] = {"promotion": taken[0], "points": taken[1]} if taken else None


def _points(action: str):
    def command(ctx: Context) -> LoyaltyReturnPointsV1 | None:
        posted = _posted(ctx)
        if not posted.original_pos_txn_id or not _card(ctx):
            return None
        if action.startswith("undo") and not ctx.data.get(action.removeprefix("undo_")):
            return None  # the step booked nothing: nothing to undo
        claw = ctx.data.get("clawback") if action == "reverse" else None
        # the sale's card when the till gave none: loyalty then waits for the sale it has not seen yet
        posted = posted.model_copy(update={"loyalty_card": _card(ctx)})
        return LoyaltyReturnPointsV1(action=action, posted=posted, clawback_points=claw["points"] if claw else 0,
                                     clawback_promotion=claw["promotion"] if claw else None)
    return command


def _booked(ctx: Context, reply: LoyaltyReturnPointsBookedV1) -> None:
    ctx.data[reply.action] = reply.points
    if reply.action == "reverse":
        ctx.data["clawed_back"] = reply.clawback_points


def crm_history(ctx: Context) -> CrmRecordReturnV1 | None:
    posted, card = _posted(ctx), _card(ctx)
    if not card:
        return None
    return CrmRecordReturnV1(store_id=posted.store_id, pos_txn_id=posted.pos_txn_id, loyalty_card=card,
                             amount_minor=abs(posted.total_minor), posted_at=posted.posted_at,
                             original_pos_txn_id=posted.original_pos_txn_id)


def _recorded(ctx: Context, reply: CrmReturnRecordedV1) -> None:
    ctx.data["crm_customer"] = reply.customer_id


RETURN_TO_REFUND = ProcessDefinition(
    name=NAME,
    start=PosReturnV1,
    correlate=lambda ret: f"{ret.store_id}:{ret.pos_txn_id}",
    begin=begin,
    case_context=lambda ctx: {"store_id": ctx.data["return"]["store_id"],
                              "transaction_id": ctx.data["return"]["pos_txn_id"]},
    steps=(
        Step("post_return", target="erp", command=post_return, reply=ErpReturnPostedV1, on_reply=posted,
             timeout=60, resends=5, case_type="return_not_posted"),
        Step("refund_points", target="loyalty", command=_points("refund"), reply=LoyaltyReturnPointsBookedV1,
             on_reply=_booked, compensation=_points("undo_refund"), compensation_reply=LoyaltyReturnPointsBookedV1,
             timeout=60, resends=5, case_type="loyalty_reversal_refused"),
        Step("reverse_points", target="loyalty", command=_points("reverse"), reply=LoyaltyReturnPointsBookedV1,
             on_reply=_booked, compensation=_points("undo_reverse"), compensation_reply=LoyaltyReturnPointsBookedV1,
             timeout=60, resends=5, case_type="loyalty_reversal_refused"),
        Step("crm_history", target="crm", command=crm_history, reply=CrmReturnRecordedV1, on_reply=_recorded,
             timeout=120, resends=2, on_failure="case", case_type="return_crm_not_recorded"),
    ))
