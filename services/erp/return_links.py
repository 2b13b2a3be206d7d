"""Returns posted before the sale they refer to, linked when that sale posts.

A store's sales and returns travel on two queues; after a backlog (the WAN or
the erp was down) a return can be consumed before its sale, and the legacy
header has nowhere to keep the reference until then: ORIG_DOC_NO would stay
NULL for good. So the return posts at once (the refund happened) and its
reference waits here (RB_RETURN_LINK, ours, beside the legacy tables, in the
posting's transaction); the posting of the sale fills the return's ORIG_DOC_NO
in its own transaction and drops the wait. The `erp.return_posted.v1` already
announced keeps `original_doc_no: null`: consumers that need it read the ERP.
"""
from __future__ import annotations

import logging

from sqlalchemy import Column, Index, MetaData, String, Table, bindparam, delete, select, update
from sqlalchemy.engine import Connection

from legacy_wrappers.legacy_db import pairs_in

log = logging.getLogger(__name__)

metadata = MetaData()
TABLE = Table(
    "RB_RETURN_LINK", metadata,
    Column("RETURN_DOC_NO", String(12), primary_key=True),
    Column("ORIG_STORE", String(8), nullable=False),
    Column("ORIG_TXN_ID", String(40), nullable=False),
    Index("IX_RB_RETURN_LINK_ORIG", "ORIG_STORE", "ORIG_TXN_ID"),
)


def wait_rows(returns: list[tuple[str, str, str]]) -> list[dict]:
    """RB_RETURN_LINK rows of (return doc_no, original store, original POS transaction id)."""
    return [{"RETURN_DOC_NO": doc_no, "ORIG_STORE": store, "ORIG_TXN_ID": txn} for doc_no, store, txn in returns]


def link(conn: Connection, header, sales: dict[tuple[str, str], str]) -> int:
    """Give the returns waiting for any of `sales` ((store, POS transaction id) -> the
    sale's doc_no, being posted in this transaction) their ORIG_DOC_NO; returns how many."""
    if not sales:
        return 0
    c = TABLE.c
    waiting = conn.execute(select(c.RETURN_DOC_NO, c.ORIG_STORE, c.ORIG_TXN_ID)
                           .where(pairs_in(c.ORIG_STORE, c.ORIG_TXN_ID, sales))).all()
    if not waiting:
        return 0
    conn.execute(update(header).where(header.c.DOC_NO == bindparam("ret"), header.c.ORIG_DOC_NO.is_(None))
                 .values(ORIG_DOC_NO=bindparam("orig")),
                 [{"ret": ret, "orig": sales[(store, txn)]} for ret, store, txn in waiting])
    conn.execute(delete(TABLE).where(c.RETURN_DOC_NO.in_([ret for ret, _, _ in waiting])))
    for ret, store, txn in waiting:
        log.info("return %s linked to sale %s (%s/%s), which posted after it", ret, sales[(store, txn)],
                 store, txn, extra={"id": ret, "correlationid": None})
    return len(waiting)
