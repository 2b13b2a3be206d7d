"""The store's control totals per business day, kept up to date note by note.

Rebuilding a day's totals from its notes costs as much as the day is long, so
a store's agent got slower and bigger as the day went on. `RunningTotals`
counts each day once, when the agent starts (a single pass over the notes of
the recent days), then folds in only the notes committed since it last looked
(`accepted_txn.n` grows with every commit, and a reader sees a commit whole),
so each round costs what was sold since the last one. A day not seen since the
start (a late sale for an old business day) is counted whole first.

Plain functions over a sqlite3 connection: the publisher runs them in an OS
thread, and the tests hold them to a full recount.
"""
from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field
from datetime import UTC, date, datetime

from contracts.control import KindDigest, StoreControlTotalsV2, TxnDigest

COLUMNS = "n, kind, pos_txn_id, business_day, total_minor, currency, loyalty_card, via, accepted_at, outbox_seq"
TAIL = 5000  # notes read per statement: memory stays small however far behind a round is


@dataclass
class DayTotals:
    """One business day: digests per kind, and how far its notes go."""

    as_of: int = 0  # the day's last note
    last_seq: int = 0  # the last outbox row its notes cover (legacy-mode notes have none)
    last_at: float = 0.0  # when its last note was taken
    txns: dict[str, TxnDigest] = field(default_factory=lambda: {"sale": TxnDigest(), "return": TxnDigest()})
    loyalty: dict[str, TxnDigest] = field(default_factory=lambda: {"sale": TxnDigest(), "return": TxnDigest()})

    def fold(self, row: tuple) -> None:
        n, kind, txn_id, _, total, currency, card, via, at, seq = row
        self.txns[kind].add_txn(kind, txn_id, total, currency)
        if via == "bus" and card:
            self.loyalty[kind].add_points(kind, txn_id)
        self.as_of = max(self.as_of, n)
        self.last_seq = max(self.last_seq, seq or 0)
        self.last_at = max(self.last_at, at)

    def message(self, store_id: str, day: str) -> StoreControlTotalsV2:
        return StoreControlTotalsV2(
            store_id=store_id, business_day=date.fromisoformat(day), as_of=self.as_of, taken_at=datetime.now(UTC),
            sales=KindDigest.of(self.txns["sale"], self.loyalty["sale"]),
            returns=KindDigest.of(self.txns["return"], self.loyalty["return"]))


class RunningTotals:
    """The days touched in the last `keep_seconds`, counted once and then note by note."""

    def __init__(self, keep_seconds: float):
        self.keep_seconds = keep_seconds
        self.days: dict[str, DayTotals] = {}
        self.last_n = 0

    def recount(self, db: sqlite3.Connection, now: float) -> None:
        """Count every day touched since `now - keep_seconds` from its notes (at start)."""
        self.days, since = {}, now - self.keep_seconds
        [(self.last_n,)] = db.execute("SELECT coalesce(max(n), 0) FROM accepted_txn").fetchall()
        recent = [day for (day,) in db.execute(
            "SELECT DISTINCT business_day FROM accepted_txn WHERE accepted_at >= ?", (since,))]
        for day in recent:
            self._count_day(db, day, self.last_n)

    def tail(self, db: sqlite3.Connection, now: float) -> int:
        """Fold in the notes committed since the last call; returns how many."""
        folded = 0
        while True:
            rows = db.execute(f"SELECT {COLUMNS} FROM accepted_txn WHERE n > ? ORDER BY n LIMIT ?",
                              (self.last_n, TAIL)).fetchall()
            for row in rows:
                day = self.days.get(row[3])
                if day is None:  # an old day touched again: its earlier notes first
                    day = self._count_day(db, row[3], self.last_n)
                day.fold(row)
                self.last_n = row[0]
            folded += len(rows)
            if len(rows) < TAIL:
                break
        cutoff = now - self.keep_seconds
        for name in [name for name, day in self.days.items() if day.last_at < cutoff]:
            del self.days[name]  # published already; counted again if touched again
        return folded

    def _count_day(self, db: sqlite3.Connection, day: str, up_to: int) -> DayTotals:
        totals = self.days[day] = DayTotals()
        for row in db.execute(f"SELECT {COLUMNS} FROM accepted_txn WHERE business_day = ? AND n <= ?",
                              (day, up_to)):
            totals.fold(row)
        return totals
