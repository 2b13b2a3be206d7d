"""The store's control totals: every sale and return it accepted, per business day.

Each accepted transaction is noted in `accepted_txn`, in the outbox database:
a bus-mode one inside the very transaction that commits its outbox row (one
more INSERT, no extra fsync, so the accept path stays as fast as it was), a
legacy- or shadow-mode one once the legacy ERP has answered it. The notes are
the durable truth; the `store.control_totals.v2` messages are digests kept up
to date from them (routing/day_totals.py), so nothing about them has to survive
a restart or a WAN outage: the agent counts again when it starts.

`ControlTotalsPublisher` folds in new notes every `interval` seconds and
publishes the days that changed since it last published them. A day's totals
leave only once every outbox row they cover has been confirmed by the broker,
so they travel behind the sales they count. Totals nobody is bound to receive
(no reconcile service yet) are simply sent again on the next round. The day's
list, which reconciliation asks for only when the digests differ, is read from
the notes on demand (`day_totals`, `GET /control/transactions`).
"""
from __future__ import annotations

import logging
import sqlite3
import time
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import unquote, urlparse

from eventlet import tpool
from eventlet.event import Event
from nameko.extensions import Extension

from contracts.control import ControlTxn, KindTotals, StoreControlTotalsV1, StoreControlTotalsV2
from contracts.envelope import CloudEvent
from routing.day_totals import RunningTotals
from bus import topology
from bus.constants import H_STORE
from bus.publisher import ConfirmingPublisher, OutgoingMessage, PublishError, UnroutableError
from bus.settings import PublisherSettings

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS accepted_txn (
    n            INTEGER PRIMARY KEY AUTOINCREMENT,
    kind         TEXT NOT NULL,
    pos_txn_id   TEXT NOT NULL,
    business_day TEXT NOT NULL,
    total_minor  INTEGER NOT NULL,
    currency     TEXT NOT NULL,
    loyalty_card INTEGER NOT NULL,
    via          TEXT NOT NULL,
    accepted_at  REAL NOT NULL,
    outbox_seq   INTEGER,
    UNIQUE (kind, pos_txn_id)
);
CREATE INDEX IF NOT EXISTS accepted_txn_day ON accepted_txn (business_day);
CREATE INDEX IF NOT EXISTS accepted_txn_at ON accepted_txn (accepted_at);
"""
KINDS = {"pos.sale.v1": "sale", "pos.return.v1": "return"}


def record(db: sqlite3.Connection, message_type: str, data: dict, via: str, outbox_seq: int | None) -> None:
    """Note an accepted sale or return (other types are not counted); a repeat is ignored."""
    kind = KINDS.get(message_type)
    if kind is None or not {"pos_txn_id", "business_day", "total_minor", "currency"} <= data.keys():
        return  # not a sale or return (registered types are validated before they get here)
    db.execute(
        "INSERT OR IGNORE INTO accepted_txn (kind, pos_txn_id, business_day, total_minor, currency, "
        "loyalty_card, via, accepted_at, outbox_seq) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (kind, data["pos_txn_id"], str(data["business_day"]), data["total_minor"], data["currency"],
         1 if data.get("loyalty_card") else 0, via, time.time(), outbox_seq))


def compact(db: sqlite3.Connection, cutoff: float, limit: int) -> int:
    """Delete up to `limit` of the notes taken before `cutoff`; returns how many."""
    return db.execute("DELETE FROM accepted_txn WHERE n IN (SELECT n FROM accepted_txn WHERE accepted_at < ? "
               "ORDER BY accepted_at LIMIT ?)", (cutoff, limit)).rowcount


def day_totals(db: sqlite3.Connection, store_id: str, day: str, as_of: int) -> StoreControlTotalsV1:
    """The day's transactions as of note `as_of`, listed (the v1 shape): on demand only."""
    kinds: dict[str, list[ControlTxn]] = {"sale": [], "return": []}
    last = 0
    for n, kind, txn_id, total, currency, card, via in db.execute(
            "SELECT n, kind, pos_txn_id, total_minor, currency, loyalty_card, via FROM accepted_txn "
            "WHERE business_day = ? AND n <= ? ORDER BY n", (day, as_of)):  # the day's index, then n
        last = n
        kinds[kind].append(ControlTxn(pos_txn_id=txn_id, total_minor=total, currency=currency,
                                      loyalty_card=bool(card), via=via))
    return StoreControlTotalsV1(
        store_id=store_id, business_day=day, as_of=last, taken_at=datetime.now(UTC),
        sales=KindTotals.of(kinds["sale"]), returns=KindTotals.of(kinds["return"]))


def unsent_up_to(db: sqlite3.Connection, seq: int) -> int:
    """Outbox rows up to `seq` not yet confirmed by the broker."""
    return db.execute("SELECT count(*) FROM outbox WHERE sent_at IS NULL AND seq <= ?", (seq,)).fetchone()[0]


class ControlTotalsPublisher(Extension):
    """Publishes the store's control totals on `store_agent.events`, behind the sales."""

    def __init__(self, source_service: str = "store_agent"):
        self.exchange = topology.events_exchange(source_service)
        self.published: dict[str, int] = {}  # business day -> as_of last confirmed
        self._stopped = Event()
        self._db: sqlite3.Connection | None = None
        self._counted = False
        self.publisher: ConfirmingPublisher | None = None

    def attach(self, outbox_path: Path, store_id: str, uri: str, pub: PublisherSettings,
               interval: float, days: float):
        """Called by the service's `setup`, after the outbox (and its tables) exist."""
        self.path, self.store_id, self.interval, self.days = outbox_path, store_id, interval, days
        self.running = RunningTotals(days * 86400)
        self.user_id = unquote(urlparse(uri).username or "") or None
        self.publisher = ConfirmingPublisher(
            uri, window=100, confirm_timeout=pub.confirm_timeout, connect_timeout=pub.connect_timeout,
            attempts=1, on_connect=lambda channel: topology.declare_exchange(channel, self.exchange))

    def start(self):
        if self.publisher is None:
            return
        self._db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA busy_timeout=5000")
        self.container.spawn_managed_thread(self._run, identifier="control_totals")

    def stop(self):
        if not self._stopped.ready():
            self._stopped.send(True)
        if self.publisher is not None:
            self.publisher.close()

    kill = stop

    def _run(self):
        while not self._stopped.ready():
            try:
                self.publish_changed()
            except Exception as exc:  # the next round takes them again
                log.warning("control totals not published (%s: %s)", type(exc).__name__, exc,
                            extra={"id": self.store_id, "correlationid": None})
            self._stopped.wait(timeout=self.interval)
        if self._db is not None:
            self._db.close()

    def _read(self, fn, *args):
        return tpool.execute(fn, self._db, *args)  # an OS thread: a long tail never stalls a till

    def day_list(self, day: str, as_of: int) -> StoreControlTotalsV1:
        """The day's transactions up to note `as_of` (what a reconciliation with a difference asks for)."""
        db = sqlite3.connect(str(self.path), check_same_thread=False)
        try:
            return tpool.execute(day_totals, db, self.store_id, day, as_of)
        finally:
            db.close()

    def fold_new(self) -> int:
        """Count the days once (the first time), then fold in the notes committed since."""
        if not self._counted:
            self._read(self.running.recount, time.time())
            self._counted = True
        return self._read(self.running.tail, time.time())

    def publish_changed(self) -> int:
        """One round: publish each recent day whose totals changed; returns how many left."""
        self.fold_new()
        sent = 0
        for day, totals in sorted(self.running.days.items()):
            if self.published.get(day) == totals.as_of:
                continue
            deadline = time.monotonic() + self.interval
            while self._read(unsent_up_to, totals.last_seq) and not self._stopped.ready():
                if time.monotonic() > deadline:
                    return sent  # the forwarder is behind (WAN down?): try again next round
                self._stopped.wait(timeout=0.2)
            if self._stopped.ready():
                return sent
            message = totals.message(self.store_id, day)  # as of now: what the wait above covered
            try:
                self.publisher.publish(self._message(message))
            except UnroutableError:
                log.info("control totals of %s: no one is bound to receive them yet", day,
                         extra={"id": self.store_id, "correlationid": None})
                continue
            except PublishError as exc:
                log.warning("control totals of %s not published: %s", day, exc,
                            extra={"id": self.store_id, "correlationid": None})
                return sent
            self.published[day] = message.as_of
            sent += 1
        for day in [day for day in self.published if day not in self.running.days]:
            del self.published[day]  # past the window: kept neither here nor there
        return sent

    def _message(self, totals: StoreControlTotalsV2) -> OutgoingMessage:
        day = totals.business_day.isoformat()
        event = CloudEvent.new(
            StoreControlTotalsV2.TYPE, f"store/{self.store_id}/agent", totals,
            subject=f"{self.store_id}/{day}",
            idempotencykey=f"{StoreControlTotalsV2.TYPE}:{self.store_id}:{day}:{totals.as_of}")
        return OutgoingMessage(self.exchange, event.type, event.to_json(), message_id=event.id,
                               type=event.type, user_id=self.user_id, headers={H_STORE: self.store_id})
