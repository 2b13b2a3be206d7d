"""The loyalty holds a store agent issued, in its own table (`loyalty_holds`, in the outbox database).

A sale's LOYALTY tender must name a hold this agent issued for that card and that
transaction, still live and worth the tender's amount. The check reads this table, so it
works with the WAN down too. The table lives in the outbox database because a sale
spends its holds in the very transaction that commits it to the outbox
(`Outbox.accept(event, also=...)`): a hold is marked used if and only if its sale was
accepted, so a crash in between can neither capture an offline redemption whose sale was
never recorded nor forget one whose sale was.

Offline authorisations (loyalty unreachable) are bounded per card and business day by
the floor of config/loyalty.yaml, counted and recorded in one transaction, so two tills
cannot both take the last of it. What the loyalty service must still hear about (an
offline hold a sale spent: `capture_offline`; an online hold the till voided: `release`)
is the row's `todo`, kept until done, so an agent restart forgets none of it.
"""
from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass, replace
from collections.abc import Callable
from datetime import UTC, datetime

from ulid import ULID

from contracts.errors import RetailbusError
from contracts.pos import PosSaleV1
from contracts.redemption import offline_allowed
from routing.outbox import Outbox

SCHEMA = """
CREATE TABLE IF NOT EXISTS loyalty_holds (
    hold_id       TEXT PRIMARY KEY,
    card          TEXT NOT NULL,
    points        INTEGER NOT NULL,
    pos_txn_id    TEXT NOT NULL,
    terminal      TEXT,
    business_day  TEXT NOT NULL,
    offline       INTEGER NOT NULL,
    balance       INTEGER,
    authorised_at REAL NOT NULL,
    expires_at    REAL NOT NULL,
    status        TEXT NOT NULL,
    todo          TEXT,
    attempts      INTEGER NOT NULL DEFAULT 0,
    next_try      REAL,
    outcome       TEXT
);
CREATE INDEX IF NOT EXISTS loyalty_holds_txn ON loyalty_holds (pos_txn_id);
CREATE INDEX IF NOT EXISTS loyalty_holds_floor ON loyalty_holds (card, business_day) WHERE offline = 1;
CREATE INDEX IF NOT EXISTS loyalty_holds_todo ON loyalty_holds (next_try) WHERE todo IS NOT NULL;
"""
COLUMNS = ("hold_id, card, points, pos_txn_id, terminal, business_day, offline, balance, authorised_at, "
           "expires_at, status, todo, attempts")
HELD, USED, VOIDED = "held", "used", "voided"  # status
CAPTURE_OFFLINE, RELEASE = "capture_offline", "release"  # todo: what the loyalty service must still hear
OFFLINE_PREFIX = "OFF-"  # an offline hold's id: never a platform's


class HoldRefusedError(RetailbusError):
    """Raised when a hold cannot be issued, voided or spent as asked (`status`: the answer, `field`: the POS's)."""

    def __init__(self, status: int, field: str, reason: str):
        super().__init__(f"{field}: {reason}")
        self.status, self.field = status, field


@dataclass(frozen=True)
class Hold:
    hold_id: str
    card: str
    points: int
    pos_txn_id: str
    terminal: str | None
    business_day: str
    offline: bool
    balance: int | None
    authorised_at: float
    expires_at: float
    status: str
    todo: str | None = None
    attempts: int = 0

    def live(self, now: float) -> bool:
        """Still able to pay: issued, not voided, not spent, not expired."""
        return self.status == HELD and self.expires_at > now

    @property
    def expires_iso(self) -> str:
        return iso(self.expires_at)


def iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds")


def epoch(value: str) -> float:
    """An ISO 8601 instant (the loyalty service's `expires_at`) as unix seconds; naive is UTC."""
    at = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return (at if at.tzinfo else at.replace(tzinfo=UTC)).timestamp()


def _hold(row) -> Hold:
    return Hold(row[0], row[1], row[2], row[3], row[4], row[5], bool(row[6]), row[7], row[8], row[9], row[10],
                row[11], row[12])


# Where a refusal points, in the POS's own field names: (tender index from 0, contract field) -> path.
def legacy_path(index: int, field: str) -> str:
    names = {"hold_id": "HOLD_ID", "amount_minor": "AMOUNT"}
    return "LOYALTY_CARD" if field == "loyalty_card" else f"TENDERS[{index + 1}].{names[field]}"


def event_path(index: int, field: str) -> str:
    return "data.loyalty_card" if field == "loyalty_card" else f"data.tenders.{index}.{field}"


def tender_problem(hold: Hold | None, hold_id: str, sale: PosSaleV1, amount_minor: int, point_value_minor: int,
                   now: float) -> tuple[str, str] | None:
    """(contract field, reason) when this loyalty tender cannot spend `hold`; None when it can.
    A hold this very sale already spent passes: that is the sale retried."""
    if hold is None:
        return "hold_id", f"{hold_id} was not issued by this store's agent (POST /v1/loyalty/authorize)"
    if hold.pos_txn_id != sale.pos_txn_id:
        return "hold_id", f"{hold_id} was authorised for transaction {hold.pos_txn_id}, not {sale.pos_txn_id}"
    if hold.card != sale.loyalty_card:
        return "loyalty_card", f"hold {hold_id} is for card {hold.card}, the sale names {sale.loyalty_card or 'none'}"
    if hold.status == VOIDED:
        return "hold_id", f"{hold_id} was voided; authorise again"
    if hold.status == HELD and hold.expires_at <= now:
        return "hold_id", f"{hold_id} expired at {hold.expires_iso}; authorise again"
    worth = hold.points * point_value_minor
    if amount_minor > worth:
        return "amount_minor", (f"{amount_minor} is more than hold {hold_id} covers: {hold.points} points "
                                f"worth {worth}")
    if amount_minor < worth:
        return "amount_minor", (f"{amount_minor} is less than hold {hold_id}'s {hold.points} points (worth "
                                f"{worth}), which are redeemed whole: void it and authorise what the tender pays")
    return None


class HoldBook:
    """The `loyalty_holds` table: writes ride the outbox's group commit, reads use a connection of their own."""

    def __init__(self, outbox: Outbox):
        self.outbox = outbox
        self._db = sqlite3.connect(str(outbox.path), isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.executescript(SCHEMA)

    def close(self):
        self._db.close()

    # -- reads ---------------------------------------------------------------
    def get(self, hold_id: str) -> Hold | None:
        row = self._db.execute(f"SELECT {COLUMNS} FROM loyalty_holds WHERE hold_id = ?", (hold_id,)).fetchone()
        return _hold(row) if row else None

    def of_txn(self, pos_txn_id: str) -> list[Hold]:
        rows = self._db.execute(f"SELECT {COLUMNS} FROM loyalty_holds WHERE pos_txn_id = ? ORDER BY authorised_at",
                                (pos_txn_id,)).fetchall()
        return [_hold(row) for row in rows]

    def due(self, now: float, limit: int = 50) -> list[Hold]:
        """Rows whose todo may be tried now, the oldest authorisation first."""
        rows = self._db.execute(f"SELECT {COLUMNS} FROM loyalty_holds WHERE todo IS NOT NULL AND next_try <= ? "
                                "ORDER BY authorised_at LIMIT ?", (now, limit)).fetchall()
        return [_hold(row) for row in rows]

    def next_try(self) -> float | None:
        return self._db.execute("SELECT min(next_try) FROM loyalty_holds WHERE todo IS NOT NULL").fetchone()[0]

    def pending_offline(self) -> int:
        """Offline redemptions spent by accepted sales that the loyalty service has not booked yet."""
        return self._db.execute("SELECT count(*) FROM loyalty_holds WHERE todo = ?", (CAPTURE_OFFLINE,)).fetchone()[0]

    # -- writes (each one transaction of the outbox's committer) -------------
    def record_online(self, answer: dict, pos_txn_id: str, terminal: str | None, business_day: str,
                      now: float) -> Hold:
        """The hold the loyalty service issued. The same hold again (the service answers a repeated
        request with its first hold) is that hold, unless this agent voided it meanwhile."""
        hold = Hold(answer["hold_id"], answer["card"], answer["points"], pos_txn_id, terminal, business_day, False,
                    answer.get("balance"), now, epoch(answer["expires_at"]), HELD)

        def apply(db):
            known = db.execute(f"SELECT {COLUMNS} FROM loyalty_holds WHERE hold_id = ?", (hold.hold_id,)).fetchone()
            if known is None:
                _insert(db, hold)
                return hold
            known = _hold(known)
            if known.status != HELD or (known.pos_txn_id, known.card, known.points) != (
                    pos_txn_id, hold.card, hold.points):
                raise HoldRefusedError(409, "TXN_ID", f"loyalty answered with hold {known.hold_id} again, which is "
                                                      f"{known.status} here; this transaction needs a new TXN_ID")
            return known
        return self.outbox.write(apply)

    def authorise_offline(self, card: str, points: int, pos_txn_id: str, terminal: str | None, business_day: str,
                          floor: int, ttl: float, now: float) -> tuple[Hold, int]:
        """An offline hold within the card's floor for the day; (the hold, offline points the card
        has used today with it). Raises HoldRefusedError (503) past the floor."""
        hold = Hold(f"{OFFLINE_PREFIX}{ULID()}", card, points, pos_txn_id, terminal, business_day, True, None, now,
                    now + ttl, HELD)

        def apply(db):
            used = offline_points(db, card, business_day, now)
            if not offline_allowed(floor, used, points):
                raise HoldRefusedError(503, "POINTS", (
                    f"loyalty offline: floor limit {floor} points per card per day reached for card {card} "
                    f"({used} authorised offline today, {points} asked)"))
            _insert(db, hold)
            return hold, used + points
        return self.outbox.write(apply)

    def void(self, hold_id: str, now: float) -> Hold:
        """Void a hold the till no longer uses. An online one is to be released at loyalty (todo);
        an offline one never left the store. Voiding twice is voiding once."""
        def apply(db):
            row = db.execute(f"SELECT {COLUMNS} FROM loyalty_holds WHERE hold_id = ?", (hold_id,)).fetchone()
            if row is None:
                raise HoldRefusedError(404, "HOLD_ID", f"{hold_id} was not issued by this store's agent")
            hold = _hold(row)
            if hold.status == USED:
                raise HoldRefusedError(409, "HOLD_ID", f"{hold_id} paid transaction {hold.pos_txn_id}, which was "
                                                       "accepted: a return gives its points back")
            if hold.status == HELD:
                todo = None if hold.offline else RELEASE
                db.execute("UPDATE loyalty_holds SET status = ?, todo = ?, next_try = ? WHERE hold_id = ?",
                           (VOIDED, todo, now, hold_id))
                hold = replace(hold, status=VOIDED, todo=todo)
            return hold
        return self.outbox.write(apply)

    def spender(self, sale: PosSaleV1, point_value_minor: int, path: Callable[[int, str], str]):
        """What `Outbox.accept(event, also=...)` runs for a sale with LOYALTY tenders: every such
        tender must name a hold it may spend (else HoldRefusedError, 422, naming the tender's
        field), and the sale's commit marks them used (an offline one: to be captured)."""
        def spend(db):
            now, seen = time.time(), {}
            for index, tender in enumerate(sale.tenders):
                if tender.kind != "loyalty":
                    continue
                if tender.hold_id is None:
                    raise HoldRefusedError(422, path(index, "hold_id"), (
                        "a LOYALTY tender needs the hold its points were authorised under "
                        "(POST /v1/loyalty/authorize)"))
                if tender.hold_id in seen:
                    raise HoldRefusedError(422, path(index, "hold_id"),
                                           f"{tender.hold_id} already pays tender {seen[tender.hold_id] + 1}")
                seen[tender.hold_id] = index
                row = db.execute(f"SELECT {COLUMNS} FROM loyalty_holds WHERE hold_id = ?", (tender.hold_id,)).fetchone()
                hold = _hold(row) if row else None
                problem = tender_problem(hold, tender.hold_id, sale, tender.amount_minor, point_value_minor, now)
                if problem:
                    raise HoldRefusedError(422, path(index, problem[0]), problem[1])
                if hold.status == HELD:
                    db.execute("UPDATE loyalty_holds SET status = ?, todo = ?, next_try = ? WHERE hold_id = ?",
                               (USED, CAPTURE_OFFLINE if hold.offline else None, now, hold.hold_id))
        return spend

    def settled(self, hold_id: str, outcome: str) -> None:
        self.outbox.write(lambda db: db.execute(
            "UPDATE loyalty_holds SET todo = NULL, next_try = NULL, outcome = ? WHERE hold_id = ?", (outcome, hold_id)))

    def retry_later(self, hold_id: str, error: str, at: float) -> None:
        self.outbox.write(lambda db: db.execute(
            "UPDATE loyalty_holds SET attempts = attempts + 1, next_try = ?, outcome = ? WHERE hold_id = ?",
            (at, error[:500], hold_id)))

    def prune(self, cutoff: float, limit: int = 500) -> int:
        """Forget up to `limit` holds authorised before `cutoff` with nothing left to tell loyalty."""
        return self.outbox.write(lambda db: db.execute(
            "DELETE FROM loyalty_holds WHERE hold_id IN (SELECT hold_id FROM loyalty_holds "
            "WHERE todo IS NULL AND authorised_at < ? LIMIT ?)", (cutoff, limit)).rowcount)


def offline_points(db, card: str, business_day: str, now: float) -> int:
    """Points authorised offline for the card on the day that still count against the floor:
    not voided, and not a hold that expired unspent (it redeemed nothing)."""
    return db.execute(
        "SELECT coalesce(sum(points), 0) FROM loyalty_holds WHERE offline = 1 AND card = ? AND business_day = ? "
        "AND status != ? AND NOT (status = ? AND expires_at <= ?)",
        (card, business_day, VOIDED, HELD, now)).fetchone()[0]


def _insert(db, hold: Hold) -> None:
    db.execute(f"INSERT INTO loyalty_holds ({COLUMNS}) VALUES ({', '.join('?' * 13)})",
               (hold.hold_id, hold.card, hold.points, hold.pos_txn_id, hold.terminal, hold.business_day,
                int(hold.offline), hold.balance, hold.authorised_at, hold.expires_at, hold.status, hold.todo,
                hold.attempts))
