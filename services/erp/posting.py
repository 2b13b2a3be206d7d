"""Postings of sales and returns: inbox keys, legacy rows and outbox events in the
caller's transaction, so all of them commit together or none does.

The event path and the RPC path share the inbox consumer and the store
agent's key (`<type>:<store>:<pos_txn_id>`), so a sale that arrives both ways
posts once; a repeat answers with the document already posted. A document
already in the legacy tables for the same store, type and POS transaction id
(booked by the legacy API, which keeps no RB_INBOX key) is a repeat too. Many postings
are written together (`post_many`, one statement per table: ~160 -> ~800
sales a second for one process on SQLite here); one is a batch of one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from sqlalchemy.engine import Connection

from contracts.pos import PosReturnV1, PosSaleV1
from legacy_wrappers.prepared import Prepared, run_together
from legacy_wrappers import inbox
from services.erp import events, ledger, outbox, return_facts, return_links

CONSUMERS = {PosSaleV1.TYPE: "erp.on_pos_sale", PosReturnV1.TYPE: "erp.on_pos_return"}
_WAIT_FOR_SALE = Prepared(return_links.TABLE.insert())


@dataclass(frozen=True)
class Posting:
    tables: ledger.LegacyTables
    txn: PosSaleV1 | PosReturnV1
    key: str
    message_id: str
    correlationid: str | None


class Booked(NamedTuple):
    """A posting's outcome: its document (the one found, for a duplicate) and the stock
    moves it could not make (no stock row for the SKU: services/erp/unknown_sku.py)."""
    doc_no: str | None
    duplicate: bool
    unknown_skus: tuple[ledger.Move, ...] = ()


def post_many(conn: Connection, postings: list[Posting]) -> list[Booked]:
    """A Booked per posting. Sales are written before returns, so a return finds
    its original even when both arrive in one batch; a return whose sale is not
    posted yet waits for it (services/erp/return_links.py)."""
    t = postings[0].tables
    fresh = inbox.claim_many(conn, [(CONSUMERS[p.txn.TYPE], p.key, p.message_id) for p in postings])
    booked = ledger.existing_documents(conn, t, [_document_key(p) for i, p in enumerate(postings) if fresh[i]])
    fresh = [is_fresh and _document_key(p) not in booked for is_fresh, p in zip(fresh, postings)]
    doc_nos: dict[int, str] = {}
    unknown: dict[str, list[ledger.Move]] = {}
    posted, statements = [], []
    for kind in ("S", "R"):
        todo = [(i, p) for i, p in enumerate(postings) if fresh[i] and _kind(p) == kind]
        if not todo:
            continue
        if kind == "R":  # written now, so that a return finds the sale it refers to
            run_together(conn, statements)
            statements = []
        originals = [ledger.original_of(conn, t, p.txn) if kind == "R" else None for _, p in todo]
        written, writes, moves = ledger.documents(conn, t, [(p.txn, kind, o) for (_, p), o in zip(todo, originals)])
        statements += writes
        for move in moves:
            unknown.setdefault(move[0], []).append(move)
        facts = return_facts.originals(conn, t, [(doc_no, original, p.txn.lines) for (_, p), doc_no, original
                                                  in zip(todo, written, originals)]) if kind == "R" else None
        for n, ((i, p), doc_no, original) in enumerate(zip(todo, written, originals)):
            doc_nos[i] = doc_no
            posted.append(events.sale_posted(p.txn, doc_no, p.correlationid) if kind == "S"
                          else events.return_posted(p.txn, doc_no, original, p.correlationid, facts[n]))
        if kind == "S":
            return_links.link(conn, t.header, {(p.txn.store_id, p.txn.pos_txn_id): doc_nos[i] for i, p in todo})
        else:
            statements.append((_WAIT_FOR_SALE, return_links.wait_rows(
                [(doc_nos[i], p.txn.original.store_id, p.txn.original.pos_txn_id)
                 for (i, p), original in zip(todo, originals) if p.txn.original and original is None])))
    if posted:
        run_together(conn, [*statements, outbox.insert(posted)])  # the documents and their events: one round trip
    return [Booked(doc_nos[i], False, tuple(unknown.get(doc_nos[i], ()))) if fresh[i]
            else Booked(ledger.find_document(conn, t, p.txn.store_id, _kind(p), p.txn.pos_txn_id), True)
            for i, p in enumerate(postings)]


def _kind(p: Posting) -> str:
    return "S" if isinstance(p.txn, PosSaleV1) else "R"


def _document_key(p: Posting) -> tuple[str, str, str]:
    return p.txn.store_id, _kind(p), p.txn.pos_txn_id
