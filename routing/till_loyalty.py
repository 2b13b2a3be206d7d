"""Redemption at the till: the store agent's `POST /v1/loyalty/authorize` and `/v1/loyalty/void`.

A till asks the agent to authorise points before it commits a sale; the agent asks the
loyalty service (routing/loyalty_rpc.py), which holds them at the platform, and keeps
the hold in its own table (routing/redemption.py) against which the sale's LOYALTY
tender is checked. When loyalty cannot answer, the agent authorises offline, up to
`redemption.offline_floor_points` of config/loyalty.yaml per card and business day, so
the store keeps taking points through an outage with a bounded risk. A background loop
then tells the loyalty service what it must still hear (offline holds spent by accepted
sales: `capture_offline`; online holds a till voided: `release`), retrying with backoff
until it has: the rows wait in SQLite, so a restart forgets none.
"""
from __future__ import annotations

import json
import logging
import random
import time
from datetime import date
from pathlib import Path
from typing import Annotated

from eventlet.queue import Empty, LightQueue
from nameko.extensions import Extension
from prometheus_client import Counter, Gauge, Histogram
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StringConstraints, ValidationError

from bus import journal
from bus import yaml_config
from bus.settings import ConfigError, RetailbusSettings
from contracts.errors import error_paths
from contracts.pos import HoldId, PosSaleV1, PosTxnId, StoreId, TerminalId
from contracts.redemption import Redemption
from routing.loyalty_rpc import LoyaltyFailedError, LoyaltyRefusedError, LoyaltyRpc, LoyaltyUnreachableError
from routing.outbox import Outbox, OutboxUnavailable
from routing.redemption import CAPTURE_OFFLINE, USED, Hold, HoldBook, HoldRefusedError, event_path, legacy_path

log = logging.getLogger(__name__)

AUTHORISATIONS = Counter("retailbus_loyalty_authorisations_total",
                         "Redemptions tills asked the store agent to authorise, by outcome "
                         "(online, offline, refused, error)", ["store", "outcome"])
AUTHORISATION_SECONDS = Histogram(
    "retailbus_agent_loyalty_authorisation_seconds", "Time for the store agent to answer a till's authorisation",
    ["store", "outcome"], buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
OFFLINE_PENDING = Gauge("retailbus_loyalty_offline_pending",
                        "Offline redemptions spent by accepted sales that loyalty has not booked yet", ["store"])
SETTLED = Counter("retailbus_loyalty_agent_settled_total", "What the agent told loyalty after the fact, by what "
                  "(capture_offline, release) and its answer", ["store", "todo", "outcome"])

BACKOFF_BASE, BACKOFF_CAP = 0.5, 15.0  # seconds between tries while loyalty cannot answer
IDLE = 5.0  # seconds the loop sleeps with nothing due (a sale spending an offline hold wakes it)
PRUNE_EVERY = 600.0

Card = Annotated[str, StringConstraints(min_length=1, max_length=20, pattern=r"\S")]  # LOYALTY_CARD's width


class _TillCall(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    store: StoreId | None = Field(None, alias="STORE")
    terminal: TerminalId | None = Field(None, alias="TERMINAL")


class AuthorizeCall(_TillCall):
    card: Card = Field(alias="CARD")
    points: StrictInt = Field(alias="POINTS", gt=0, le=2**31 - 1)
    txn_id: PosTxnId = Field(alias="TXN_ID")


class VoidCall(_TillCall):
    hold_id: HoldId = Field(alias="HOLD_ID")


def _refusal(status: int, message: str, **extra) -> tuple[int, dict]:
    return status, {"STATUS": "ERROR", "MESSAGE": message, **extra}


def _granted(hold: Hold, **extra) -> tuple[int, dict]:
    return 200, {"STATUS": "OK", "HOLD_ID": hold.hold_id, "CARD": hold.card, "POINTS": hold.points,
                 "BALANCE": hold.balance, "EXPIRES_AT": hold.expires_iso, "OFFLINE": hold.offline, **extra}


def backoff(failures: int) -> float:
    return random.uniform(0, min(BACKOFF_CAP, BACKOFF_BASE * 2 ** failures))


class RedemptionRules:
    """`redemption:` of config/loyalty.yaml (RETAILBUS.loyalty_rules), read again when the file changes.
    A missing file means the defaults; an invalid one stops the agent at start, and later keeps
    the rules it runs (logged), as the loyalty service does with the same file."""

    def __init__(self, path: Path):
        self.path = path
        self._stamp = self._mtime()
        self._rules = self._load()

    def _mtime(self) -> float | None:
        try:
            return self.path.stat().st_mtime
        except OSError:
            return None

    def _load(self) -> Redemption:
        if self._stamp is None:
            log.warning("%s not found: redemption rules are the defaults", self.path)
            return Redemption()
        return yaml_config.load_model(self.path, Redemption, ConfigError, section="redemption")

    def current(self) -> Redemption:
        stamp = self._mtime()
        if stamp != self._stamp:
            self._stamp = stamp
            try:
                self._rules = self._load()
            except ConfigError as exc:
                log.error("redemption rules not reloaded, the running ones stay: %s", exc)
        return self._rules


def _parse(model, body: bytes):
    """(the call, None) or (None, the 400 naming the field)."""
    try:
        data = json.loads(body or b"null")
    except (ValueError, RecursionError) as exc:  # JSON, UTF-8, nesting
        return None, _refusal(400, f"body: invalid JSON ({exc})")
    if not isinstance(data, dict):
        return None, _refusal(400, "body: expected a JSON object")
    try:
        return model.model_validate(data), None
    except ValidationError as exc:
        return None, _refusal(400, "; ".join(f"{p}: {m}" for p, m in error_paths(exc)))


class TillRedemption(Extension):
    """Attached by the store's outbox provider (routing/store_agent.py) to its outbox."""

    def __init__(self):
        self.book: HoldBook | None = None
        self._wake = LightQueue()
        self._running = False
        self.today = date.today  # the business day an offline authorisation counts against

    def attach(self, outbox: Outbox, store_id: str, uri: str, settings: RetailbusSettings):
        self.store_id = store_id
        self.book = HoldBook(outbox)
        self.rules = RedemptionRules(settings.path(settings.loyalty_rules))
        self.rpc = LoyaltyRpc(uri, settings.agent.loyalty_rpc_timeout, self.container.config.get("AMQP_SSL"))
        self.retention_seconds = settings.agent.retention_days * 86400

    def start(self):
        self._running = True
        self.container.spawn_managed_thread(self._settle_loop, identifier="loyalty_settle")

    def stop(self):
        self._running = False
        self.wake()
        if self.book is not None:
            self.rpc.close()
            self.book.close()

    kill = stop

    def wake(self):
        if not self._wake.qsize():
            self._wake.put_nowait(True)

    # -- the till's calls: (HTTP status, answer) ------------------------------
    def authorize(self, body: bytes, terminal: str | None) -> tuple[int, dict]:
        started = time.monotonic()
        call, refused = _parse(AuthorizeCall, body)
        outcome = "refused"
        if call is not None:
            refused = self._same_store(call, terminal)
        if refused is None:
            outcome, (status, answer) = self._authorize(call, terminal or call.terminal)
        else:
            status, answer = refused
        AUTHORISATIONS.labels(self.store_id, outcome).inc()
        AUTHORISATION_SECONDS.labels(self.store_id, outcome).observe(time.monotonic() - started)
        if call is not None:
            journal.record("loyalty_authorised", outcome, id=answer.get("HOLD_ID"), subject=call.txn_id,
                           detail={"store": self.store_id, "terminal": terminal or call.terminal,
                                   "points": call.points, "status": status})
        return status, answer

    def void(self, body: bytes, terminal: str | None) -> tuple[int, dict]:
        call, refused = _parse(VoidCall, body)
        if call is not None:
            refused = self._same_store(call, terminal)
        if refused:
            return refused
        try:
            hold = self.book.void(call.hold_id, time.time())
        except HoldRefusedError as exc:
            return _refusal(exc.status, str(exc))
        except OutboxUnavailable as exc:
            log.error("hold %s not voided: %s", call.hold_id, exc, extra={"id": call.hold_id, "correlationid": None})
            return _refusal(503, "store database unavailable; the hold was NOT voided, retry")
        journal.record("loyalty_voided", "offline" if hold.offline else "ok", id=hold.hold_id,
                       subject=hold.pos_txn_id, detail={"store": self.store_id, "points": hold.points})
        if hold.todo:
            self.wake()
        return 200, {"STATUS": "OK", "HOLD_ID": hold.hold_id, "VOIDED": True, "OFFLINE": hold.offline}

    def spending(self, sale: PosSaleV1, events: bool):
        """What the outbox runs with a sale that has LOYALTY tenders (routing/redemption.py)."""
        return self.book.spender(sale, self.rules.current().point_value_minor, event_path if events else legacy_path)

    def _same_store(self, call: _TillCall, terminal: str | None) -> tuple[int, dict] | None:
        if call.store is not None and call.store != self.store_id:
            return _refusal(400, f"STORE: this agent serves store {self.store_id}, not {call.store}")
        if terminal is not None and call.terminal is not None and call.terminal != terminal:
            return _refusal(403, f"TERMINAL: signed by terminal {terminal}, payload says {call.terminal}")
        return None

    def _authorize(self, call: AuthorizeCall, terminal: str | None) -> tuple[str, tuple[int, dict]]:
        now = time.time()
        for hold in self.book.of_txn(call.txn_id):
            if hold.status == USED:
                return "refused", _refusal(409, f"TXN_ID: {call.txn_id} was accepted already, paid with hold "
                                                f"{hold.hold_id}")
            if hold.todo:  # a voided hold loyalty has not released yet would be captured with the sale
                return "refused", _refusal(409, f"TXN_ID: hold {hold.hold_id} of {call.txn_id} is still being "
                                                "released at loyalty; authorise again in a moment")
            if hold.live(now):
                if (hold.card, hold.points) == (call.card, call.points):  # the till asking again
                    return ("offline" if hold.offline else "online"), _granted(hold)
                return "refused", _refusal(409, f"TXN_ID: hold {hold.hold_id} ({hold.points} points on card "
                                                f"{hold.card}) is live for {call.txn_id}: void it first")
        rules = self.rules.current()
        try:
            answer = self.rpc.call("authorize_redemption", call.card, call.points, self.store_id, call.txn_id)
        except LoyaltyRefusedError as exc:
            return "refused", self._refused(call, exc)
        except LoyaltyUnreachableError as exc:
            return self._offline(call, terminal, rules, exc, now)
        except LoyaltyFailedError as exc:
            log.error("authorisation failed: %s", exc, extra={"id": None, "correlationid": call.txn_id})
            return "error", _refusal(502, f"loyalty failed ({exc}); take another tender")
        try:
            hold = self.book.record_online(answer, call.txn_id, terminal, self.today().isoformat(), now)
        except HoldRefusedError as exc:
            return "refused", _refusal(exc.status, str(exc))
        except OutboxUnavailable as exc:  # the platform's hold expires by itself
            log.error("hold %s not recorded: %s", answer.get("hold_id"), exc,
                      extra={"id": answer.get("hold_id"), "correlationid": call.txn_id})
            return "error", _refusal(503, "store database unavailable; nothing was authorised, retry")
        return "online", _granted(hold)

    def _refused(self, call: AuthorizeCall, exc: LoyaltyRefusedError) -> tuple[int, dict]:
        if exc.kind == "UnknownMemberError":
            return _refusal(404, f"CARD: no loyalty member has card {call.card}")
        if exc.kind == "InsufficientPointsError":
            try:
                balance = self.rpc.call("balance", call.card)["balance"]
            except Exception:  # the refusal stands without the figure
                balance = None
            have = "" if balance is None else f", card {call.card} has {balance} to spend"
            return _refusal(422, f"POINTS: {call.points} asked{have} ({exc})", BALANCE=balance)
        return _refusal(422, f"CARD: {exc}")

    def _offline(self, call: AuthorizeCall, terminal, rules: Redemption, why: Exception,
                 now: float) -> tuple[str, tuple[int, dict]]:
        log.warning("loyalty unreachable, authorising offline: %s", why,
                    extra={"id": None, "correlationid": call.txn_id})
        if rules.offline_floor_points == 0:
            return "refused", _refusal(503, "loyalty offline and offline redemption is off "
                                            "(redemption.offline_floor_points: 0)", OFFLINE=True)
        try:
            hold, used = self.book.authorise_offline(call.card, call.points, call.txn_id, terminal,
                                                     self.today().isoformat(), rules.offline_floor_points,
                                                     rules.hold_ttl_seconds, now)
        except HoldRefusedError as exc:
            return "refused", _refusal(exc.status, str(exc), OFFLINE=True)
        except OutboxUnavailable as exc:
            log.error("offline hold not recorded: %s", exc, extra={"id": None, "correlationid": call.txn_id})
            return "error", _refusal(503, "store database unavailable; nothing was authorised, retry")
        return "offline", _granted(hold, FLOOR_LEFT=rules.offline_floor_points - used)

    # -- afterwards: what loyalty must still hear ----------------------------
    def _settle_loop(self):
        failures, pruned = 0, time.monotonic()
        while self._running:
            wait = IDLE
            try:
                unreachable = self._settle_due()
                failures = failures + 1 if unreachable else 0
                OFFLINE_PENDING.labels(self.store_id).set(self.book.pending_offline())
                if time.monotonic() - pruned > PRUNE_EVERY:
                    pruned = time.monotonic()
                    self.book.prune(time.time() - self.retention_seconds)
                due = self.book.next_try()
                if unreachable:
                    wait = backoff(failures)
                elif due is not None:
                    wait = min(IDLE, max(0.0, due - time.time()))
            except Exception:  # a locked or closed database: the next round tries again
                if not self._running:
                    return
                log.exception("loyalty settle round failed", extra={"id": None, "correlationid": None})
            try:
                self._wake.get(timeout=wait)
            except Empty:
                pass

    def _settle_due(self) -> bool:
        """Tell loyalty what is due; True when it could not be reached (the rest waits)."""
        for hold in self.book.due(time.time()):
            if not self._running:
                return False
            capture = hold.todo == CAPTURE_OFFLINE
            try:
                if capture:
                    answer = self.rpc.call("capture_offline", hold.card, hold.points, self.store_id,
                                           hold.pos_txn_id, hold.hold_id)
                else:
                    answer = self.rpc.call("release", hold.hold_id)
                outcome = str(answer.get("status") or ("captured" if capture else "released"))
            except (LoyaltyUnreachableError, LoyaltyFailedError) as exc:
                self.book.retry_later(hold.hold_id, str(exc), time.time() + backoff(hold.attempts + 1))
                log.warning("%s of hold %s waits: %s", hold.todo, hold.hold_id, exc,
                            extra={"id": hold.hold_id, "correlationid": hold.pos_txn_id})
                return True
            except LoyaltyRefusedError as exc:
                outcome = "refused"
                log.error("loyalty refused %s of hold %s (%s points, %s): %s", hold.todo, hold.hold_id, hold.points,
                          hold.pos_txn_id, exc, extra={"id": hold.hold_id, "correlationid": hold.pos_txn_id})
                answer = {"status": "refused", "error": f"{exc.kind}: {exc}"}
            self.book.settled(hold.hold_id, json.dumps(answer, default=str)[:500])
            SETTLED.labels(self.store_id, hold.todo, outcome).inc()
            journal.record("loyalty_captured" if capture else "loyalty_released", outcome, id=hold.hold_id,
                           subject=hold.pos_txn_id, detail={"store": self.store_id, "points": hold.points,
                                                            "offline": hold.offline})
        return False
