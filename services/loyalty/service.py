"""The `loyalty` service: the loyalty platform's system API on the bus.

RPC for what a till waits on (balance, authorise a redemption, capture,
release); events for what follows a posting: the ERP posts a sale -> its holds
are captured and, by the accrual mode at its posting, its lines earn points
at the platform (api) or are compared with the points file's figure (shadow);
the return process (services/returns) commands a return's points: the redeemed
points refunded in proportion, what the returned lines earned taken back, or
either undone (`loyalty.return_points.v1`); each closed business day is
settled per store for the ERP's liability account. Every platform write carries an
idempotency key derived from the business transaction, and every handler
claims its message in the inbox, so a redelivered event books nothing twice.
An over-redemption opens a business exception case (`case.opened.v1`, worked
with `retailbus cases`): the opening is written to the transactional outbox with
the exception's row, so a crash loses neither. A refused reversal is answered to
the return process, which compensates and opens the case.

Platform calls come before the database is touched: the worker's transaction
(one SQLite connection) is then held for a few statements, not for an HTTP call.
"""
from __future__ import annotations

import logging
from datetime import datetime, timezone
from typing import NamedTuple

from eventlet.greenpool import GreenPool

from nameko.rpc import rpc
from nameko.timer import timer
from prometheus_client import Counter, Gauge, Histogram
from sqlalchemy import select

from bus.consumer import DUPLICATE, reliable_handler
from bus.extensions import EventPublisher
from bus.metrics_http import MetricsHttp
from bus.retention import retention_timer
from bus.publisher import UnroutableError
from contracts.cases import CaseOpenedV1
from contracts.envelope import CloudEvent
from contracts.erp import ErpSalePostedV1
from contracts.returns import LoyaltyReturnPointsBookedV1, LoyaltyReturnPointsV1
from bus.process import command_handler
from contracts.loyalty import (LoyaltyPointsAccruedV1, LoyaltyPointsReversedV1, LoyaltyRedemptionAuthorizedV1,
                               LoyaltyRedemptionCapturedV1, LoyaltyRedemptionReleasedV1, LoyaltySettlementV1)
from legacy_wrappers import inbox
from legacy_wrappers.legacy_db import LegacyDatabase
from services.erp.outbox import Outbox
from services.erp.outbox import insert as outbox_insert
from services.erp.outbox import metadata as outbox_tables
from services.erp.retention import LegacyRetention
from services.loyalty import accrual, returns, settlement, shadow
from services.loyalty import order_commands  # the module, not its mixin: `nameko run` takes every class with entrypoints
from services.loyalty import members  # the module, as order_commands
from services.loyalty.retention import CardlessRetention
from services.loyalty.config import LoyaltyRules, SettlementSchedule
from services.loyalty.platform import LoyaltyPlatform, LoyaltyRefusedError
from services.loyalty.rules import Earning
from services.loyalty.tables import EXCEPTIONS, HOLDS, metadata

log = logging.getLogger(__name__)
SOURCE = "retailbus/loyalty"
BATCH = 64  # posted sales per worker (bus/consumer.py `batch`): one transaction records them
PLATFORM_CALLS = 16  # a batch's sales calling the platform at once
CASE_TYPES = {"over_redemption": "loyalty_over_redemption"}  # a refused reversal: the return process's case

AUTHORISATION_SECONDS = Histogram("retailbus_loyalty_authorisation_seconds",
                                  "Time to authorise a redemption at the platform", ["outcome"])
ACCRUALS = Counter("retailbus_loyalty_accruals_total", "Posted sales whose points were settled, by mode and outcome",
                   ["mode", "outcome"])
ACCRUAL_LAG = Histogram("retailbus_loyalty_accrual_lag_seconds", "From the ERP's posting to the points booked",
                        buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300))
UNROUTED = Counter("retailbus_loyalty_events_unrouted_total", "Loyalty events published with no queue bound",
                   ["type"])
SETTLEMENTS = Counter("retailbus_loyalty_settlements_total", "Daily settlements per store, by outcome "
                      "(recorded; sent: confirmed to the erp's queue; unroutable: no queue bound, sent later)",
                      ["outcome"])
SETTLEMENTS_UNSENT = Gauge("retailbus_loyalty_settlements_unsent", "Settlements recorded and not yet confirmed "
                           "by the broker after the last pass")
EXCEPTIONS_TOTAL = Counter("retailbus_loyalty_exceptions_total", "Loyalty exceptions recorded for ops, by kind",
                           ["kind"])


def now() -> str:
    return datetime.now(timezone.utc).isoformat()


class Prepared(NamedTuple):
    """What a sale's platform calls did: the holds captured, the mode, the rules' points, what was booked."""
    captured: list[dict]
    mode: str
    earned: accrual.Earned | None
    booked: accrual.Earned | None
    earning: Earning


class LoyaltyService(order_commands.OrderCommands, members.MemberSync):
    name = "loyalty"

    db = LegacyDatabase(config_key="LOYALTY_DB_URI", create=(metadata, inbox.metadata, outbox_tables, returns.metadata))
    outbox = Outbox(config_key="LOYALTY_DB_URI")  # case.opened.v1, committed with the exception
    platform = LoyaltyPlatform()
    rules = LoyaltyRules()
    events = EventPublisher()
    metrics = MetricsHttp()
    retention = LegacyRetention(config_key="LOYALTY_DB_URI")
    cardless = CardlessRetention(config_key="LOYALTY_DB_URI")

    # ---------------------------------------------------------------- RPC (tills wait)
    @rpc
    def balance(self, card: str) -> dict:
        member = self.platform.member(card)
        return {k: member[k] for k in ("card", "customer_id", "tier", "status", "balance", "ledger_points",
                                       "held_points")}

    @rpc
    def authorize_redemption(self, card: str, points: int, store: str, pos_txn_id: str) -> dict:
        """A hold of `points` on `card` for the till transaction; raises InsufficientPointsError,
        UnknownMemberError, MemberInactiveError or LoyaltyUnavailableError (authorise offline)."""
        started, outcome = datetime.now(timezone.utc), "refused"
        # A till retrying after a lost answer gets the same hold; after a void (its holds
        # released) the transaction's next authorisation is a new one.
        attempt = accrual.settled_holds(self.db.engine, store, pos_txn_id)
        try:
            hold = self.platform.hold(card, points, f"{store}/{pos_txn_id}", store,
                                      self.rules.config.redemption.hold_ttl_seconds,
                                      key=f"hold:{store}:{pos_txn_id}:{attempt}:{card}:{points}")
            outcome = "ok"
        except LoyaltyRefusedError:
            raise
        except Exception:
            outcome = "unavailable"
            raise
        finally:
            AUTHORISATION_SECONDS.labels(outcome).observe((datetime.now(timezone.utc) - started).total_seconds())
        accrual.record_hold(self.db.conn, hold, store, pos_txn_id, offline=False)
        self._publish(LoyaltyRedemptionAuthorizedV1, f"authorized:{hold['hold_id']}", pos_txn_id,
                      hold_id=hold["hold_id"], card=card, store_id=store, pos_txn_id=pos_txn_id, points=points,
                      expires_at=hold["expires_at"])
        return {k: hold[k] for k in ("hold_id", "card", "points", "balance", "expires_at")}

    @rpc
    def capture(self, hold_id: str) -> dict:
        return self._settle_hold(hold_id, "captured", "capture")

    @rpc
    def release(self, hold_id: str) -> dict:
        return self._settle_hold(hold_id, "released", "voided")

    @rpc
    def capture_offline(self, card: str, points: int, store: str, pos_txn_id: str, hold_id: str) -> dict:
        """Book a redemption a store agent authorised while the platform was unreachable; one
        the balance cannot cover becomes an over-redemption exception, never a negative balance.

        An online hold the service made for the same transaction after the agent had given up
        waiting would pay the sale twice: a held one is released first; one the posting
        captured already paid, so the offline redemption is not booked again."""
        online = accrual.online_holds(self.db.engine, store, pos_txn_id)
        for hold in online:
            if hold["STATUS"] == "held":
                self.platform.release(hold["HOLD_ID"])
                accrual.mark_hold(self.db.conn, hold["HOLD_ID"], "released")
        if any(hold["STATUS"] == "captured" for hold in online):
            return {"hold_id": hold_id, "status": "paid_online"}
        try:
            self.platform.book(card, "REDEEM", points, f"{store}/{pos_txn_id}", store,
                               key=f"offline:{store}:{pos_txn_id}")
            status = "captured"
        except LoyaltyRefusedError as exc:
            status = "over_redeemed"
            self._exception("over_redemption", store, pos_txn_id, card,
                            f"offline redemption of {points} points not covered: {exc}")
        accrual.record_hold(self.db.conn, {"hold_id": hold_id, "card": card, "points": points,
                                           "expires_at": now()}, store, pos_txn_id, offline=True, status=status)
        if status == "captured":
            self._publish(LoyaltyRedemptionCapturedV1, f"captured:{hold_id}", pos_txn_id, hold_id=hold_id,
                          card=card, store_id=store, pos_txn_id=pos_txn_id, points=points, offline=True)
        # Committed before the answer (nameko answers an RPC before dependencies commit): an
        # agent told "over_redeemed" never asks again, so the exception and its case must be durable.
        self.db.end(success=True)
        return {"hold_id": hold_id, "status": status}

    # ---------------------------------------------------------------- events (postings)
    @reliable_handler("erp", "erp.sale_posted.v1", batch=BATCH)
    def on_sale_posted(self, items: list[tuple[ErpSalePostedV1, CloudEvent]]) -> list:
        """A batch of posted sales: their holds read at once, each sale's platform calls
        (capture, the member's tier, the EARN) side by side, then one transaction records
        them all with their inbox keys. One result per sale; a sale whose platform call
        failed gets its error (retried alone: every platform write is keyed)."""
        rules = self.rules.config
        holds = accrual.holds_of(self.db.engine, [(doc.store_id, doc.pos_txn_id) for doc, _ in items])
        pool = GreenPool(PLATFORM_CALLS)
        prepared = list(pool.imap(lambda item: self._platform_part(item[0], rules, holds), items))
        self._announce_accruals(items, prepared)
        claims = inbox.claim_many(self.db.conn, [("loyalty.on_sale_posted", event.idempotencykey, event.id)
                                                 for (_, event), done in zip(items, prepared)
                                                 if not isinstance(done, Exception)])
        fresh = iter(claims)
        return [done if isinstance(done, Exception) else self._record(doc, done) if next(fresh) else DUPLICATE
                for (doc, _), done in zip(items, prepared)]

    def _platform_part(self, doc: ErpSalePostedV1, rules, holds) -> "Prepared | Exception":
        """The sale's calls to the platform, before any database work; its error, not raised."""
        try:
            open_holds, redeemed_offline = holds[(doc.store_id, doc.pos_txn_id)]
            # a sale its store redeemed offline is paid by that redemption (capture_offline), not by a hold
            captured = [] if redeemed_offline else [self.platform.capture(h["HOLD_ID"]) for h in open_holds]
            mode = rules.accrual.mode_at(doc.posted_at)  # the files service decides by the same moment
            earned = accrual.earn(self.platform, rules.earning, doc) if doc.loyalty_card and mode != "file" else None
            booked = earned if mode == "api" and earned and earned.total else None
            if booked:
                self.platform.book(doc.loyalty_card, "EARN", booked.total, f"{doc.store_id}/{doc.pos_txn_id}",
                                   doc.store_id, key=f"earn:{doc.store_id}:{doc.pos_txn_id}")
                ACCRUAL_LAG.observe(max(0.0, (datetime.now(timezone.utc) - doc.posted_at).total_seconds()))
            return Prepared(captured, mode, earned, booked, rules.earning)
        except Exception as exc:  # noqa: BLE001  (the sale's own result: retried, or parked, alone)
            return exc

    def _announce_accruals(self, items, prepared: list) -> None:
        """loyalty.points_accrued.v1 for what the platform booked, in one confirmed round,
        before the worker takes the one database connection (a redelivery announces it again
        under the same key; consumers keep one). A sale whose event the broker refused is
        failed, so it is retried."""
        booked = [(n, doc) for n, ((doc, _), done) in enumerate(zip(items, prepared))
                  if not isinstance(done, Exception) and done.booked]
        events = [CloudEvent.new(LoyaltyPointsAccruedV1.TYPE, SOURCE, LoyaltyPointsAccruedV1(
            card=doc.loyalty_card, store_id=doc.store_id, pos_txn_id=doc.pos_txn_id, business_day=doc.business_day,
            points=prepared[n].booked.total, basis_minor=doc.total_minor, currency=doc.currency),
            subject=doc.pos_txn_id, idempotencykey=f"accrued:{doc.store_id}:{doc.pos_txn_id}") for n, doc in booked]
        for (n, _), error in zip(booked, self.events.publish_many(events) if events else []):
            if isinstance(error, UnroutableError):
                UNROUTED.labels(LoyaltyPointsAccruedV1.TYPE).inc()
            elif error is not None:
                prepared[n] = error

    def _record(self, doc: ErpSalePostedV1, done: "Prepared"):
        """The sale's rows in the worker's transaction; what the handler returns for it."""
        accrual.record_sale(self.db.conn, doc, done.booked)
        for hold in done.captured:
            accrual.mark_hold(self.db.conn, hold["hold_id"], "captured")
            self._publish(LoyaltyRedemptionCapturedV1, f"captured:{hold['hold_id']}", doc.pos_txn_id,
                          hold_id=hold["hold_id"], card=hold["card"], store_id=doc.store_id,
                          pos_txn_id=doc.pos_txn_id, points=hold["points"])
        ACCRUALS.labels(done.mode, "ok" if doc.loyalty_card else "no card").inc()
        if done.earned is None:
            return "no card" if not doc.loyalty_card else done.mode
        if done.mode == "shadow":
            differences = shadow.compare(done.earning, doc, done.earned.points)
            shadow.record(differences)
            if differences:
                self._exception("shadow_mismatch", doc.store_id, doc.pos_txn_id, doc.loyalty_card,
                                shadow.describe(differences, done.earned.tier))
        return sum(done.earned.points)

    @command_handler(LoyaltyReturnPointsV1.TYPE)
    def on_return_points(self, command: LoyaltyReturnPointsV1, event: CloudEvent) -> LoyaltyReturnPointsBookedV1:
        """A return's points, on the return process's command (services/returns): the redeemed
        points refunded, what the returned lines earned (and a promotion's bonus) reversed,
        or either undone, keyed at the platform by the command. A reversal the balance cannot
        cover is refused back to the process (which compensates and opens the case) and
        recorded as an exception for reconciliation."""
        doc = command.posted
        try:
            booked = returns.book(self.platform, self.db.engine, command, event.idempotencykey)
        except returns.Refused as exc:
            EXCEPTIONS_TOTAL.labels("reversal_refused").inc()
            accrual.upsert(self.db.conn, EXCEPTIONS, dict(KIND="reversal_refused", STORE_ID=doc.store_id,
                                                          POS_TXN_ID=doc.pos_txn_id, CARD=doc.loyalty_card or "",
                                                          DETAIL=exc.reason[:2000], CREATED_AT=now()))
            self.db.end(success=True)  # the refusal is answered once the worker ends: its record first
            raise
        returns.record(self.db.conn, command, booked)
        if command.action == "reverse" and booked.points:
            self._publish(LoyaltyPointsReversedV1, f"reversed:{doc.store_id}:{doc.pos_txn_id}", doc.pos_txn_id,
                          card=booked.card, store_id=doc.store_id, pos_txn_id=doc.pos_txn_id,
                          original_pos_txn_id=doc.original_pos_txn_id, business_day=doc.business_day,
                          points=booked.points, basis_minor=abs(doc.total_minor), currency=doc.currency)
        return booked

    # ---------------------------------------------------------------- housekeeping
    @timer(interval=30)
    def release_expired(self):
        """Holds past their expiry give their points back at the platform by themselves; this
        tells the bus (and the platform's own record) they are released."""
        for hold in accrual.expired_holds(self.db.engine, now()):
            self.platform.release(hold["HOLD_ID"])
            accrual.mark_hold(self.db.conn, hold["HOLD_ID"], "released")
            self._publish(LoyaltyRedemptionReleasedV1, f"released:{hold['HOLD_ID']}", hold["POS_TXN_ID"],
                          hold_id=hold["HOLD_ID"], card=hold["CARD"], store_id=hold["STORE_ID"],
                          pos_txn_id=hold["POS_TXN_ID"], points=hold["POINTS"], reason="expired")

    @retention_timer()
    def prune(self) -> dict[str, int]:
        """Inbox keys past the redelivery horizon, outbox rows long sent and the lines of sales
        without a card past `loyalty_cardless_days` (RETAILBUS.retention). The other LOY_ rows
        stay: a return, however late, takes back what its sale earned and refunds what it
        redeemed from them, and settlements and reconciliation sum them."""
        return {**self.retention.prune(), "loyalty_cardless": self.cardless.prune(self.rules.config)}

    @SettlementSchedule.decorator()
    def settle(self) -> int:
        """Record the settlements due (committed first), then send every one not sent yet
        (services/loyalty/settlement.py); returns how many were sent."""
        recorded = settlement.record_due(self.db.conn, datetime.now(timezone.utc), self.rules.config)
        SETTLEMENTS.labels("recorded").inc(recorded)
        rows = settlement.unsent(self.db.conn)
        self.db.end(success=True)
        sent = []
        for row in rows:
            event = CloudEvent.new(LoyaltySettlementV1.TYPE, SOURCE, settlement.message(row),
                                   subject=f"{row['STORE_ID']}/{row['BUSINESS_DAY']}", idempotencykey=settlement.key(row))
            try:
                self.events.publish(event)
            except UnroutableError:
                SETTLEMENTS.labels("unroutable").inc()
                log.warning("loyalty settlement %s not sent: no queue is bound (is the erp running?); "
                            "sent on a later pass", settlement.key(row))
                break
            sent.append(row)
        settlement.mark_sent(self.db.conn, sent, datetime.now(timezone.utc))
        SETTLEMENTS.labels("sent").inc(len(sent))
        SETTLEMENTS_UNSENT.set(len(rows) - len(sent))
        return len(sent)

    # ---------------------------------------------------------------- helpers
    def _settle_hold(self, hold_id: str, status: str, reason: str) -> dict:
        answer = (self.platform.capture if status == "captured" else self.platform.release)(hold_id)
        row = self.db.conn.execute(select(HOLDS).where(HOLDS.c.HOLD_ID == hold_id)).mappings().first()
        accrual.mark_hold(self.db.conn, hold_id, status)
        if row is not None:
            fields = dict(hold_id=hold_id, card=row["CARD"], store_id=row["STORE_ID"], pos_txn_id=row["POS_TXN_ID"],
                          points=row["POINTS"])
            if status == "captured":
                self._publish(LoyaltyRedemptionCapturedV1, f"captured:{hold_id}", row["POS_TXN_ID"], **fields)
            else:
                self._publish(LoyaltyRedemptionReleasedV1, f"released:{hold_id}", row["POS_TXN_ID"], reason=reason,
                              **fields)
        return {"hold_id": hold_id, "status": answer.get("status", status)}

    def _publish(self, model, key: str, subject: str, **fields) -> None:
        """Tell the bus. The platform and this service's tables are the record; an event no
        queue is bound for yet (no subscriber in this estate) is counted, not retried."""
        try:
            self.events.publish(CloudEvent.new(model.TYPE, SOURCE, model(**fields), subject=subject,
                                               idempotencykey=key))
        except UnroutableError:
            UNROUTED.labels(model.TYPE).inc()

    def _exception(self, kind: str, store: str, pos_txn_id: str, card: str, detail: str) -> None:
        """An exception ops must see (a metric, a row `retailbus reconcile` reports)."""
        EXCEPTIONS_TOTAL.labels(kind).inc()
        log.warning("loyalty exception %s for %s/%s: %s", kind, store, pos_txn_id, detail)
        accrual.upsert(self.db.conn, EXCEPTIONS, dict(KIND=kind, STORE_ID=store, POS_TXN_ID=pos_txn_id, CARD=card,
                                                      DETAIL=detail[:2000], CREATED_AT=now()))
        if kind in CASE_TYPES:
            self._open_case(CASE_TYPES[kind], store, pos_txn_id, card, detail)

    def _open_case(self, case_type: str, store: str, pos_txn_id: str, card: str, detail: str) -> None:
        """case.opened.v1 into the outbox, in the worker's transaction with the exception's row;
        the relay publishes it once that commits. The case id is the exception's key, so the
        exception recorded again (a redelivery, an agent asking again) is still one case."""
        case_id = f"{case_type}:{store}:{pos_txn_id}"
        case = CaseOpenedV1(case_id=case_id, case_type=case_type, store_id=store, transaction_id=pos_txn_id,
                            summary=f"card {card}: {detail}"[:2000], opened_at=datetime.now(timezone.utc))
        statement, rows = outbox_insert([CloudEvent.new(CaseOpenedV1.TYPE, SOURCE, case, subject=pos_txn_id,
                                                        idempotencykey=case_id)])
        statement(self.db.conn, rows)
        self.outbox.added()

