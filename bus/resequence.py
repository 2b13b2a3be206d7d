"""The Resequencer (EIP) of an ordered handler: each store's messages run one at a
time, in the order the store sent them, not merely in queue order.

Queue order is not always the store's order. When the broker nacks message k of a
pipelined batch but confirms k+1.., the forwarder sends again from k
(routing/forwarder.py), so k+1 is in the queue ahead of the resent k. Every message
a store agent forwards carries its position among the store's messages of its type
(`x-retailbus-store-seq`: 1, 2, 3 ... without gaps). The handler remembers, per store
and message type, the last position it finished (handled, found a duplicate, or
parked), and a message whose predecessor it has not finished waits for it, at most
`RETAILBUS.handlers.<service>.<method>.resequence_window` seconds; meanwhile a
predecessor that arrives runs first, and the waiting messages follow in position
order. When the window passes the store goes on with its lowest waiting message
(logged, `retailbus_resequence_timeouts_total`): a lost or parked predecessor never
blocks a store, and one that turns up later is handled then, out of order.

Never held: a message without the header (older agents, other producers), one at or
below the last position finished (a redelivery, the forwarder's resent duplicates, a
DLQ replay, an outbox whose positions began again at 1 after every row was compacted),
and a store's first message since the process started. The last positions live in
memory only: a restart, or a standby process taking over the queue, starts each store
afresh, so a resend racing a restart can still overtake, as it could before. Keeping
them in the erp's database with each posting would close that gap at the price of a
write per sale on the hot path, for a coincidence of two rare events (a nack and a
restart within one resend backoff).

A waiting message holds a prefetch slot of the handler's consumer (RETAILBUS.retry.
prefetch): the resequencer can only reorder what the broker has delivered, so a
resent message queued behind more than that many of its successors arrives only
after the window has passed.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from prometheus_client import Counter

from bus.constants import H_STORE_SEQ

if TYPE_CHECKING:
    from bus.consumer import Delivery

log = logging.getLogger(__name__)

HOLDS = Counter("retailbus_resequence_holds_total",
                "Times a store's messages waited for a predecessor not yet seen (x-retailbus-store-seq)",
                ["queue"])
TIMEOUTS = Counter("retailbus_resequence_timeouts_total",
                   "Times a store went on without a predecessor after the resequence window", ["queue"])


def position(headers: dict) -> int | None:
    """The message's `x-retailbus-store-seq`, or None when it has none (or not a number)."""
    value = headers.get(H_STORE_SEQ)
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


@dataclass
class _Chain:
    """One store's messages: the one running, the ones waiting (in arrival order), the armed window."""

    waiting: list = field(default_factory=list)
    running: Delivery | None = None
    hold: object | None = None


class Resequencer:
    """The per-store chains of one ordered handler. `add` and `done` return the store's
    message to run now, if any; a window that passes hands its message to `release`.
    `later(seconds, fn)` runs fn after the delay (a managed greenthread in a container)."""

    def __init__(self, queue: str, window: float, release: Callable[[Delivery], None],
                 later: Callable[[float, Callable[[], None]], None]):
        self.queue, self.window, self.release, self.later = queue, window, release, later
        self._chains: dict[str, _Chain] = {}
        self._last: dict[tuple[str, str], int] = {}  # (store, message type) -> last position finished
        self._holds, self._timeouts = HOLDS.labels(queue), TIMEOUTS.labels(queue)

    def add(self, delivery: Delivery) -> Delivery | None:
        """Queue a store's new message; the message to run now, or None (the store is busy or waits)."""
        chain = self._chains.setdefault(delivery.key, _Chain())
        chain.waiting.append(delivery)
        return None if chain.running is not None else self._pick(delivery.key, chain)

    def done(self, key: str) -> Delivery | None:
        """The store's running message is finished (handled or parked); its next one to run, if any."""
        chain = self._chains[key]
        finished, chain.running = chain.running, None
        if finished is not None and finished.seq is not None:
            stream = (key, finished.event.type)
            self._last[stream] = max(self._last.get(stream, 0), finished.seq)
        if not chain.waiting:
            del self._chains[key]
            return None
        return self._pick(key, chain)

    def _due(self, delivery: Delivery) -> bool:
        if delivery.seq is None or self.window <= 0:
            return True
        last = self._last.get((delivery.key, delivery.event.type))
        return last is None or delivery.seq <= last + 1

    def _pick(self, key: str, chain: _Chain) -> Delivery | None:
        found = next((d for d in chain.waiting if self._due(d)), None)
        if found is None:
            if chain.hold is None:
                chain.hold = hold = object()
                self._holds.inc()
                first = min(chain.waiting, key=lambda d: d.seq)
                log.info("store %s: %s %d waits for %d (resequence window %gs)", key, first.event.type,
                         first.seq, self._last[(key, first.event.type)] + 1, self.window,
                         extra={"id": first.event.id, "correlationid": first.event.correlationid,
                                "store": key, "queue": self.queue, "outcome": "held"})
                self.later(self.window, lambda: self._expire(key, hold))
            return None
        return self._run(chain, found)

    def _run(self, chain: _Chain, delivery: Delivery) -> Delivery:
        chain.waiting.remove(delivery)
        chain.running, chain.hold = delivery, None  # a window still armed finds itself disarmed
        return delivery

    def _expire(self, key: str, hold: object) -> None:
        """The window passed: if the store still waits, its lowest waiting message goes on."""
        chain = self._chains.get(key)
        if chain is None or chain.hold is not hold or chain.running is not None:
            return
        lowest = min(chain.waiting, key=lambda d: d.seq)
        missing = self._last[(key, lowest.event.type)] + 1
        self._timeouts.inc()
        log.warning("store %s: %s %s not seen within %gs; going on with %d (%d skipped, handled out of "
                    "order if it comes later)", key, lowest.event.type,
                    missing if lowest.seq == missing + 1 else f"{missing}..{lowest.seq - 1}", self.window,
                    lowest.seq, lowest.seq - missing,
                    extra={"id": lowest.event.id, "correlationid": lowest.event.correlationid,
                           "store": key, "queue": self.queue, "outcome": "resequence_timeout"})
        self.release(self._run(chain, lowest))
