"""The store's control totals: every sale and return it accepted, per business day.

Each accepted transaction is noted in `accepted_txn`, in the outbox database:
a bus-mode one inside the very transaction that commits its outbox row (one
more INSERT, no extra fsync, so the accept path stays as fast as it was), a
legacy- or shadow-mode one once the legacy ERP has answered it. The notes are
the durable truth; the `store.control_totals.v1` messages are snapshots taken
from them, so nothing about them has to survive a restart or a WAN outage:
they are taken again.

`ControlTotalsPublisher` takes a snapshot of every business day touched in the
last `days` days, at start and then every `interval` seconds, and publishes the
days that changed since it last published them. A day's snapshot leaves only
once every outbox row it covers has been confirmed by the broker, so the totals
travel behind the sales they count. A snapshot nobody is bound to receive
(no reconcile service yet) is simply taken again on the next round.
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

from contracts.control import ControlTxn, KindTotals, StoreControlTotalsV1
from contracts.envelope import CloudEvent
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


def compact(db: sqlite3.Connection, cutoff: float) -> None:
    db.execute("DELETE FROM accepted_txn WHERE accepted_at < ?", (cutoff,))


def recent_days(db: sqlite3.Connection, since: float) -> dict[str, tuple[int, int]]:
    """Business day (YYYY-MM-DD) -> (its last note `n`, the last outbox seq its notes cover),
    for every day with a transaction accepted after `since`. Cheap: no rows are built."""
    return {day: (n, seq or 0) for day, n, seq in db.execute(
        "SELECT business_day, max(n), max(outbox_seq) FROM accepted_txn WHERE business_day IN "
        "(SELECT DISTINCT business_day FROM accepted_txn WHERE accepted_at >= ?) GROUP BY business_day",
        (since,))}


def day_totals(db: sqlite3.Connection, store_id: str, day: str, as_of: int) -> StoreControlTotalsV1:
    """The control totals of `day` as of note `as_of` (later notes are left to the next round)."""
    kinds: dict[str, list[ControlTxn]] = {"sale": [], "return": []}
    for kind, txn_id, total, currency, card, via in db.execute(
            "SELECT kind, pos_txn_id, total_minor, currency, loyalty_card, via FROM accepted_txn "
            "WHERE business_day = ? AND n <= ? ORDER BY n", (day, as_of)):
        kinds[kind].append(ControlTxn(pos_txn_id=txn_id, total_minor=total, currency=currency,
                                      loyalty_card=bool(card), via=via))
    return StoreControlTotalsV1(
        store_id=store_id, business_day=day, as_of=as_of, taken_at=datetime.now(UTC),
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
        self.publisher: ConfirmingPublisher | None = None

    def attach(self, outbox_path: Path, store_id: str, uri: str, pub: PublisherSettings,
               interval: float, days: float):
        """Called by the service's `setup`, after the outbox (and its tables) exist."""
        self.path, self.store_id, self.interval, self.days = outbox_path, store_id, interval, days
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
        return tpool.execute(fn, self._db, *args)  # an OS thread: a big day never stalls a till

    def publish_changed(self) -> int:
        """One round: publish each recent day whose totals changed; returns how many left."""
        sent = 0
        for day, (as_of, last_seq) in sorted(self._read(recent_days, time.time() - self.days * 86400).items()):
            if self.published.get(day) == as_of:
                continue
            deadline = time.monotonic() + self.interval
            while self._read(unsent_up_to, last_seq) and not self._stopped.ready():
                if time.monotonic() > deadline:
                    return sent  # the forwarder is behind (WAN down?): try again next round
                self._stopped.wait(timeout=0.2)
            if self._stopped.ready():
                return sent
            totals = self._read(day_totals, self.store_id, day, as_of)
            try:
                self.publisher.publish(self._message(totals))
            except UnroutableError:
                log.info("control totals of %s: no one is bound to receive them yet", day,
                         extra={"id": self.store_id, "correlationid": None})
                continue
            except PublishError as exc:
                log.warning("control totals of %s not published: %s", day, exc,
                            extra={"id": self.store_id, "correlationid": None})
                return sent
            self.published[day] = totals.as_of
            sent += 1
        return sent

    def _message(self, totals: StoreControlTotalsV1) -> OutgoingMessage:
        day = totals.business_day.isoformat()
        event = CloudEvent.new(
            StoreControlTotalsV1.TYPE, f"store/{self.store_id}/agent", totals,
            subject=f"{self.store_id}/{day}",
            idempotencykey=f"{StoreControlTotalsV1.TYPE}:{self.store_id}:{day}:{totals.as_of}")
        return OutgoingMessage(self.exchange, event.type, event.to_json(), message_id=event.id,
                               type=event.type, user_id=self.user_id, headers={H_STORE: self.store_id})
