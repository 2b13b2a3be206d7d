"""What a store agent knows about routing: the table it runs and how each route fares.

The table is swapped atomically (one attribute assignment): a request reads
`holder.table` once and finishes on that table even if a new one arrives
meanwhile. Every accepted table is written to disk first, so an agent that
restarts while the broker is down serves the last table it saved.
"""
from __future__ import annotations

import logging
import os
import time
from collections import deque
from pathlib import Path

from nameko.extensions import DependencyProvider
from prometheus_client import Counter, Gauge, Histogram

from routing.route_table import RouteTable, RouteTableError, load_route_table, parse_route_table
from bus.settings import retailbus_settings

log = logging.getLogger(__name__)

TABLE_VERSION = Gauge("retailbus_route_table_version", "Version of the route table this agent runs",
                      ["store"])
ROUTE_MESSAGES = Counter("retailbus_route_messages_total", "POS messages by route, mode and outcome",
                         ["route", "mode", "outcome"])
PARITY_RATIO = Gauge("retailbus_shadow_parity_ratio", "Share of shadowed messages whose bus result "
                     "matched the legacy result", ["route"])
DECISION_SECONDS = Histogram("retailbus_route_decision_seconds", "Route decision time",
                             buckets=(1e-6, 2e-6, 5e-6, 1e-5, 5e-5, 1e-4))
END_TO_END_SECONDS = Histogram("retailbus_route_seconds", "POS call time in the agent by route and mode",
                               ["route", "mode"], buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                                                           0.25, 0.5, 1, 2.5, 5))


class RouteTableHolder(DependencyProvider):
    """The running table of one store agent, saved under its state folder."""

    def setup(self):
        settings = retailbus_settings(self.container.config)
        self.store_id = os.environ.get("RETAILBUS_STORE") or self.container.config.get("STORE_ID")
        self.saved = settings.path(Path("var/stores") / self.store_id / "routes.yaml")
        self.table = self._initial(settings.path(settings.routes_file))
        TABLE_VERSION.labels(self.store_id).set(self.table.version)
        self.stats = RouteStats()

    def _initial(self, configured: Path) -> RouteTable:
        """The saved table, else the configured file (version 1 when it has none, as the
        control plane numbers it when it records the start-up table)."""
        if self.saved.exists():
            try:
                table = load_route_table(self.saved)
                self.text = self.saved.read_text()
                return table
            except RouteTableError as exc:
                log.error("saved route table unusable, starting from %s: %s", configured, exc)
        table = load_route_table(configured)
        self.text = configured.read_text()
        return table if table.version is not None else table.model_copy(update={"version": 1})

    def install(self, text: str, source: str) -> bool:
        """Validate, save, swap. An older or equal version is ignored (redelivery, reordering)."""
        table = parse_route_table(text, source)
        if table.version is None or table.version <= self.table.version:
            log.info("route table v%d ignored: running v%d", table.version, self.table.version)
            return False
        self.saved.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.saved.with_suffix(".tmp")
        with tmp.open("w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.saved)
        self.table, self.text = table, text
        TABLE_VERSION.labels(self.store_id).set(table.version)
        log.info("route table v%d installed", table.version, extra={"store": self.store_id})
        return True

    def get_dependency(self, worker_ctx):
        return self


class RouteStats:
    """Per route and mode: totals for status, and a sliding window for the guard.

    The window is kept as counts per whole second, not a record per call: an hour of
    a busy till is then 3,600 small dicts whatever the rate (a record per call was
    ~30 MiB at 75 sales/s, and the agent grew by it for an hour)."""

    WINDOW = 3600.0

    def __init__(self):
        self.totals: dict[tuple[str, str, str], int] = {}
        self.recent: deque[tuple[int, dict[tuple[str, str, str], int]]] = deque()
        self.parity: dict[str, list[int]] = {}

    def count(self, route: str, mode: str, outcome: str) -> None:
        ROUTE_MESSAGES.labels(route, mode, outcome).inc()
        key = (route, mode, outcome)
        self.totals[key] = self.totals.get(key, 0) + 1
        second = int(time.monotonic())
        if not self.recent or self.recent[-1][0] != second:
            self.recent.append((second, {}))
        counts = self.recent[-1][1]
        counts[key] = counts.get(key, 0) + 1
        while self.recent[0][0] < second - self.WINDOW:
            self.recent.popleft()

    def shadowed(self, route: str, matched: bool) -> None:
        seen = self.parity.setdefault(route, [0, 0])
        seen[0] += 1
        seen[1] += int(matched)
        PARITY_RATIO.labels(route).set(seen[1] / seen[0])
        self.count(route, "shadow", "parity" if matched else "mismatch")

    def parity_summary(self) -> dict[str, dict]:
        """Per route: comparisons made, how many matched, and the rate (a rate alone hides
        whether it rests on 3 sales or 3,000)."""
        return {route: {"compared": n, "matched": ok, "rate": ok / n} for route, (n, ok) in self.parity.items()}

    def window(self, seconds: float) -> dict[str, dict[str, int]]:
        """Counts per route of `<mode>_<outcome>` over the last `seconds`."""
        since = time.monotonic() - seconds
        out: dict[str, dict[str, int]] = {}
        for second, counts in reversed(self.recent):
            if second + 1 <= since:  # the second [second, second + 1) ended before the window
                break
            for (route, mode, outcome), n in counts.items():
                bucket = out.setdefault(route, {})
                bucket[f"{mode}_{outcome}"] = bucket.get(f"{mode}_{outcome}", 0) + n
        return out

    def snapshot(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for (route, mode, outcome), n in self.totals.items():
            out.setdefault(route, {})[f"{mode}_{outcome}"] = n
        return out
