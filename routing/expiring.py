"""`ExpiringMap`: entries kept until their expiry, at a dict slot's cost each.

The agent remembers every signed request for minutes (its nonce, its answer),
at 75 sales/s that is tens of thousands of entries. An OrderedDict with an
expiry per entry spends ~100 bytes on the node, the float and the tuple key
of each, more than what is remembered. Here entries are grouped in slices
by expiry (`slice_seconds` wide): an entry costs its key, its value and a
plain dict slot, and a whole slice goes at once when the last expiry in it
has passed. An entry is therefore kept up to `slice_seconds` longer than
asked, never shorter. Over `max_entries`, the slice that expires first goes
(a flood cannot grow the process without bound).
"""
from __future__ import annotations

import math

_MISSING = object()


class ExpiringMap:
    def __init__(self, slice_seconds: float, max_entries: int):
        self.slice_seconds = slice_seconds
        self.max_entries = max_entries
        self._slices: dict[int, dict] = {}  # slice number (expiry // slice_seconds, rounded up) -> entries
        self._count = 0
        self._first_end = math.inf  # when the first slice expires: nothing to drop before

    def get(self, key, default=None):
        for entries in self._slices.values():
            value = entries.get(key, _MISSING)
            if value is not _MISSING:
                return value
        return default

    def __contains__(self, key) -> bool:
        return self.get(key, _MISSING) is not _MISSING

    def put(self, key, value, expires: float, now: float) -> None:
        """Keep `key` until `expires` (at least); a key kept already is moved to its new expiry."""
        self.expire(now)
        for entries in self._slices.values():
            if entries.pop(key, _MISSING) is not _MISSING:
                self._count -= 1
                break
        number = math.ceil(expires / self.slice_seconds)
        entries = self._slices.get(number)
        if entries is None:
            entries = self._slices[number] = {}
            self._first_end = min(self._first_end, number * self.slice_seconds)
        entries[key] = value
        self._count += 1
        while self._count > self.max_entries:
            self._drop(min(self._slices))

    def replace(self, key, value) -> bool:
        """Give a kept key another value (same expiry); False if it is no longer kept."""
        for entries in self._slices.values():
            if key in entries:
                entries[key] = value
                return True
        return False

    def expire(self, now: float) -> None:
        """Drop the slices whose every entry has expired."""
        if now < self._first_end:
            return
        for number in [n for n in self._slices if n * self.slice_seconds <= now]:
            self._drop(number)

    def _drop(self, number: int) -> None:
        self._count -= len(self._slices.pop(number))
        self._first_end = min(self._slices, default=math.inf) * self.slice_seconds

    def __len__(self) -> int:
        return self._count
