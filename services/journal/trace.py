"""The path of a message through the bus, assembled from the journal.

Start from any name: a message id, a correlation id, a POS transaction id or
another subject (a customer id), a file row's key. Names are followed to
more names: a hop's message id and correlation id (an ERP posting keeps the
sale's correlation id, so the loyalty points file is reached), and for a
batch hop only the row that led to it (its key and refs), never the other
499 rows of its chunk. Subjects are matched for the starting name only: a
chunk's subject is its row type, shared by every chunk.
"""
from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone

from sqlalchemy.engine import Connection

from services.journal import store

MAX_HOPS = 5000
MAX_NAMES = 500


@dataclass
class TracedHop:
    pk: int
    time: float
    service: str
    hop: str
    outcome: str
    id: str | None
    correlationid: str | None
    subject: str | None
    detail: dict
    rows: list[dict] = field(default_factory=list)  # the batch items on this path

    def where(self) -> str:
        """A readable summary: file and line of the traced rows, then the detail."""
        parts = []
        if self.subject and not self.rows:
            parts.append(f"subject {self.subject}")
        detail = dict(self.detail)
        file = detail.pop("file", None)
        for item in self.rows:
            place = f"line {item['row']}" if item.get("row") is not None else f"key {item['key']}"
            parts.append(f"{file} {place}" if file else place)
        if file and not self.rows:
            parts.append(f"file {file}")
        parts += [f"{key} {value}" for key, value in detail.items()]
        return ", ".join(parts)

    def as_json(self) -> dict:
        return {"time": _iso(self.time), "service": self.service, "hop": self.hop, "outcome": self.outcome,
                "id": self.id, "correlationid": self.correlationid, "subject": self.subject,
                "detail": self.detail, "rows": self.rows}


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="milliseconds")


def _hop(row) -> TracedHop:
    return TracedHop(row.pk, row.time, row.service, row.hop, row.outcome, row.id, row.correlationid,
                     row.subject, json.loads(row.detail) if row.detail else {})


def trace(conn: Connection, name: str) -> list[TracedHop]:
    """Every hop reachable from `name`, in time order; [] when the journal knows nothing of it."""
    hops: dict[int, TracedHop] = {}
    seen, todo = {name}, deque([name])

    def follow(*names):
        for n in names:
            if n and n not in seen and len(seen) < MAX_NAMES:
                seen.add(n)
                todo.append(n)

    while todo and len(hops) < MAX_HOPS:
        current = todo.popleft()
        for row in store.direct(conn, current, by_subject=current == name):
            hops.setdefault(row.pk, _hop(row))
            follow(row.id, row.correlationid)
        for row in store.by_ref(conn, current):
            hop = hops.setdefault(row.pk, _hop(row))
            item = json.loads(row.items)[row.item]
            if item not in hop.rows:
                hop.rows.append(item)
            follow(row.id, row.correlationid, item["key"], *item.get("refs", ()))
    return sorted(hops.values(), key=lambda h: (h.time, h.pk))


def table(hops: list[TracedHop]) -> str:
    """The path as aligned columns, one hop per line."""
    header = ("TIME (UTC)", "SERVICE", "HOP", "OUTCOME", "ID", "WHERE")
    lines = [(_iso(h.time).replace("T", " ")[:23], h.service, h.hop, h.outcome, h.id or "-", h.where())
             for h in hops]
    widths = [max(len(r[i]) for r in [header, *lines]) for i in range(len(header) - 1)]
    return "\n".join(("  ".join(cell.ljust(w) for cell, w in zip(r, widths)) + "  " + r[-1]).rstrip()
                     for r in [header, *lines])
