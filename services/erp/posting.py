"""One posting of a sale or return: inbox key, legacy rows and the outbox event in
the caller's transaction, so all of them commit together or none does.

The event path and the RPC path share the inbox consumer and the store
agent's key (`<type>:<store>:<pos_txn_id>`), so a sale that arrives both ways
posts once; a repeat answers with the document already posted.
"""
from __future__ import annotations

from sqlalchemy.engine import Connection

from contracts.pos import PosReturnV1, PosSaleV1
from services.bus import inbox
from services.erp import events, ledger

CONSUMERS = {PosSaleV1.TYPE: "erp.on_pos_sale", PosReturnV1.TYPE: "erp.on_pos_return"}


def idempotency_key(txn: PosSaleV1 | PosReturnV1) -> str:
    return f"{txn.TYPE}:{txn.store_id}:{txn.pos_txn_id}"


def post(conn: Connection, tables: ledger.LegacyTables, txn: PosSaleV1 | PosReturnV1, outbox, *,
         key: str, message_id: str, correlationid: str | None) -> tuple[str | None, bool]:
    """Returns (doc_no, duplicate); `outbox` is the worker's Outbox dependency."""
    sale = isinstance(txn, PosSaleV1)
    if not inbox.claim(conn, CONSUMERS[txn.TYPE], key, message_id):
        return ledger.find_document(conn, tables, txn.store_id, "S" if sale else "R", txn.pos_txn_id), True
    if sale:
        doc_no = ledger.post_sale(conn, tables, txn)
        event = events.sale_posted(txn, doc_no, correlationid)
    else:
        doc_no = ledger.post_return(conn, tables, txn)
        original = txn.original and ledger.find_document(
            conn, tables, txn.original.store_id, "S", txn.original.pos_txn_id)
        event = events.return_posted(txn, doc_no, original, correlationid)
    outbox.add(conn, event)
    return doc_no, False
