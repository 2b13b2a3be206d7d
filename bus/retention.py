"""Retention: what piles up (journal hops, inbox keys, sent relay rows, ledger keys,
control totals, batch files) is pruned on a timer, in small batches.

A pass removes at most `max_batches` batches of `batch` rows per kind and yields
between them, so it never holds a database's write lock or the event loop for
long: a backlog drains over several passes instead of stalling a hot path once.
What went is counted in `retailbus_pruned_total{what}`. The ages and sizes are
`RETAILBUS.retention` (bus/settings.py).
"""
from __future__ import annotations

import logging
from datetime import datetime, timedelta, timezone
from typing import Callable

import eventlet
from nameko.timer import Timer
from prometheus_client import Counter

from bus.settings import retailbus_settings

log = logging.getLogger(__name__)

PRUNED = Counter("retailbus_pruned_total", "Rows, keys and files removed by retention", ["what"])


class RetentionTimer(Timer):
    """nameko's timer, every `RETAILBUS.retention.interval` seconds."""

    def __init__(self, **kwargs):
        super().__init__(interval=None, **kwargs)

    def setup(self):
        self.interval = retailbus_settings(self.container.config).retention.interval


retention_timer = RetentionTimer.decorator


def before(days: float, now: datetime | None = None) -> datetime:
    """The moment `days` ago (UTC): what is older goes."""
    return (now or datetime.now(timezone.utc)) - timedelta(days=days)


def in_batches(what: str, remove: Callable[[int], int], batch: int, max_batches: int) -> int:
    """Call `remove(batch)` until it removes fewer than `batch` or `max_batches` calls
    were made; count and return what went. A failure is logged and ends the pass:
    the next pass tries again. The kind's series exists from its first pass (at 0), so
    a dashboard shows a kind that has nothing to prune yet."""
    counted = PRUNED.labels(what)
    removed = 0
    for _ in range(max_batches):
        try:
            n = remove(batch)
        except Exception as exc:
            log.warning("pruning %s failed (%s: %s); the next pass tries again", what, type(exc).__name__, exc)
            break
        removed += n
        if n:
            counted.inc(n)
        if n < batch:
            break
        eventlet.sleep(0)  # the hot path between two batches
    return removed
