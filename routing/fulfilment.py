"""Click-and-collect tasks at the pickup store: the agent's `fulfilment_task` table.

The order process sends a store its tasks (`fulfilment.task_created.v1`) and the
customer's cancellations (`fulfilment.task_cancelled.v1`) on the store's own durable
queue, so a store that was offline finds them when it reconnects. Associates list the
tasks, mark one picked and hand it over (routing/fulfilment_http.py); each of those
writes the task's new state and the event telling the bus (`fulfilment.picked.v1`,
`fulfilment.collected.v1`) in ONE transaction of the store's outbox, which the
forwarder delivers like a sale: a collection recorded offline reaches the order process
once, when the link returns.

The store is where an order is handed over, so the store decides what cannot happen
twice: a collected order is never withdrawn, a withdrawn one is never handed over. It
withdraws a task (`fulfilment.task_withdrawn.v1`, goods back on the shelf) when the
customer cancelled it, or when nobody came by its `collect_by` (a timer here, at the
store's clock, offline too). A cancellation that arrives before its task leaves a
tombstone (a row without lines) that withdraws the task as it arrives.

What closes a task, `fulfilment.collected.v1` or `fulfilment.task_withdrawn.v1`, is the
process's reply to the task's command: it carries the command's key + `:reply`
(bus/process/commands.py), so the store's outbox itself refuses a second, different
outcome for one task. A withdrawal is announced in a second transaction after the state
changed (`announced` tells which are still to be sent); the timer announces any a crash
left behind. A task sent again under a new key (an ops retry of the process) has its
outcome announced again under that key.
"""
from __future__ import annotations

import json
import logging
import sqlite3
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from eventlet.queue import Empty, LightQueue
from nameko.extensions import Extension
from prometheus_client import Counter, Gauge

from bus.process.engine import REPLY_SUFFIX
from contracts.envelope import CloudEvent
from contracts.fulfilment import (FulfilmentCollectedV1, FulfilmentPickedV1, FulfilmentTaskCancelledV1,
                                  FulfilmentTaskCreatedV1, FulfilmentTaskWithdrawnV1)
from routing.outbox import Outbox

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS fulfilment_task (
    order_id       TEXT PRIMARY KEY,
    correlation_id TEXT,               -- the process instance
    command_key    TEXT,               -- the task command's idempotency key: the outcome's + ':reply'
    customer_id    TEXT,
    lines          TEXT,               -- JSON [{line_no, sku, quantity}]; NULL: a tombstone
    collect_by     TEXT,               -- ISO UTC
    status         TEXT NOT NULL,      -- open | picked | collected | withdrawn
    reason         TEXT,               -- why withdrawn
    terminal_id    TEXT,               -- who picked or handed it over
    announced      INTEGER NOT NULL DEFAULT 1,
    changed_at     TEXT NOT NULL       -- ISO UTC, the store's clock
);
CREATE INDEX IF NOT EXISTS fulfilment_due ON fulfilment_task (status, collect_by);
"""
ACTIVE = ("open", "picked")
SWEEP_SECONDS = 30.0  # how often unannounced outcomes are looked for (overdue tasks: at their deadline)
PRUNE_EVERY = 600.0  # seconds between prunings of tasks closed longer than the agent's retention

TASKS = Counter("retailbus_agent_fulfilment_total", "Click-and-collect task changes at the store, by what "
                "(received, picked, collected, announced: a withdrawal or a repeated outcome sent)",
                ["store", "what"])
OPEN_TASKS = Gauge("retailbus_agent_fulfilment_open", "Tasks not yet collected nor withdrawn", ["store"])


class TaskRefusedError(Exception):
    """An associate's call the task's state does not allow: `status` is the HTTP answer."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class _Unchanged(Exception):
    """Raised inside a transaction to send no event: the state already says it."""


@dataclass(frozen=True)
class Task:
    order_id: str
    correlation_id: str | None
    command_key: str | None
    customer_id: str | None
    lines: list[dict]
    collect_by: str | None
    status: str
    reason: str | None
    terminal_id: str | None
    announced: bool
    changed_at: str

    def answer(self) -> dict:
        """The associate's view (UPPER-CASE, as the agent's other answers)."""
        return {"ORDER_ID": self.order_id, "CUSTOMER_ID": self.customer_id, "STATUS": self.status.upper(),
                "COLLECT_BY": self.collect_by, "REASON": self.reason,
                "LINES": [{"LINE_NO": x["line_no"], "SKU": x["sku"], "QTY": x["quantity"]} for x in self.lines]}


COLUMNS = ("order_id, correlation_id, command_key, customer_id, lines, collect_by, status, reason, terminal_id, "
           "announced, changed_at")


def _task(row) -> Task:
    return Task(*row[:4], json.loads(row[4]) if row[4] else [], *row[5:9], bool(row[9]), row[10])


def _iso(at: datetime) -> str:
    """One text form for every stored time, so they compare as text."""
    return at.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f+00:00")


def _now() -> str:
    return _iso(datetime.now(timezone.utc))


def _get(db, order_id: str) -> Task | None:
    row = db.execute(f"SELECT {COLUMNS} FROM fulfilment_task WHERE order_id = ?", (order_id,)).fetchone()
    return _task(row) if row else None


class TaskBook:
    """The table: writes ride the outbox's group commit, reads use a connection of their own."""

    def __init__(self, outbox: Outbox, store_id: str):
        self.outbox, self.store_id = outbox, store_id
        self._db = sqlite3.connect(str(outbox.path), isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.executescript(SCHEMA)

    def close(self):
        self._db.close()

    # -- reads ---------------------------------------------------------------
    def get(self, order_id: str) -> Task | None:
        return _get(self._db, order_id)

    def tasks(self, statuses: tuple[str, ...], limit: int = 500) -> list[Task]:
        marks = ",".join("?" * len(statuses))
        rows = self._db.execute(f"SELECT {COLUMNS} FROM fulfilment_task WHERE status IN ({marks}) AND lines IS NOT NULL "
                                "ORDER BY collect_by LIMIT ?", (*statuses, limit)).fetchall()
        return [_task(row) for row in rows]

    def open_count(self) -> int:
        return self._db.execute("SELECT count(*) FROM fulfilment_task WHERE status IN ('open', 'picked') "
                                "AND lines IS NOT NULL").fetchone()[0]

    def overdue(self, now_iso: str) -> list[str]:
        return [r[0] for r in self._db.execute(
            "SELECT order_id FROM fulfilment_task WHERE status IN ('open', 'picked') AND lines IS NOT NULL "
            "AND collect_by < ?", (now_iso,))]

    def next_due(self) -> float | None:
        """Seconds until the earliest active task is due (None: none is)."""
        first = self._db.execute("SELECT min(collect_by) FROM fulfilment_task WHERE status IN ('open', 'picked') "
                                 "AND lines IS NOT NULL").fetchone()[0]
        return None if first is None else (datetime.fromisoformat(first) - datetime.now(timezone.utc)).total_seconds()

    def prune(self, older_than: datetime, limit: int = 500) -> int:
        """Forget closed tasks (and tombstones) last changed before `older_than`, whose outcome was sent."""
        return self.outbox.write(lambda db: db.execute(
            "DELETE FROM fulfilment_task WHERE order_id IN (SELECT order_id FROM fulfilment_task WHERE status IN "
            "('collected', 'withdrawn') AND announced = 1 AND changed_at < ? LIMIT ?)",
            (_iso(older_than), limit)).rowcount)

    def unannounced(self) -> list[str]:
        return [r[0] for r in self._db.execute(
            "SELECT order_id FROM fulfilment_task WHERE announced = 0 AND lines IS NOT NULL "
            "AND status IN ('collected', 'withdrawn')")]

    # -- what the order process sends ------------------------------------------
    def receive(self, task: FulfilmentTaskCreatedV1, correlation_id: str | None, command_key: str) -> Task:
        """Record a task: a repeat changes nothing, a tombstone gets its lines (and stays
        withdrawn), a task closed already and sent again under a new key is announced again."""
        lines = json.dumps([line.model_dump() for line in task.lines])

        def apply(db):
            db.execute(
                "INSERT INTO fulfilment_task (order_id, correlation_id, command_key, customer_id, lines, collect_by, "
                "status, changed_at) VALUES (?, ?, ?, ?, ?, ?, 'open', ?) ON CONFLICT (order_id) DO UPDATE SET "
                "announced = CASE WHEN fulfilment_task.lines IS NULL OR (fulfilment_task.command_key IS NOT "
                "excluded.command_key AND fulfilment_task.status IN ('collected', 'withdrawn')) THEN 0 "
                "ELSE fulfilment_task.announced END, "
                "correlation_id = excluded.correlation_id, command_key = excluded.command_key, "
                "customer_id = coalesce(fulfilment_task.customer_id, excluded.customer_id), "
                "lines = coalesce(fulfilment_task.lines, excluded.lines), "
                "collect_by = coalesce(fulfilment_task.collect_by, excluded.collect_by)",
                (task.order_id, correlation_id, command_key, task.customer_id, lines, _iso(task.collect_by), _now()))
            return _get(db, task.order_id)
        return self.outbox.write(apply)

    def cancel(self, cancel: FulfilmentTaskCancelledV1, correlation_id: str | None) -> Task | None:
        """The customer's cancellation: withdraw an active task (returned, to announce); remember it
        for a task not here yet; nothing for one collected or withdrawn already."""
        def apply(db):
            found = _get(db, cancel.order_id)
            if found is None:
                db.execute("INSERT INTO fulfilment_task (order_id, correlation_id, status, reason, announced, "
                           "changed_at) VALUES (?, ?, 'withdrawn', ?, 0, ?)",
                           (cancel.order_id, correlation_id, cancel.reason, _now()))
                return None
            return self._withdraw(db, found, cancel.reason)
        return self.outbox.write(apply)

    def expire(self, order_id: str) -> Task | None:
        """Withdraw a task nobody collected by its `collect_by` (returned, to announce)."""
        return self.outbox.write(lambda db: self._withdraw(db, _get(db, order_id), "not_collected",
                                                           overdue=True))

    @staticmethod
    def _withdraw(db, task: Task | None, reason: str, overdue: bool = False) -> Task | None:
        if task is None or task.status not in ACTIVE or (overdue and task.collect_by >= _now()):
            return None
        db.execute("UPDATE fulfilment_task SET status = 'withdrawn', reason = ?, announced = 0, changed_at = ? "
                   "WHERE order_id = ?", (reason, _now(), task.order_id))
        return _get(db, task.order_id)

    def announce(self, order_id: str) -> bool:
        """Send the outcome of `order_id` (withdrawn, or collected again under a new key) if it
        was not sent yet; True when sent now."""
        task = self.get(order_id)
        if task is None or task.status not in ("collected", "withdrawn") or task.announced or not task.lines:
            return False
        at = datetime.fromisoformat(task.changed_at)
        event = self._event(
            FulfilmentTaskWithdrawnV1(order_id=task.order_id, store_id=self.store_id, reason=task.reason,
                                      withdrawn_at=at) if task.status == "withdrawn" else
            FulfilmentCollectedV1(order_id=task.order_id, store_id=self.store_id, terminal_id=task.terminal_id,
                                  collected_at=at), task)

        def mark(db):
            if db.execute("UPDATE fulfilment_task SET announced = 1 WHERE order_id = ? AND announced = 0",
                          (order_id,)).rowcount != 1:
                raise _Unchanged
        try:
            self.outbox.accept(event, mark)
        except _Unchanged:
            return False
        return True

    # -- what associates do --------------------------------------------------
    def picked(self, order_id: str, terminal: str) -> tuple[Task, bool]:
        """(the task, True when this call picked it); a picked or collected task again: False."""
        return self._report(order_id, terminal, "picked", ("open",), ("picked", "collected"))

    def collected(self, order_id: str, terminal: str) -> tuple[Task, bool]:
        return self._report(order_id, terminal, "collected", ACTIVE, ("collected",))

    def _report(self, order_id: str, terminal: str, status: str, allowed: tuple, done: tuple) -> tuple[Task, bool]:
        task = self.get(order_id)
        if task is None or not task.lines:
            raise TaskRefusedError(404, f"ORDER_ID: no task for order {order_id} at this store")
        at = datetime.now(timezone.utc)
        report = (FulfilmentPickedV1(order_id=order_id, store_id=self.store_id, terminal_id=terminal, picked_at=at)
                  if status == "picked" else
                  FulfilmentCollectedV1(order_id=order_id, store_id=self.store_id, terminal_id=terminal,
                                        collected_at=at))

        def apply(db):
            current = _get(db, order_id)
            if current.status in done:
                raise _Unchanged
            if current.status not in allowed:
                raise TaskRefusedError(409, f"ORDER_ID: order {order_id} is {current.status}"
                                            + (f" ({current.reason})" if current.reason else "")
                                            + f"; it cannot be {status}")
            db.execute("UPDATE fulfilment_task SET status = ?, terminal_id = ?, changed_at = ?, announced = 1 "
                       "WHERE order_id = ?", (status, terminal, _iso(at), order_id))
        try:
            self.outbox.accept(self._event(report, task), apply)
        except _Unchanged:
            return self.get(order_id), False
        return self.get(order_id), True

    def _event(self, data, task: Task) -> CloudEvent:
        """The task's outcome is the reply to its command (the command's key + REPLY_SUFFIX); a
        pick is one event per order. The key makes a repeat the same outbox row."""
        reply = isinstance(data, (FulfilmentCollectedV1, FulfilmentTaskWithdrawnV1)) and task.command_key
        return CloudEvent.new(data.TYPE, f"store/{self.store_id}/fulfilment", data, subject=task.order_id,
                              correlationid=task.correlation_id,
                              idempotencykey=task.command_key + REPLY_SUFFIX if reply else
                              f"{data.TYPE}:{self.store_id}:{task.order_id}")


class StoreFulfilment(Extension):
    """Attached by the store's outbox provider (routing/store_agent.py) to its outbox: the task
    book and the timer that withdraws overdue tasks and announces withdrawals left unsent."""

    def __init__(self):
        self.book: TaskBook | None = None
        self._wake = LightQueue()
        self._running = False

    def attach(self, outbox: Outbox, store_id: str, forwarder, retention_days: float = 30.0):
        self.store_id, self.forwarder, self.retention_days = store_id, forwarder, retention_days
        self.book = TaskBook(outbox, store_id)

    def start(self):
        self._running = True
        self.container.spawn_managed_thread(self._sweep_loop, identifier="fulfilment_sweep")

    def stop(self):
        self._running = False
        self._wake.put_nowait(True)
        if self.book is not None:
            self.book.close()

    kill = stop

    def on_command(self, command, event: CloudEvent) -> str:
        """A task or a cancellation from the order process; what it did."""
        if isinstance(command, FulfilmentTaskCreatedV1):
            task = self.book.receive(command, event.correlationid, event.idempotencykey)
            TASKS.labels(self.store_id, "received").inc()
            outcome = task.status
            if not self._wake.qsize():  # its deadline may come before the sweep's next round
                self._wake.put_nowait(True)
        else:
            task = self.book.cancel(command, event.correlationid)
            outcome = "withdrawn" if task else "remembered or too late"
        if task is not None and not task.announced:
            self._announce(task.order_id)
        OPEN_TASKS.labels(self.store_id).set(self.book.open_count())
        return outcome

    def report(self, what: str, order_id: str, terminal: str) -> tuple[Task, bool]:
        task, changed = (self.book.picked if what == "picked" else self.book.collected)(order_id, terminal)
        if changed:
            TASKS.labels(self.store_id, what).inc()
            self.forwarder.wake()
            OPEN_TASKS.labels(self.store_id).set(self.book.open_count())
        return task, changed

    def _announce(self, order_id: str) -> None:
        if self.book.announce(order_id):
            TASKS.labels(self.store_id, "announced").inc()
            self.forwarder.wake()

    def sweep(self) -> int:
        """Withdraw the overdue tasks and announce what is unannounced; how many were announced."""
        for order_id in self.book.overdue(_now()):
            self.book.expire(order_id)
        sent = 0
        for order_id in self.book.unannounced():
            sent += self.book.announce(order_id)
        if sent:
            TASKS.labels(self.store_id, "announced").inc(sent)
            self.forwarder.wake()
        OPEN_TASKS.labels(self.store_id).set(self.book.open_count())
        return sent

    def _sweep_loop(self):
        pruned = 0.0
        while self._running:
            wait = SWEEP_SECONDS
            try:
                self.sweep()
                if time.monotonic() - pruned > PRUNE_EVERY:
                    pruned = time.monotonic()
                    self.book.prune(datetime.now(timezone.utc) - timedelta(days=self.retention_days))
                due = self.book.next_due()
                if due is not None:  # the next task's deadline, if it comes first
                    wait = min(SWEEP_SECONDS, max(0.05, due))
            except Exception:  # a locked or closed database: the next round tries again
                if not self._running:
                    return
                log.exception("fulfilment sweep failed", extra={"id": None, "correlationid": None})
            try:
                self._wake.get(timeout=wait)
            except Empty:
                pass
