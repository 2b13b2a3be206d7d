"""Postings of sales and returns: inbox keys, legacy rows and outbox events in the
caller's transaction, so all of them commit together or none does.

The event path and the RPC path share the inbox consumer and the store
agent's key (`<type>:<store>:<pos_txn_id>`), so a sale that arrives both ways
posts once; a repeat answers with the document already posted. Many postings
are written together (`post_many`, one statement per table: ~160 -> ~800
sales a second for one process on SQLite here); one is a batch of one.
"""
from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.engine import Connection

from contracts.pos import PosReturnV1, PosSaleV1
from legacy_wrappers.prepared import run_together
from legacy_wrappers import inbox
from services.erp import events, ledger, outbox

CONSUMERS = {PosSaleV1.TYPE: "erp.on_pos_sale", PosReturnV1.TYPE: "erp.on_pos_return"}


@dataclass(frozen=True)
class Posting:
    tables: ledger.LegacyTables
    txn: PosSaleV1 | PosReturnV1
    key: str
    message_id: str
    correlationid: str | None


def post_many(conn: Connection, postings: list[Posting]) -> list[tuple[str | None, bool]]:
    """(doc_no, duplicate) per posting. Sales are written before returns, so a
    return finds its original even when both arrive in one batch."""
    t = postings[0].tables
    fresh = inbox.claim_many(conn, [(CONSUMERS[p.txn.TYPE], p.key, p.message_id) for p in postings])
    doc_nos: dict[int, str] = {}
    posted, statements = [], []
    for kind in ("S", "R"):
        todo = [(i, p) for i, p in enumerate(postings) if fresh[i] and _kind(p) == kind]
        if not todo:
            continue
        if kind == "R":  # written now, so that a return finds the sale it refers to
            run_together(conn, statements)
            statements = []
        originals = [ledger.original_of(conn, t, p.txn) if kind == "R" else None for _, p in todo]
        written, writes = ledger.documents(conn, t, [(p.txn, kind, o) for (_, p), o in zip(todo, originals)])
        statements += writes
        for (i, p), doc_no, original in zip(todo, written, originals):
            doc_nos[i] = doc_no
            posted.append(events.sale_posted(p.txn, doc_no, p.correlationid) if kind == "S"
                          else events.return_posted(p.txn, doc_no, original, p.correlationid))
    if posted:
        run_together(conn, [*statements, outbox.insert(posted)])  # the documents and their events: one round trip
    return [(doc_nos[i], False) if fresh[i]
            else (ledger.find_document(conn, t, p.txn.store_id, _kind(p), p.txn.pos_txn_id), True)
            for i, p in enumerate(postings)]


def _kind(p: Posting) -> str:
    return "S" if isinstance(p.txn, PosSaleV1) else "R"
