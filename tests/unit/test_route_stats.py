"""routing/route_state.py RouteStats: the guard's sliding window costs the same memory
whatever the rate (counts per second, not a record per call) and forgets what is older
than its hour."""
from __future__ import annotations

import pytest

from routing import route_state
from routing.route_state import RouteStats

pytestmark = pytest.mark.unit


class Clock:
    def __init__(self, now: float):
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_a_busy_hour_is_kept_as_counts_per_second(monkeypatch):
    clock = Clock(1000.0)
    monkeypatch.setattr(route_state.time, "monotonic", clock)
    stats = RouteStats()
    for n in range(100_000):  # 100 calls a second for 1,000 seconds
        clock.now = 1000.0 + n / 100
        stats.count("sales", "bus", "ok" if n % 10 else "refused")
    assert len(stats.recent) == 1000  # one entry per second, not per call
    assert stats.window(3600) == {"sales": {"bus_ok": 90_000, "bus_refused": 10_000}}
    # the last 10 s at 1999.99 touch 11 whole seconds (1989 to 1999): the window counts to the second
    assert stats.window(10) == {"sales": {"bus_ok": 990, "bus_refused": 110}}
    clock.now += 3601  # an hour later the window has forgotten them; the totals have not
    stats.count("sales", "bus", "ok")
    assert len(stats.recent) == 1 and stats.window(3600) == {"sales": {"bus_ok": 1}}
    assert stats.totals[("sales", "bus", "ok")] == 90_001
