"""Shadow mode's comparison: the posting the bus path WOULD write for a sale,
next to the posting the legacy ERP DID write for the same sale.

The bus side is computed by the real ledger inside a savepoint that is
always rolled back, so nothing is written; the legacy side is read back by
the document number the legacy call answered. Fields that legitimately
differ (document numbers, channel, timestamps, surrogate keys, stock levels
that the legacy call already moved) are left out, so parity means "the bus
would have booked exactly what the ERP booked".
"""
from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.engine import Connection

from contracts.pos import PosReturnV1, PosSaleV1
from services.erp import ledger

IGNORED = {"DOC_NO", "CHANNEL", "CREATED_TS", "GL_ID", "UPD_TS"}


def posting(conn: Connection, t: ledger.LegacyTables, doc_no: str) -> dict[str, list[dict]]:
    """The comparable rows of one document, in a stable order."""
    def rows(table, order):
        found = conn.execute(select(table).where(table.c.DOC_NO == doc_no).order_by(*order)).mappings()
        return [{k: v for k, v in row.items() if k not in IGNORED} for row in found]

    return {
        "header": rows(t.header, [t.header.c.DOC_NO]),
        "lines": rows(t.lines, [t.lines.c.LINE_NO]),
        "tenders": rows(t.tenders, [t.tenders.c.SEQ]),
        "gl": rows(t.gl, [t.gl.c.ACCOUNT, t.gl.c.DR_CENTS, t.gl.c.CR_CENTS]),
    }


def dry_run(conn: Connection, t: ledger.LegacyTables, txn: PosSaleV1 | PosReturnV1) -> dict[str, list[dict]]:
    """Post through the ledger, read the rows back, roll everything back.

    On the caller's writing connection, in a savepoint: a second connection of
    this process writing SQLite would wait for the lock our own writer holds
    and block the one OS thread that could release it."""
    savepoint = conn.begin_nested()
    try:
        post = ledger.post_return if isinstance(txn, PosReturnV1) else ledger.post_sale
        return posting(conn, t, post(conn, t, txn))
    finally:
        savepoint.rollback()


def differences(bus: dict[str, list[dict]], legacy: dict[str, list[dict]]) -> list[dict[str, Any]]:
    """Every differing field as {"field": "lines[1].QTY", "bus": .., "legacy": ..}."""
    diffs = []
    for part in sorted(set(bus) | set(legacy)):
        ours, theirs = bus.get(part, []), legacy.get(part, [])
        if len(ours) != len(theirs):
            diffs.append({"field": f"{part}.count", "bus": len(ours), "legacy": len(theirs)})
        for i, (a, b) in enumerate(zip(ours, theirs), start=1):
            for key in sorted(set(a) | set(b)):
                if a.get(key) != b.get(key):
                    diffs.append({"field": f"{part}[{i}].{key}", "bus": a.get(key), "legacy": b.get(key)})
    return diffs


def compare(conn: Connection, t: ledger.LegacyTables, txn: PosSaleV1 | PosReturnV1,
            legacy_doc_no: str) -> list[dict[str, Any]]:
    """`conn` is in a transaction; compare writes nothing to it."""
    legacy = posting(conn, t, legacy_doc_no)
    if not legacy["header"]:
        return [{"field": "header.count", "bus": 1, "legacy": 0}]
    return differences(dry_run(conn, t, txn), legacy)
