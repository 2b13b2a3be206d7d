"""`table_changes`: change capture on a legacy table by timestamp and key, as an entrypoint.

Legacy programs write their tables directly and publish nothing, so the only
trace of a change is the row's update timestamp. This is Kafka Connect's JDBC
source in timestamp+incrementing mode: rows after a persisted watermark
(timestamp, key), in (timestamp, key) order and batches, each batch handed to
a worker; the watermark advances (and is stored) only after that worker has
fully succeeded, effects committed, so a crash or restart repeats a batch
but never skips one (at-least-once, no gap). Ordering by the key as well as
the timestamp is what makes many rows sharing one timestamp safe to split
across batches.

A row whose transaction commits late carries a timestamp older than rows
already captured, behind the watermark. Every `interval` the rows of the last
`overlap` seconds before the watermark are read again and the versions not
yet emitted (remembered per key: timestamp and values) are handed on as
well. A commit later than `overlap` is missed: set it above the longest
legacy transaction. While rows keep coming, a rescan waits until the window
has moved on by half its length, so each row is read again about twice, not
`overlap / interval` times (a bulk writer's rows made rescanning the capturing
process's main cost); a late row is then found within `overlap / 2`, and none
is missed by waiting (see `_rescan`). Once
the watermark has stood still for `overlap` seconds (of our clock: a row
stamped before the watermark's row was stamped before we saw that row), one
more rescan finds every late row there can be, and rescans pause until the
watermark moves: a quiet table after a batch job that touched every row in
one second is not re-read every interval forever.
Deletions are seen only where the legacy table marks them
(`deleted=(column, value)`); a physically deleted row leaves no trace a
poller could find.

Handlers get a list of `RowChange`; an exception (or an effect that failed
to commit) makes the same batch come again, and a failed rescan is rescanned,
after a backoff that doubles from `interval` up to `max_backoff` (a broker or
database that is down is not hammered). The change of state is logged once,
when the failing starts (with the first failure's traceback) and when it ends;
the failures in between are counted, not logged again.

A service run as N processes (`RETAILBUS_INSTANCE=i/N`, bus/partitions.py) captures
in process 0 only: pollers in every process would share one watermark and hand
every change on N times. `retailbus up` restarts process 0 when it dies, and the
watermark makes it resume where it stopped.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial

import eventlet
from eventlet.event import Event
from nameko.extensions import Entrypoint
from prometheus_client import Counter, Gauge
from sqlalchemy import Column, MetaData, String, Table, Text, and_, or_, select, update
from sqlalchemy.engine import Engine

from bus import partitions
from bus.constants import EFFECT_ERRORS
from legacy_wrappers.legacy_db import LegacyEngines, create_tables

log = logging.getLogger(__name__)

LAG = Gauge("retailbus_cdc_lag_seconds",
            "Age of the watermark while change capture is behind; 0 once it has caught up", ["table"])
ROWS = Counter("retailbus_cdc_rows_total",
               "Changed rows handed to a worker, by kind (new, late) and outcome (ok, failed)",
               ["table", "kind", "outcome"])
FAILING = Gauge("retailbus_cdc_failing",
                "1 while change capture on a table keeps failing (retried with backoff), else 0", ["table"])

metadata = MetaData()
WATERMARKS = Table(
    "RB_CDC_WATERMARK", metadata,
    Column("NAME", String(200), primary_key=True),
    Column("TS", String(64), nullable=False),
    Column("ROW_KEY", Text, nullable=False),  # JSON list of the key columns' values
    Column("SAVED_TS", String(32), nullable=False),
)


@dataclass(frozen=True)
class RowChange:
    row: dict
    deleted: bool = False


def _after(columns, values):
    """(c0, c1, ...) > (v0, v1, ...) lexicographically, spelled out (no row-value syntax)."""
    head = columns[0] > values[0]
    if len(columns) == 1:
        return head
    return or_(head, and_(columns[0] == values[0], _after(columns[1:], values[1:])))


def shift(ts, seconds: float):
    """`ts` minus `seconds`, in the column's own representation (datetime or ISO string)."""
    if isinstance(ts, datetime):
        return ts - timedelta(seconds=seconds)
    earlier = datetime.fromisoformat(ts) - timedelta(seconds=seconds)
    return earlier.isoformat(sep="T", timespec="microseconds")


class TableChanges(Entrypoint):
    engines = LegacyEngines()

    def __init__(self, table: str, key: tuple[str, ...], timestamp: str = "UPD_TS",
                 deleted: tuple[str, object] | None = None, config_key: str = "LEGACY_DB_URI",
                 batch: int = 1000, interval: float = 0.5, overlap: float = 5.0, max_backoff: float = 30.0,
                 **kwargs):
        self.table_name, self.key, self.timestamp = table, tuple(key), timestamp
        self.deleted, self.config_key = deleted, config_key
        self.batch, self.interval, self.overlap, self.max_backoff = batch, interval, overlap, max_backoff
        self.failures = 0  # failed rounds in a row
        self.watermark: tuple | None = None  # (ts, *key values) of the last row handled
        self.seen: dict[tuple, tuple] = {}  # key -> row values emitted within the overlap
        self._running = False
        self._wake = threading.Event()
        self._last_rescan = 0.0  # our clock: when the last rescan started
        self._rescanned = 0.0  # when the last rescan that handed on every late row started
        self._rescan_low = None
        self._settles_at = 0.0  # our clock: no late row behind the watermark can commit after this
        super().__init__(**kwargs)

    def setup(self):
        self.engine: Engine = self.engines.engine(self.config_key)
        self.name = f"{self.container.service_name}.{self.method_name}"
        FAILING.labels(self.table_name).set(0)
        _NAMEKO_WORKER_LOG.addFilter(_repeated_failures)  # once per process: a filter is added once

    def start(self):
        me = partitions.instance()
        if me is not None and me[0] != 0:
            log.info("change capture on %s runs in process 0 of %d, not in this one (%d)", self.table_name, me[1], me[0])
            self._thread = None
            return
        self._running = True
        self._thread = self.container.spawn_managed_thread(self._run, identifier=f"table_changes:{self.name}")

    def stop(self):
        self._running = False
        self._wake.set()
        if self._thread is not None:
            self._thread.wait()

    def kill(self):
        self._running = False
        if self._thread is not None:
            self._thread.kill()

    # -- the loop -------------------------------------------------------------

    def _run(self):
        while self._running:
            try:
                self._prepare()
                break
            except Exception as exc:  # database not there yet
                log.warning("change capture on %s cannot start yet: %s", self.table_name, exc)
                self._wake.wait(max(self.interval, 1.0))
        while self._running:
            failures = self.failures
            try:
                handled = self.poll_once()
            except Exception as exc:
                self._failed(f"{type(exc).__name__}: {exc}")
                handled = 0
            if failures and self.failures == failures:
                self._recovered()
            if self.failures:
                delay = min(self.max_backoff, self.interval * 2 ** min(self.failures, 30))
            elif handled < self.batch:
                delay = self.interval
            else:
                continue
            self._wake.wait(delay)
            self._wake.clear()

    def _failed(self, reason: str):
        """One more failed round: logged only when it starts the failing."""
        self.failures += 1
        if self.failures == 1:
            FAILING.labels(self.table_name).set(1)
            log.warning("change capture on %s is failing (%s); retrying with backoff up to %gs, "
                        "logged again when it works", self.table_name, reason, self.max_backoff,
                        extra={"outcome": "failing"})
        else:
            log.debug("change capture on %s failed again (%d in a row): %s", self.table_name,
                      self.failures, reason)

    def _recovered(self):
        log.info("change capture on %s works again after %d failed rounds", self.table_name, self.failures,
                 extra={"outcome": "recovered"})
        FAILING.labels(self.table_name).set(0)
        self.failures = 0

    def _prepare(self):
        create_tables(self.engine, metadata)
        md = MetaData()
        md.reflect(self.engine, only=[self.table_name])
        self.table = md.tables[self.table_name]
        self._ts = self.table.c[self.timestamp]
        self._keys = [self.table.c[k] for k in self.key]
        with self.engine.connect() as conn:
            saved = conn.execute(select(WATERMARKS.c.TS, WATERMARKS.c.ROW_KEY)
                                 .where(WATERMARKS.c.NAME == self.name)).first()
            conn.rollback()
        if saved is not None:
            ts = saved.TS
            if self._ts.type.python_type is datetime:
                ts = datetime.fromisoformat(ts)
            self.watermark = (ts, *json.loads(saved.ROW_KEY))
            self._settles_at = time.monotonic() + self.overlap

    def poll_once(self) -> int:
        """Hand on the next batch after the watermark, then (every `interval`, or `overlap / 2`
        while rows come) late rows.
        Returns the number of rows read after the watermark."""
        order = [self._ts, *self._keys]
        query = select(self.table).order_by(*order).limit(self.batch)
        if self.watermark is not None:
            query = query.where(_after(order, self.watermark))
        with self.engine.connect() as conn:
            rows = _dicts(conn.execute(query))
            conn.rollback()
        if rows:
            if not self._handle(rows, "new"):
                return len(rows)  # the same batch again, after the backoff
            last = rows[-1]
            self._save(tuple(last[c.name] for c in order))
        if len(rows) < self.batch:
            LAG.labels(self.table_name).set(0)
        elif self.watermark is not None:
            LAG.labels(self.table_name).set(self._age(self.watermark[0]))
        moving = self._settles_at - self.overlap > self._last_rescan  # rows came since the last rescan
        gap = self.overlap / 2 if moving else self.interval  # then the window moves on first
        if self.watermark is None or time.monotonic() - self._last_rescan < gap:
            return len(rows)
        if self._rescanned > self._settles_at:  # a rescan after the watermark settled handed them all on
            return len(rows)
        low = shift(self.watermark[0], self.overlap)
        self._rescan_low = low if self._rescan_low is None else min(self._rescan_low, low)
        if len(rows) < self.batch:  # caught up: rescan all that could have been passed by
            started = self._last_rescan = time.monotonic()
            if self._rescan(self._rescan_low):  # else (or if it raised) the same window again
                self._rescanned, self._rescan_low = started, None
        return len(rows)

    def _rescan(self, low) -> bool:
        """Emit versions committed late, behind the watermark but after `low`; True
        when every one of them was handed on.

        Only once caught up: while whole batches come back, re-reading the
        window every interval cost more than the capture itself (rows sharing
        one timestamp are all in it). Nothing is missed by waiting: `low` is
        the earliest overlap start of every rescan skipped meanwhile."""
        with self.engine.connect() as conn:
            result = conn.execute(select(self.table).where(self._ts >= low, self._ts <= self.watermark[0])
                                  .order_by(self._ts, *self._keys))
            names, rows = list(result.keys()), result.all()
            conn.rollback()
        self.seen = {k: v for k, v in self.seen.items() if v[0] >= low}
        # compared as the rows come (a tuple of the columns' values): the window holds every row
        # of the last `overlap` seconds, and making each a dict cost more than the comparison.
        # Only the late ones become dicts.
        ts, keys = names.index(self.timestamp), [names.index(k) for k in self.key]
        late = [dict(zip(names, r)) for r in rows if self.seen.get(tuple(r[i] for i in keys)) != (r[ts], *r)
                and (r[ts], *(r[i] for i in keys)) <= self.watermark]
        if late:
            log.info("%d rows of %s behind the watermark not emitted yet (late commits, or a restart)",
                     len(late), self.table_name)
        for start in range(0, len(late), self.batch):
            if not self._handle(late[start:start + self.batch], "late"):
                return False
        return True

    # -- helpers ----------------------------------------------------------------

    def _key_of(self, row: dict) -> tuple:
        return tuple(row[k] for k in self.key)

    def _version(self, row: dict) -> tuple:
        return (row[self.timestamp], *row.values())

    def _age(self, ts) -> float:
        when = ts if isinstance(ts, datetime) else datetime.fromisoformat(ts)
        return max(0.0, (datetime.utcnow() - when.replace(tzinfo=None)).total_seconds())

    def _handle(self, rows: list[dict], kind: str) -> bool:
        """Run one worker on `rows` and wait until it has fully ended; True if it succeeded."""
        if self.deleted is not None:
            column, marker = self.deleted
            changes = [RowChange(r, deleted=r[column] == marker) for r in rows]
        else:
            changes = [RowChange(r) for r in rows]
        done = Event()
        self.container.spawn_worker(self, (changes,), {}, handle_result=partial(self._result, done))
        error = done.wait()
        ROWS.labels(self.table_name, kind, "failed" if error else "ok").inc(len(rows))
        if error:
            self._failed(f"a batch of {len(rows)} {kind} rows failed: {error}")
            return False
        for r in rows:
            self.seen[self._key_of(r)] = self._version(r)
        return True

    def _result(self, done: Event, worker_ctx, result, exc_info):
        # The effects commit in the dependencies' worker_result, after this hook:
        # decide once the worker greenthread has ended. Sends the error, None if none.
        def finished(_thread):
            effect_errors = getattr(worker_ctx, EFFECT_ERRORS, None)
            if exc_info is not None:
                done.send(f"{exc_info[0].__name__}: {exc_info[1]}")
            elif effect_errors:
                done.send(f"its effect did not commit: {effect_errors[0]}")
            else:
                done.send(None)
        eventlet.getcurrent().link(finished)
        return result, exc_info

    def _save(self, position: tuple):
        ts, *key = position
        stored = ts.isoformat() if isinstance(ts, datetime) else ts
        now = datetime.utcnow().isoformat()
        with self.engine.begin() as conn:
            w = WATERMARKS.c
            changed = conn.execute(update(WATERMARKS).where(w.NAME == self.name).values(
                TS=stored, ROW_KEY=json.dumps(key), SAVED_TS=now)).rowcount
            if not changed:
                conn.execute(WATERMARKS.insert().values(
                    NAME=self.name, TS=stored, ROW_KEY=json.dumps(key), SAVED_TS=now))
        self.watermark = position
        self._settles_at = time.monotonic() + self.overlap


def _dicts(result) -> list[dict]:
    """The rows as {column: value} (a RowMapping made into a dict costs several times more)."""
    names = list(result.keys())
    return [dict(zip(names, row)) for row in result]


_NAMEKO_WORKER_LOG = logging.getLogger("nameko.containers")


def _repeated_failures(record: logging.LogRecord) -> bool:
    """nameko logs every worker that raised, at ERROR with its traceback: for a batch
    that fails again while its capture is failing already (the broker down), one a
    backoff, the first traceback has said it all. This drops those repeats."""
    args = record.args if isinstance(record.args, tuple) else ()
    entrypoint = getattr(args[0], "entrypoint", None) if args else None
    return not (isinstance(entrypoint, TableChanges) and entrypoint.failures)


table_changes = TableChanges.decorator
