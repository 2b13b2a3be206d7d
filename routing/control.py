"""The control plane's record of route tables: what is active, every version
ever applied, and an append-only audit log of who applied what, when and why.

Applying publishes the table on a fanout exchange; every store agent has a
durable queue bound to it, so an agent that is offline picks the newest table
up when it returns, and keeps the last one on disk for an offline start.
The table the agents ran before the first apply is recorded as a version too
(action `start-up`), so the first apply can be rolled back like any other.
"""
from __future__ import annotations

import difflib
import getpass
import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import amqp

from contracts.envelope import CloudEvent
from routing.route_plan import BackwardMoveError, Move, Plan, plan, set_version
from routing.route_table import RouteTable, RouteTableError, parse_route_table
from bus.publisher import connection_params

ROUTES_EXCHANGE = "retailbus.routes"
TABLE_APPLIED = "routing.table_applied.v1"


def agent_queue(store_id: str) -> str:
    return f"routes.{store_id}"


def operator() -> str:
    return os.environ.get("SUDO_USER") or getpass.getuser()


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@dataclass(frozen=True)
class Applied:
    version: int
    previous: int | None
    diff: list[str]
    delivered: bool
    moves: tuple[Move, ...] = ()


class RouteRegistry:
    """`var/routes/`: active.yaml, history/v<N>.yaml, audit.jsonl."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.history = folder / "history"

    def active_text(self) -> str | None:
        path = self.folder / "active.yaml"
        return path.read_text() if path.exists() else None

    def active(self) -> RouteTable | None:
        text = self.active_text()
        return parse_route_table(text, str(self.folder / "active.yaml")) if text else None

    def version_text(self, version: int) -> str:
        path = self.history / f"v{version}.yaml"
        if not path.exists():
            known = sorted(int(p.stem[1:]) for p in self.history.glob("v*.yaml"))
            raise RouteTableError(f"no route table version {version} (applied: {known or 'none'})")
        return path.read_text()

    def audit(self) -> list[dict]:
        path = self.folder / "audit.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def check(self, table: RouteTable, source: str) -> None:
        active = self.active()
        if active is not None and table.version <= active.version:
            raise RouteTableError(
                f"{source}: version {table.version} must be greater than the active version {active.version}")

    def diff(self, text: str, source: str = "new") -> list[str]:
        old = (self.active_text() or "").splitlines()
        return list(difflib.unified_diff(old, text.splitlines(), "active", source, lineterm=""))

    def record(self, table: RouteTable, text: str, reason: str, action: str, **extra) -> Applied:
        """Keep the version, append the audit record (fsynced), make it active."""
        self.check(table, f"version {table.version}")
        previous = self.active()
        diff = self.diff(text, f"v{table.version}")
        self.history.mkdir(parents=True, exist_ok=True)
        _write_atomic(self.history / f"v{table.version}.yaml", text)
        entry = {
            "time": datetime.now(timezone.utc).isoformat(), "who": extra.pop("who", None) or operator(),
            "action": action, "version": table.version,
            "previous": previous.version if previous else None, "reason": reason, "diff": diff, **extra,
        }
        with (self.folder / "audit.jsonl").open("a") as f:
            f.write(json.dumps(entry) + "\n")
            f.flush()
            os.fsync(f.fileno())
        _write_atomic(self.folder / "active.yaml", text)
        return Applied(table.version, entry["previous"], diff, delivered=False)


def table_event(table: RouteTable, text: str, reason: str) -> CloudEvent:
    return CloudEvent.new(TABLE_APPLIED, "retailbus/control-plane",
                          {"version": table.version, "table": text, "reason": reason},
                          subject=str(table.version), idempotencykey=f"{TABLE_APPLIED}:{table.version}")


def broadcast(uri: str, event: CloudEvent, timeout: float = 10.0) -> bool:
    """Publish (confirmed) to every agent queue; False when no agent queue is bound yet."""
    conn = amqp.Connection(**connection_params(uri, timeout), confirm_publish=True)
    conn.connect()
    returned = []
    try:
        channel = conn.channel()
        channel.exchange_declare(ROUTES_EXCHANGE, "fanout", durable=True, auto_delete=False)
        channel.events["basic_return"].add(lambda *args: returned.append(args))
        channel.basic_publish(
            amqp.Message(event.to_json(), delivery_mode=2, message_id=event.id,
                         content_type="application/cloudevents+json", type=event.type),
            ROUTES_EXCHANGE, "", mandatory=True, confirm_timeout=timeout)
        return not returned
    finally:
        conn.collect()


def planned(registry: RouteRegistry, text: str, source: str, stores, baseline: RouteTable | None = None) -> Plan:
    """What applying `text` would do, over the active table (else `baseline`, what the
    agents ran at start-up)."""
    return plan(text, source, registry.active() or baseline, stores)


def apply_table(registry: RouteRegistry, uri: str, text: str, source: str, reason: str, stores,
                action: str = "apply", allow_backward: bool = False,
                baseline: tuple[str, str] | None = None, **extra) -> Applied:
    """Plan, then broadcast, then record: if the broker is down nothing is recorded and the
    same file can simply be applied again (agents ignore a version they run). `baseline`
    (text, source) is the table the agents run when nothing was applied yet; it is
    recorded first, as a version of its own."""
    start = start_up_table(*baseline) if baseline and registry.active() is None else None
    todo = planned(registry, text, source, stores, start[0] if start else None)
    if todo.backward and not allow_backward:
        raise BackwardMoveError(todo)
    delivered = broadcast(uri, table_event(todo.table, todo.text, reason))
    if start is not None and registry.active() is None:
        registry.record(start[0], start[1], "the table the agents ran before the first apply", "start-up")
    applied = registry.record(todo.table, todo.text, reason, action, **extra)
    return Applied(applied.version, applied.previous, applied.diff, delivered, tuple(todo.moves))


def start_up_table(text: str, source: str) -> tuple[RouteTable, str]:
    """The agents' start-up table as a version: numbered 1 when its file has no version
    (as the agents number it)."""
    table = parse_route_table(text, source)
    if table.version is None:
        text = set_version(text, 1, "the agents' start-up table")
        table = parse_route_table(text, source)
    return table, text


def rollback_text(registry: RouteRegistry, to_version: int | None) -> tuple[int, str]:
    """An earlier table re-numbered as the next version (a rollback is a new apply)."""
    audit = registry.audit()
    active = registry.active()
    if active is None:
        raise RouteTableError("no route table has been applied yet")
    if to_version is None:
        earlier = [e["previous"] for e in audit if e["version"] == active.version and e["previous"]]
        if not earlier:
            raise RouteTableError(f"version {active.version} has no earlier version to roll back to")
        to_version = earlier[-1]
    if to_version == active.version:
        raise RouteTableError(f"version {to_version} is the active table already")
    text = registry.version_text(to_version)
    parse_route_table(text, f"v{to_version}")
    text = f"# rollback to v{to_version}\n" + set_version(text, active.version + 1)
    return to_version, text
