"""`route_guard`: the control plane rolls a misbehaving route back by itself.

A route may declare `guard: {max_error_rate, min_parity, window}`. Every few
seconds this service reads each configured store agent's `/healthz` counts
for the route over the guard's window (never reaching back before the active
table was applied, so an old incident cannot trip a fresh rollout), and when
the new side (bus, or shadow's comparisons) breaches a limit, it re-applies
the table with that route at its previous mode, audited as `route-guard`
with the breach as the reason. Run it once, beside `var/routes/`.
"""
from __future__ import annotations

import json
import logging
import urllib.request
from datetime import datetime, timezone

import yaml
from nameko.extensions import DependencyProvider
from nameko.timer import timer
from prometheus_client import Counter

from routing.control import RouteRegistry, apply_table
from routing.route_table import Guard, Route, RouteTable, RouteTableError, parse_route_table
from bus.extensions import container_settings
from bus.metrics_http import MetricsHttp

log = logging.getLogger(__name__)

ROLLBACKS = Counter("retailbus_route_guard_rollbacks_total", "Routes rolled back by the route guard",
                    ["route"])
INTERVAL = 1.0  # seconds between checks; a window is tens of seconds at least
MIN_SAMPLES = 20  # fewer observations say nothing about a rate (config: ROUTE_GUARD_MIN_SAMPLES)


def breach(guard: Guard, mode: str, counts: dict[str, int], min_samples: int = MIN_SAMPLES) -> str | None:
    """Why the new side of a route breaches its guard, or None. `counts` are
    `<mode>_<outcome>` over the window, summed over the agents."""
    if mode == "bus":
        total = sum(n for key, n in counts.items() if key.startswith("bus_"))
        errors = counts.get("bus_error", 0)
    else:
        total = sum(counts.get(f"shadow_{k}", 0) for k in ("parity", "mismatch", "error"))
        errors = counts.get("shadow_error", 0)
    if total < min_samples:
        return None
    if errors / total > guard.max_error_rate:
        return f"{mode} error rate {errors / total:.3f} > {guard.max_error_rate} ({errors}/{total})"
    compared = counts.get("shadow_parity", 0) + counts.get("shadow_mismatch", 0)
    if mode == "shadow" and compared >= min_samples:
        parity = counts.get("shadow_parity", 0) / compared
        if parity < guard.min_parity:
            return f"shadow parity {parity:.4f} < {guard.min_parity} ({compared} compared)"
    return None


def previous_route(registry: RouteRegistry, active: RouteTable, name: str) -> Route:
    """The route as it was in the newest earlier table where its mode differed
    (else the route in legacy mode): what the route is rolled back to."""
    current = active.route_named(name)
    versions = sorted((int(p.stem[1:]) for p in registry.history.glob("v*.yaml")), reverse=True)
    for version in versions:
        if version >= active.version:
            continue
        try:
            old = parse_route_table(registry.version_text(version), f"v{version}").route_named(name)
        except RouteTableError:
            continue
        if old is not None and old.mode != current.mode:
            return old.model_copy(update={"guard": current.guard})
    return current.model_copy(update={"mode": "legacy", "rollout": None})


def rolled_back_text(registry: RouteRegistry, active: RouteTable, name: str, reason: str) -> str:
    back = previous_route(registry, active, name)
    routes = tuple(back if r.name == name else r for r in active.routes)
    table = active.model_copy(update={"version": active.version + 1, "routes": routes})
    data = table.model_dump(mode="json", exclude_none=True)
    return f"# written by route-guard: {name} back to {back.mode}: {reason}\n" + yaml.safe_dump(data, sort_keys=False)


def agent_counts(http: str, window: float) -> dict[str, dict[str, int]] | None:
    try:
        with urllib.request.urlopen(f"http://{http}/healthz?window={window:.0f}", timeout=2) as response:
            return json.loads(response.read()).get("routes_window") or {}
    except (OSError, ValueError):
        return None


class GuardWatch(DependencyProvider):
    """What the guard needs: the registry, the broker, the agents to poll."""

    def setup(self):
        self.uri, self.settings = container_settings(self.container.config)
        self.registry = RouteRegistry(self.settings.path(self.settings.routes_state))
        self.min_samples = int(self.container.config.get("ROUTE_GUARD_MIN_SAMPLES", MIN_SAMPLES))

    def get_dependency(self, worker_ctx):
        return self

    def applied_age(self, version: int) -> float | None:
        """Seconds since `version` became active, from the audit log."""
        times = [e["time"] for e in self.registry.audit() if e["version"] == version]
        if not times:
            return None
        return (datetime.now(timezone.utc) - datetime.fromisoformat(times[-1])).total_seconds()

    def check(self) -> list[str]:
        """One pass over every guarded route on its new side; returns the routes rolled back."""
        try:
            active = self.registry.active()
        except RouteTableError as exc:
            log.error("route guard: active table unreadable: %s", exc)
            return []
        if active is None:
            return []
        guarded = [r for r in active.routes if r.guard is not None and r.mode != "legacy"]
        if not guarded:
            return []
        age = self.applied_age(active.version)
        rolled = []
        for route in guarded:
            window = min(route.guard.window, age) if age is not None else route.guard.window
            counts: dict[str, int] = {}
            for store in self.settings.stores:
                for key, n in ((agent_counts(store.http, window) or {}).get(route.name) or {}).items():
                    counts[key] = counts.get(key, 0) + n
            why = breach(route.guard, route.mode, counts, self.min_samples)
            if why is None:
                continue
            reason = f"route-guard: {route.name} {why} over {window:.0f}s"
            text = rolled_back_text(self.registry, active, route.name, reason)
            try:
                applied = apply_table(self.registry, self.uri, text, "route-guard", reason,
                                      [s.id for s in self.settings.stores], action="guard-rollback",
                                      allow_backward=True, who="route-guard", route=route.name)
            except Exception as exc:  # ops applied meanwhile, or the broker is down: next pass
                log.error("route guard could not roll %s back: %s", route.name, exc)
                continue
            ROLLBACKS.labels(route.name).inc()
            log.warning("%s; applied v%d", reason, applied.version, extra={"id": route.name, "correlationid": None})
            rolled.append(route.name)
            active = parse_route_table(text, "route-guard")
        return rolled


class RouteGuard:
    name = "route_guard"

    watch = GuardWatch()
    metrics = MetricsHttp()

    @timer(interval=INTERVAL)
    def tick(self):
        self.watch.check()
